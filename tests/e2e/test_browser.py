"""What a dermatologist sees: headless Chromium (Debian's, driven by Playwright) opens a pre-annotated task.

The prediction is made by the backend's own code (the tiny model, through the Flask app) and stored in
a live Label Studio; the page must show the diagnosis choice selected, the pattern choices, and the
brush regions in the region list. The screenshot is kept in ``runs/e2e/`` (and beside the test's
temporary files).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from backend.demo import study as ls_study
from backend.demo.label_studio import ADMIN_EMAIL, ADMIN_PASSWORD, LabelStudioServer
from backend.label_studio.sdk import LabelStudioApi
from labeling_config import TARGETS, load_config

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "e2e"
BCC_XML = load_config("bcc")


def _prediction(image: Path, tmp_path: Path) -> dict[str, Any]:
    """The backend's prediction for one image (tiny model, every pattern on, through /predict)."""
    import http.server
    import threading

    import torch

    from backend.api.app import create_app
    from backend.serving import registry
    from backend.settings import Settings
    from consensus.db import init_db
    from model.common.checkpoint import save_checkpoint
    from model.multitask.network import CheckpointMeta, DermNet

    torch.manual_seed(1)
    checkpoint = tmp_path / "tiny.pt"
    thresholds = dict.fromkeys(TARGETS, 0.0)  # every pattern predicted: every kind of item on screen
    save_checkpoint(
        checkpoint,
        DermNet(width_mult=0.35),
        CheckpointMeta(input_size=64, width_mult=0.35, thresholds=thresholds),
    )
    directory = image.parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        settings = Settings(
            model_dir=tmp_path / "models",
            database_url=f"sqlite:///{tmp_path / 's.sqlite'}",
            allowed_image_hosts=(host,),
            show_outputs="all",  # this untrained model validated nothing; the page shows every kind of item
            release_dir=None,
        )
        _, sessions = init_db(settings.database_url)
        with sessions() as session:
            registry.promote(session, registry.register(session, checkpoint, settings.model_dir))
            session.commit()
        client = create_app(settings, sessions=sessions).test_client()
        body = {
            "tasks": [{"id": 1, "data": {"image": f"http://{host}/{image.name}"}}],
            "label_config": BCC_XML,
        }
        return client.post("/predict", json=body).get_json()["results"][0]
    finally:
        server.shutdown()
        server.server_close()


def open_task(page: Any, ls_url: str, url: str) -> None:
    """Log in as the admin and open a task in Label Studio's editor, its image and masks drawn."""
    page.goto(f"{ls_url}/user/login/")
    page.fill("input[name=email]", ADMIN_EMAIL)
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda u: "/user/login" not in u, timeout=60_000)
    page.goto(url)
    page.wait_for_selector("canvas", timeout=90_000)
    page.wait_for_timeout(3000)  # the image and the masks are drawn after the canvas appears


def test_a_dermatologist_sees_the_pre_annotation(
    label_studio: LabelStudioServer, ls: LabelStudioApi, tmp_path: Path
) -> None:
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (make browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from model.synthetic import SynthConfig, generate

    generate(SynthConfig(n=1, size=256, raters=0, seed=5), tmp_path / "study")
    image = next((tmp_path / "study" / "images").iterdir())
    prediction = _prediction(image, tmp_path)
    brushes = [i for i in prediction["result"] if i["type"] == "brushlabels"]
    assert brushes

    project = ls.projects.create(title="Browser check", label_config=BCC_XML).id
    assert project is not None
    ls.upload_files(project, [image])
    task = ls_study.tasks(ls, project)[0]["id"]
    ls.predictions.create(task=task, **{k: prediction[k] for k in ("result", "score", "model_version")})
    ls.projects.update(id=project, show_collab_predictions=True, model_version=prediction["model_version"])

    shot = tmp_path / "pre-annotation.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1700})
            open_task(page, label_studio.url, f"{label_studio.url}/projects/{project}/data?task={task}")
            page.screenshot(path=str(shot))
            text = page.inner_text("body")
            checked = page.eval_on_selector_all(
                "input[type=checkbox]:checked, input[type=radio]:checked",
                "els => els.map(e => e.closest('label') ? e.closest('label').innerText : e.value)",
            )
        finally:
            browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "pre-annotation.png")
    chosen = {re.sub(r"\[\d+\]$", "", c).strip() for c in checked} - {""}  # labels end in their hotkey
    diagnosis = next(i for i in prediction["result"] if i["from_name"] == "diagnosis")["value"]["choices"][0]
    patterns = next(i for i in prediction["result"] if i["from_name"] == "patterns")["value"]["choices"]
    assert diagnosis in chosen, chosen
    assert set(patterns) <= chosen, (patterns, chosen)
    for brush in brushes[:2]:
        assert brush["value"]["brushlabels"][0] in text
