"""Which image next, against a real Label Studio 1.23.2: ``dermassist next-batch --view`` puts the
strategy's batch in a data manager tab, ``dermassist next-reads --view`` one tab per reader with the
images that still need their read; run again, both update their tabs instead of adding more.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from backend.demo.label_studio import LabelStudioServer
from backend.demo.study import create_raters
from backend.label_studio.sdk import LabelStudioApi
from labeling_config import load_config
from tests.e2e.conftest import DERMASSIST, tiny_model

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "ham10000" / "images"
READERS = ["reader1", "reader2", "reader3", "reader4"]


def _dermassist(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(DERMASSIST), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dermassist {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _tabs(ls: LabelStudioApi, project: int, prefix: str) -> dict[str, dict[str, Any]]:
    views = ls._request("api/dm/views/", "GET", params={"project": project})
    return {v["data"]["title"]: v for v in views if str(v["data"].get("title", "")).startswith(prefix)}


def _tab_tasks(ls: LabelStudioApi, view: dict[str, Any]) -> set[int]:
    body = ls._request(
        "api/tasks/", "GET", params={"view": view["id"], "page_size": 100, "fields": "task_only"}
    )
    return {int(t["id"]) for t in body["tasks"]}


def _diagnosis(bcc: bool) -> list[dict[str, Any]]:
    return [{"from_name": "diagnosis", "to_name": "image", "type": "choices",
             "value": {"choices": ["BCC" if bcc else "non-BCC"]}}]  # fmt: skip


@pytest.mark.timeout(600)
def test_next_reads_go_to_readers_who_have_not_read_the_open_images(
    label_studio: LabelStudioServer, ls: LabelStudioApi, tmp_path: Path
) -> None:
    project = ls.projects.create(title="Adaptive reads", label_config=load_config("bcc")).id
    assert project is not None
    tasks = [{"data": {"image": f"/data/local-files/?d=img{k}.png"}} for k in range(12)]
    ls._request(f"api/projects/{project}/import", "POST", json=tasks)
    ids = sorted(t["id"] for t in ls.export_tasks(project))
    users = dict(zip(READERS, create_raters(ls, READERS, domain="reads.example"), strict=True))
    read_by: dict[int, set[str]] = {}
    for k, task in enumerate(ids):
        if k < 6:  # four readers agree: done
            said = dict.fromkeys(READERS, k % 2 == 0)
        elif k < 9:  # two readers disagree: open
            said = {"reader1": True, "reader2": False}
        else:  # one read: open (fewer than two)
            said = {"reader1": k % 2 == 0}
        for reader, bcc in said.items():
            ls.annotations.create(id=task, completed_by=users[reader], result=_diagnosis(bcc))
        read_by[task] = set(said)
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}",
        "LOG_LEVEL": "WARNING",
    }
    queue = tmp_path / "reads.csv"
    rule = ("--confidence", "0.95", "--min-reads", "2")
    out = _dermassist(env, "next-reads", "--project", str(project), *rule, "--view", "--out", str(queue))
    assert "6 of 12 read images open" in out, out
    with queue.open() as handle:
        rows = list(csv.DictReader(handle))
    assigned = {int(r["task"].removeprefix("ls-")): r["reader"] for r in rows}
    assert set(assigned) == set(ids[6:])
    tabs = _tabs(ls, project, "Next reads: ")
    assert len(tabs) == len(READERS)
    shown: dict[int, str] = {}
    for title, view in tabs.items():
        reader = title.removeprefix("Next reads: ")
        for task in _tab_tasks(ls, view):
            assert task not in shown, f"task {task} is in two readers' tabs"
            shown[task] = reader
    assert shown == assigned
    for task, reader in assigned.items():  # a reader is never asked to read an image again
        assert not any(reader.startswith(r) for r in read_by[task]), (task, reader, read_by[task])

    _dermassist(env, "next-reads", "--project", str(project), *rule, "--view")
    again = _tabs(ls, project, "Next reads: ")
    assert {t: v["id"] for t, v in again.items()} == {
        t: v["id"] for t, v in tabs.items()
    }  # updated, not added


@pytest.mark.timeout(600)
def test_the_next_batch_is_a_tab_of_unlabelled_tasks(
    label_studio: LabelStudioServer, ls: LabelStudioApi, tmp_path: Path
) -> None:
    model = tiny_model(tmp_path / "tiny.pt")
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}",
        "MODEL_DIR": str(tmp_path / "models"),
        "RELEASE_DIR": "none",
        "SHOW_OUTPUTS": "all",
        "LOG_LEVEL": "WARNING",
    }
    _dermassist(env, "models", "promote", str(model))
    project = ls.projects.create(title="Next batch", label_config=load_config("bcc")).id
    assert project is not None
    ls.upload_files(project, sorted(SAMPLE.glob("*.jpg"))[:16])
    ids = sorted(t["id"] for t in ls.export_tasks(project))
    assert len(ids) == 16
    labelled = set(ids[:4])
    for task in labelled:
        ls.annotations.create(id=task, result=_diagnosis(False))

    batch = tmp_path / "batch.csv"
    out = _dermassist(
        env, "next-batch", "--project", str(project), "--size", "5", "--strategy", "entropy",
        "--pool-factor", "4", "--view", "--out", str(batch), "--quiet",
    )  # fmt: skip
    assert "5 of 12 unlabelled tasks picked by entropy" in out and "0 not scored" in out, out
    with batch.open() as handle:
        picks = [int(r["task"]) for r in csv.DictReader(handle)]
    assert len(set(picks)) == 5 and not labelled & set(picks)
    (view,) = _tabs(ls, project, "Next batch").values()
    assert view["data"]["title"] == "Next batch (entropy, diverse)"
    assert _tab_tasks(ls, view) == set(picks)

    _dermassist(env, "next-batch", "--project", str(project), "--size", "3", "--strategy", "entropy",
                "--pool-factor", "4", "--view", "--quiet")  # fmt: skip
    (again,) = _tabs(ls, project, "Next batch").values()
    assert again["id"] == view["id"] and len(_tab_tasks(ls, again)) == 3
