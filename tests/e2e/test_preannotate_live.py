"""A whole project pre-annotated in the background against a real Label Studio 1.23.2, killed half-way
and resumed: every task ends with exactly one prediction of the served version.

64 real dermoscopic images (``sample/ham10000``, CC BY-NC 4.0) uploaded as tasks; a tiny model keeps it
quick. ``dermassist predict`` runs as a child process and is SIGKILLed by its PID after some batches
are posted; ``POST /projects/<id>/predict`` on a live ``dermassist serve`` finds the dead job, ends it
and runs the rest in the background; ``GET /jobs`` shows its progress.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from backend.demo import study as ls_study
from backend.demo.label_studio import LabelStudioServer, free_port
from backend.demo.study import wait_for
from backend.label_studio.sdk import LabelStudioApi
from labeling_config import load_config
from tests.e2e.conftest import DERMASSIST, start_backend, tiny_model

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "ham10000" / "images"
BATCH = 2


@pytest.fixture(scope="module")
def served(label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A live backend serving a tiny model (every output shown), and the environment the CLI needs."""
    root = tmp_path_factory.mktemp("preannotate")
    model = tiny_model(root / "tiny.pt")
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DATABASE_URL": f"sqlite:///{root / 'store.sqlite'}",
        "MODEL_DIR": str(root / "models"),
        "RELEASE_DIR": "none",
        "SHOW_OUTPUTS": "all",
        "IMAGE_FETCH_CONCURRENCY": "2",
        "LOG_LEVEL": "INFO",
    }
    subprocess.run(
        [str(DERMASSIST), "models", "promote", str(model)], env=env, check=True, capture_output=True
    )
    server = start_backend(free_port(), env, root / "serve.log")
    yield server
    server.stop()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


def _project_jobs(url: str, project: int) -> list[dict[str, Any]]:
    return [j for j in _get(f"{url}/jobs")["preannotation"] if j["project"] == project]


def _per_task(ls: LabelStudioApi, project: int, version: str) -> Counter[int]:
    return Counter(p["task"] for p in ls_study.predictions(ls, project) if p["model_version"] == version)


def test_a_project_killed_half_way_and_resumed_has_one_prediction_per_task(
    label_studio: LabelStudioServer, ls: LabelStudioApi, served: Any
) -> None:
    version = _get(f"{served.url}/health")["model_version"]
    project = ls.projects.create(title="Pre-annotation (e2e)", label_config=load_config("bcc")).id
    assert project is not None
    images = sorted(SAMPLE.glob("*.jpg"))
    ls.upload_files(project, images)
    tasks = [t["id"] for t in ls_study.tasks(ls, project)]
    assert len(tasks) == len(images) == 64
    # One task already has this version's prediction; another only a version that contains it (Label
    # Studio's "does not contain" filter, a substring match, would pass over that one).
    ls.projects.import_predictions(
        id=project,
        request=[
            {"task": tasks[0], "result": [], "score": 0.5, "model_version": version},
            {"task": tasks[1], "result": [], "score": 0.5, "model_version": f"{version}+other"},
        ],
    )

    # 1. the CLI, SIGKILLed by its PID after a few batches are posted
    log = served.log.with_name("predict-cli.log")
    with log.open("wb") as handle:
        cli = subprocess.Popen(
            [str(DERMASSIST), "predict", "--project", str(project), "--batch-size", str(BATCH)],
            env=served.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: (jobs := _project_jobs(served.url, project)) and jobs[0]["done"] >= 3 * BATCH,
            120,
            "three batches from the CLI",
            every=0.05,
        )
    finally:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait(10)
    (killed,) = _project_jobs(served.url, project)
    # its process is gone, the row still says running; 62 tasks lack any prediction containing the version
    # (the one with only "<version>+other" is counted when the second sweep reaches it)
    assert killed["status"] == "running" and killed["total"] == 62
    assert killed["mode"] == "missing" and killed["trigger"] == "cli"
    half = _per_task(ls, project, version)
    print(f"the CLI was killed with {sum(half.values()) - 1} of 63 tasks posted")
    assert 3 * BATCH < sum(half.values()) < 64, "the kill came after the last batch: not half-way"
    assert set(half.values()) == {1}

    # 2. resumed by the route: the dead job is ended, a new one runs in the background
    status, answer = _post(f"{served.url}/projects/{project}/predict", {"batch_size": BATCH})
    assert status == 202 and answer["created"], answer
    job = answer["job"]
    status, again = _post(f"{served.url}/projects/{project}/predict", {})
    assert status == 200 and again["job"]["id"] == job["id"] and not again["created"]  # one job at a time
    done = wait_for(
        lambda: next(
            (j for j in _project_jobs(served.url, project) if j["id"] == job["id"] and j["status"] != "running"
             and j["status"] != "queued"), None),
        180,
        "the background job",
    )  # fmt: skip
    assert done["status"] == "succeeded", done
    assert done["done"] == done["total"] == 64 - sum(half.values()) and done["failed"] == 0
    jobs = {j["id"]: j for j in _project_jobs(served.url, project)}
    assert jobs[killed["id"]]["status"] == "failed" and "interrupted" in jobs[killed["id"]]["error"]

    # 3. every task predicted exactly once, by GET /api/predictions/?project=ID; the other version kept
    every = _per_task(ls, project, version)
    assert every == Counter(dict.fromkeys(tasks, 1))
    others = Counter(p["model_version"] for p in ls_study.predictions(ls, project))
    assert others == {version: 64, f"{version}+other": 1}
    predicted = next(p for p in ls_study.predictions(ls, project) if p["task"] == tasks[-1])
    assert {item["from_name"] for item in predicted["result"]} >= {"diagnosis"}

    # 4. nothing left: a third run posts nothing; --all replaces every prediction of the version
    t0 = time.monotonic()
    rerun = subprocess.run(
        [str(DERMASSIST), "-q", "predict", "--project", str(project)],
        env=served.env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "total=0 predicted=0 failed=0" in rerun.stdout and time.monotonic() - t0 < 60
    before = {p["id"] for p in ls_study.predictions(ls, project) if p["model_version"] == version}
    replace = subprocess.run(
        [str(DERMASSIST), "-q", "predict", "--project", str(project), "--all", "--batch-size", "16"],
        env=served.env,
        capture_output=True,
        text=True,
    )
    assert replace.returncode == 0, replace.stderr
    assert "total=64 predicted=64 failed=0" in replace.stdout
    assert _per_task(ls, project, version) == Counter(dict.fromkeys(tasks, 1))
    after = {p["id"] for p in ls_study.predictions(ls, project) if p["model_version"] == version}
    assert before.isdisjoint(after)
