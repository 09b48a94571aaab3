"""The whole loop against a real Label Studio 1.23.2: project, images, predictions, four dermatologists,
webhooks into SQL, consensus, the Train button, a promoted model, export, and SIGKILL + sync.

Asserted step by step; a tiny model and a 40-image synthetic study keep it to a few minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image
from sqlalchemy import select

from backend.ls_client import LabelStudioClient
from backend.ls_server import LabelStudioServer, free_port
from consensus.db import init_db
from consensus.models import Annotation, Item
from labeling_config import PATTERNS, TARGETS, load_config
from tests.e2e.conftest import DERMASSIST, Backend, start_backend

BCC_XML = load_config("bcc")
DISPLAY = {p.key: p.display for p in PATTERNS}
N_IMAGES, N_UPLOADED = 40, 30


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def image_id_of(task: dict[str, Any]) -> str:
    ref = task["data"]["image"]
    name = ref.rsplit("/", 1)[-1].rsplit("=", 1)[-1]
    name = re.sub(r"^[0-9a-f]{8}-", "", name)  # uploads are renamed <8 hex>-<name>
    return name.rsplit(".", 1)[0]


def rater_result(
    study: Path, rater: str, image_id: str, values: dict[str, int], size: int
) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = [
        {"from_name": "diagnosis", "to_name": "image", "type": "choices",
         "value": {"choices": ["BCC" if values["bcc"] else "non-BCC"]}},
    ]  # fmt: skip
    chosen = [k for k in DISPLAY if values.get(k)]
    if chosen:
        result.append(
            {"from_name": "patterns", "to_name": "image", "type": "choices",
             "value": {"choices": [DISPLAY[k] for k in chosen]}}
        )  # fmt: skip
    for key in chosen:
        path = study / "regions" / rater / f"{image_id}_{key}.png"
        if path.is_file():
            mask = (np.asarray(Image.open(path).convert("L")) > 127).astype(np.uint8) * 255
            result.append(
                {"from_name": "regions", "to_name": "image", "type": "brushlabels",
                 "original_width": size, "original_height": size, "image_rotation": 0,
                 "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask)], "brushlabels": [DISPLAY[key]]}}
            )  # fmt: skip
    return result


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("e2e-study")
    generate(SynthConfig(n=N_IMAGES, size=128, raters=4, seed=0), out)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.network import DermNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("e2e-model") / "tiny.pt"
    thresholds = dict.fromkeys(TARGETS, 0.5) | {"ulceration": 0.0, "arborizing_telangiectasia": 0.0}
    save_checkpoint(
        path, DermNet(width_mult=0.35), CheckpointMeta(input_size=64, width_mult=0.35, thresholds=thresholds)
    )
    return path


@pytest.fixture(scope="module")
def backend(
    label_studio: LabelStudioServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    root = tmp_path_factory.mktemp("e2e-backend")
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DATABASE_URL": f"sqlite:///{root / 'store.sqlite'}",
        "MODEL_DIR": str(root / "models"),
        "TRAIN_EPOCHS": "3",
        "LOG_LEVEL": "INFO",
    }
    subprocess.run(
        [str(DERMASSIST), "models", "promote", str(tiny_model)], env=env, check=True, capture_output=True
    )
    server = start_backend(free_port(), env, root / "serve.log")
    state = {"server": server, "root": root}
    yield state
    state["server"].stop()


def test_the_whole_loop(label_studio: LabelStudioServer, backend: dict[str, Any], study: Path) -> None:
    ls = LabelStudioClient(label_studio.url, label_studio.token)
    server: Backend = backend["server"]
    store_url = server.env["DATABASE_URL"]

    # 1. a project from bcc.xml, four annotations per task
    project = ls.post_json("/api/projects/", {"title": "BCC screening (e2e)", "label_config": BCC_XML,
                                              "maximum_annotations": 4})["id"]  # fmt: skip

    # 2. images: uploads, and a local-files storage
    images = sorted((study / "images").iterdir())
    ls.import_files(project, images[:N_UPLOADED])
    files_root: Path = label_studio.extra["files_root"]
    local = files_root / "study"
    local.mkdir()
    for path in images[N_UPLOADED:]:
        shutil.copy(path, local / path.name)
    storage = ls.post_json("/api/storages/localfiles", {"project": project, "path": str(local), "title": "study",
                                                         "use_blob_urls": True, "regex_filter": ".*"})  # fmt: skip
    ls.post_json(f"/api/storages/localfiles/{storage['id']}/sync", {})
    tasks = wait_for(
        lambda: _tasks(ls, project) if len(_tasks(ls, project)) == N_IMAGES else None, 60, f"{N_IMAGES} tasks"
    )
    assert sum("/data/local-files/" in t["data"]["image"] for t in tasks) == N_IMAGES - N_UPLOADED

    # 3. connect the backend; retrieve predictions for every task and read them back
    ml = ls.post_json(
        "/api/ml", {"project": project, "url": server.url, "title": "dermassist", "is_interactive": True}
    )
    version = _get(server.url, "/health")["model_version"]
    ls.post_json(f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                 {"selectedItems": {"all": True, "excluded": []}})  # fmt: skip
    predictions = wait_for(lambda: _predictions(ls, project, N_IMAGES), 180, "a prediction for every task")
    for prediction in predictions:
        assert prediction["model_version"] == version
        assert 0.5 <= prediction["score"] <= 1.0
        names = {item["from_name"] for item in prediction["result"]}
        assert {"diagnosis", "patterns", "regions"} <= names
        for item in prediction["result"]:
            if item["type"] == "brushlabels":
                assert (item["original_width"], item["original_height"]) == (128, 128)
                decoded = np.asarray(decode_rle(item["value"]["rle"])).reshape(128, 128, 4)
                assert decoded[..., 3].any()

    # 4. four dermatologists annotate every task through the API; SIGKILL of the backend half-way
    ratings = pd.read_csv(study / "ratings.csv", dtype={"image_id": str})
    raters = sorted(ratings["rater"].unique())
    users = [
        ls.post_json("/api/users/", {"email": f"{r}@derm.example", "username": r, "first_name": r,
                                     "password": "derm-pass-12345"})["id"]
        for r in raters
    ]  # fmt: skip
    by_task = {image_id_of(t): t["id"] for t in tasks}
    pairs = [(image_id, r) for image_id in sorted(by_task) for r in range(len(raters))]
    killed_at = len(pairs) // 2
    for n, (image_id, r) in enumerate(pairs):
        if n == killed_at:
            server.stop(signal.SIGKILL)  # the backend dies mid-phase; annotators go on
        rows = ratings[(ratings["image_id"] == image_id) & (ratings["rater"] == raters[r])]
        values = dict(zip(rows["label"], rows["value"].astype(int), strict=True))
        if "bcc" not in values:
            continue
        ls.post_json(f"/api/tasks/{by_task[image_id]}/annotations/",
                     {"completed_by": users[r], "result": rater_result(study, raters[r], image_id, values, 128)})  # fmt: skip
    _, sessions = init_db(store_url)
    with sessions() as session:
        landed = len(session.scalars(select(Annotation)).all())
    assert 0 < landed < len(ratings.groupby(["image_id", "rater"]))  # webhooks stopped at the SIGKILL

    # 5. restart, sync: the store equals Label Studio's own export, annotation for annotation
    backend["server"] = server = start_backend(server.port, server.env, server.log)
    sync = subprocess.run([str(DERMASSIST), "sync", "--project", str(project)], env=server.env,
                          capture_output=True, text=True)  # fmt: skip
    assert sync.returncode == 0, sync.stderr
    export = ls.export(project)
    expected = {a["id"]: (t["id"], a["completed_by"]) for t in export for a in t["annotations"]}
    with sessions() as session:
        stored = {
            a.ls_annotation_id: (a.item.ls_task_id, a.rater.ls_user_id)
            for a in session.scalars(select(Annotation).where(Annotation.deleted.is_(False)))
        }
    assert stored == expected

    # 6. consensus, better than the simulated raters' majority vote
    from consensus.dawid_skene import majority_vote
    from consensus.repository import answers
    from consensus.service import run_consensus

    truth = pd.read_csv(study / "labels.csv", dtype={"image_id": str}).set_index("image_id")
    with sessions() as session:
        run = run_consensus(session)
        session.commit()
        table = answers(session)
        ids = {
            i.external_id: image_id_of({"data": {"image": i.image}}) for i in session.scalars(select(Item))
        }
    from consensus.repository import consensus_table

    with sessions() as session:
        long = consensus_table(session, run)
    long["p1"] = np.where(long["value"] == "1", long["posterior"], 1 - long["posterior"])
    long["truth"] = [truth.loc[ids[t], k] for t, k in zip(long["task"], long["label_key"], strict=True)]
    votes = table.groupby(["task", "label_key"])["value"].mean().rename("vote").reset_index()
    merged = long.merge(votes, on=["task", "label_key"])
    ds_brier = float(((merged["p1"] - merged["truth"]) ** 2).mean())
    mv_brier = float(((merged["vote"] - merged["truth"]) ** 2).mean())
    ds_acc = float(((merged["p1"] >= 0.5) == merged["truth"]).mean())
    mv_acc = float(((merged["vote"] > 0.5) == merged["truth"]).mean())
    assert ds_brier < mv_brier and ds_acc >= mv_acc, (ds_brier, mv_brier, ds_acc, mv_acc)
    assert majority_vote  # the reference the consensus is held against

    # 7. the Train button: a job trains, evaluates and promotes; the next predictions carry the new version
    ls.post_json(f"/api/ml/{ml['id']}/train", {})
    job = wait_for(lambda: _finished_job(server.url), 300, "the training job to finish")
    assert job["status"] == "succeeded", job
    assert job["promoted"], job
    wait_for(
        lambda: _get(server.url, "/health")["model_version"] == job["version"], 10, "the promoted version"
    )
    ls.post_json(f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                 {"selectedItems": {"all": True, "excluded": []}})  # fmt: skip
    wait_for(lambda: any(p["model_version"] == job["version"] for p in _all_predictions(ls, project)), 180,
             "predictions from the new model")  # fmt: skip

    # 8. export the consensus: CSV, report, Label Studio import
    out = backend["root"] / "export"
    for fmt, name in (("csv", "csv"), ("report", "report.html"), ("ls-import", "ls-import.json")):
        done = subprocess.run([str(DERMASSIST), "export", "--format", fmt, "--out", str(out / name)],
                              env=server.env, capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert (out / "report.html").stat().st_size > 10_000
    imported = json.loads((out / "ls-import.json").read_text())
    assert len(imported) == N_IMAGES


def _tasks(ls: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    body = ls.get_json(f"/api/tasks/?project={project}&page_size=1000")
    return body["tasks"] if isinstance(body, dict) else body


def _all_predictions(ls: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    body = ls.get_json(f"/api/predictions/?project={project}")
    return body if isinstance(body, list) else body.get("results", [])


def _predictions(ls: LabelStudioClient, project: int, n: int) -> list[dict[str, Any]] | None:
    found = _all_predictions(ls, project)
    return found if len({p["task"] for p in found}) >= n else None


def _get(url: str, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"{url}{path}", timeout=5) as response:
        return json.loads(response.read())


def _finished_job(url: str) -> dict[str, Any] | None:
    jobs = _get(url, "/jobs")["jobs"]
    done = [j for j in jobs if j["status"] in ("succeeded", "failed")]
    return done[0] if done else None


_ = sys
