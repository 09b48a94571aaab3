"""`dermassist demo` against a live Label Studio: it sets everything up, says where, and stops.

The default demo runs on the real HAM10000 sample with the released models; a headless Chromium opens its
first look and must see a real dermoscopic image with the lesion outline and a diagnosis. The synthetic
study (``--synthetic``) keeps its own, smaller check.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import func, select

from backend.demo.label_studio import ADMIN_TOKEN, LabelStudioServer
from backend.label_studio.client import connect
from backend.serving.release import read_release
from backend.settings import DEFAULT_RELEASE_DIR
from consensus.db import init_db
from consensus.models import Annotation, ModelVersion, TrainingJob
from tests.e2e.conftest import DERMASSIST
from tests.e2e.test_browser import ARTIFACTS, CHROMIUM, open_task

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample" / "ham10000"


def test_synthetic_demo_sets_up_a_pre_annotated_project_and_stops(
    label_studio: LabelStudioServer, tmp_path
) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [str(DERMASSIST), "-q", "demo", "--synthetic", "--n", "16", "--size", "128", "--epochs", "1",
         "--no-wait", "--ls-port", "0", "--port", "0", "--out", str(out)],
        env=dict(os.environ), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dermassist demo is up" in done.stdout and "login admin@example.com" in done.stdout
    assert "stopped Label Studio and the backend" in done.stdout
    assert (out / "consensus" / "report.html").stat().st_size > 10_000
    _, sessions = init_db(f"sqlite:///{out / 'dermassist.sqlite'}")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Annotation)) > 0  # the webhooks landed
        versions = session.scalars(select(ModelVersion)).all()
        assert versions and all(v.release is None for v in versions)  # no release beside drawings
        job = session.scalars(select(TrainingJob)).one()
        assert job.status.value == "succeeded", job.error


def test_the_demos_first_look_is_a_real_image_with_outline_and_diagnosis(
    label_studio: LabelStudioServer, tmp_path
) -> None:
    if read_release(DEFAULT_RELEASE_DIR) is None:
        pytest.skip("no released models in models/ (tools/release.py builds them)")
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    demo = subprocess.Popen(
        [str(DERMASSIST), "-q", "demo", "--ls-port", "0", "--port", "0", "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        started = time.monotonic()
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line or time.monotonic() - started > 900:
                break
        text = "".join(lines)
        assert "dermassist demo is up" in text, text[-4000:]
        assert "serves the released model" in text and "nobody labels patterns" in text
        first = re.search(r"a pre-annotated image: (\S+)", text)
        assert first is not None, text
        url = first.group(1)
        ls_url = url.split("/projects/")[0]
        task_id = int(url.rsplit("task=", 1)[1])

        with connect(ls_url, ADMIN_TOKEN) as ls:
            task = ls.tasks.get(task_id).dict()
        sample_ids = set(pd.read_csv(SAMPLE / "labels.csv", dtype={"image_id": str})["image_id"])
        assert any(i in task["data"]["image"] for i in sample_ids), task["data"]  # a real sample image
        prediction = task["predictions"][-1]
        names = {(i["from_name"], tuple(i["value"].get("brushlabels", []))) for i in prediction["result"]}
        assert ("regions", ("Lesion",)) in names and any(n == "diagnosis" for n, _ in names), names
        assert not any(label in ("Ulceration", "Spoke wheel areas") for _, ls_ in names for label in ls_)
        diagnosis = next(i for i in prediction["result"] if i["from_name"] == "diagnosis")
        if diagnosis["value"]["choices"] == ["BCC"]:
            assert ("regions", ("BCC",)) in names  # the first system's explanation of its diagnosis

        if CHROMIUM.is_file():
            sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
            shot = tmp_path / "demo-first-look.png"
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
                )
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1500})
                    open_task(page, ls_url, url)
                    page.screenshot(path=str(shot))
                    body = page.inner_text("body")
                    checked = page.eval_on_selector_all(
                        "input[type=radio]:checked",
                        "els => els.map(e => e.closest('label') ? e.closest('label').innerText : e.value)",
                    )
                    canvases = page.eval_on_selector_all("canvas", "els => els.map(e => e.width * e.height)")
                finally:
                    browser.close()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "demo-first-look.png").write_bytes(shot.read_bytes())
            assert max(canvases) > 100_000, canvases  # the image is drawn (the API check says it is real)
            assert "Lesion" in body  # the outline is in the region list
            chosen = {re.sub(r"\[\d+\]$", "", c).strip() for c in checked}
            assert diagnosis["value"]["choices"][0] in chosen, chosen
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()
    _, sessions = init_db(f"sqlite:///{out / 'dermassist.sqlite'}")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Annotation)) > 0
        released = session.scalars(select(ModelVersion).where(ModelVersion.release.is_not(None))).all()
        # one released version per system: DermNet (the BCC model) and the lesion pair
        assert sorted(str(v.release).rsplit("/", 1)[-1] for v in released) == ["dermnet-bcc", "lesion"]
        job = session.scalars(select(TrainingJob)).one()
        assert job.status.value == "succeeded", job.error
