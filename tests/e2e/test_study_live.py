"""A reading study against a real Label Studio 1.23.2: four readers, the disputed images to an adjudicator,
the adjudicator's labels back as gold, the consensus re-run with them, the study frozen and verified.

Twelve tasks; four dermatologists read each one through Label Studio's API. Four images split the
readers 2-2 on the diagnosis. ``dermassist adjudicate`` syncs the project, runs the consensus and puts
exactly the disputed images into a new adjudication project, each with the four readings as
predictions; a second call adds nothing. The senior dermatologist answers there; ``dermassist sync``
of the adjudication project stores the answers as gold labels; ``dermassist consensus run`` holds them.
``dermassist study freeze`` locks the run into a bundle that ``study verify`` accepts, and rejects once a
reader has changed an annotation in Label Studio.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from backend.demo.label_studio import LabelStudioServer
from backend.demo.study import create_raters
from backend.label_studio.sdk import LabelStudioApi
from consensus.models import ConsensusLabel, ConsensusRun, GoldLabel, Item
from labeling_config import load_config
from tests.e2e.conftest import DERMASSIST

READERS = ["reader1", "reader2", "reader3", "reader4"]
N_TASKS = 12
SPLIT = {0, 3, 6, 9}  # tasks whose readers split 2-2 on the diagnosis


def _result(bcc: bool, ulceration: bool) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = [
        {"from_name": "diagnosis", "to_name": "image", "type": "choices",
         "value": {"choices": ["BCC" if bcc else "non-BCC"]}},
    ]  # fmt: skip
    if ulceration:
        result.append(
            {
                "from_name": "patterns",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["Ulceration"]},
            }
        )
    return result


def _dermassist(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(DERMASSIST), *args], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"dermassist {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.timeout(600)
def test_disputed_images_are_adjudicated_and_come_back_as_gold(
    label_studio: LabelStudioServer, ls: LabelStudioApi, tmp_path: Path
) -> None:
    project = ls.projects.create(title="Reading study", label_config=load_config("bcc"))
    assert project.id is not None
    tasks = [
        {"data": {"image": f"/data/local-files/?d=img{k}.png", "lesion_id": f"L{k // 2}"}}
        for k in range(N_TASKS)
    ]
    ls._request(f"api/projects/{project.id}/import", "POST", json=tasks)
    task_ids = sorted(t["id"] for t in ls.export_tasks(project.id))
    assert len(task_ids) == N_TASKS
    users = dict(zip(READERS, create_raters(ls, READERS, domain="study.example"), strict=True))
    (senior,) = create_raters(ls, ["senior"], domain="study.example")
    for k, task in enumerate(task_ids):
        truth = k % 3 == 0
        for r, reader in enumerate(READERS):
            said = (r < 2) if k in SPLIT else truth
            ls.annotations.create(id=task, completed_by=users[reader], result=_result(said, said and r != 3))

    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}",
        "LOG_LEVEL": "WARNING",
    }
    queue = tmp_path / "queue.csv"
    out = _dermassist(
        env, "adjudicate", "--project", str(project.id), "--adjudicator", "senior@study.example",
        "--labels", "bcc", "--out", str(queue),
    )  # fmt: skip
    assert "4 disputed images" in out and "created" in out and "4 tasks added" in out, out
    adjudication = next(p for p in ls.projects.list() if p.id != project.id)
    assert adjudication.id is not None
    exported = ls.export_tasks(adjudication.id)
    disputed_tasks = {task_ids[k] for k in SPLIT}
    assert {t["data"]["dermassist_source_task"] for t in exported} == disputed_tasks
    for task in exported:
        assert "no majority" in task["data"]["dermassist_disputed"]
        readers = sorted(str(p.model_version) for p in ls.predictions.list(task=task["id"]))
        assert readers == [f"reader: {r}@study.example" for r in READERS]
        assert task["data"]["image"].endswith(".png")  # the source task's data comes along

    again = _dermassist(env, "adjudicate", "--project", str(project.id), "--adjudicator", "senior@study.example",
                        "--labels", "bcc")  # fmt: skip
    assert "found" in again and "0 tasks added" in again and "4 already there" in again, again
    assert len(ls.export_tasks(adjudication.id)) == 4

    # The senior dermatologist decides: BCC on two, not on the other two.
    decided = {}
    for task in sorted(exported, key=lambda t: t["id"]):
        bcc = len(decided) % 2 == 0
        decided[task["data"]["dermassist_source_item"]] = int(bcc)
        ls.annotations.create(id=task["id"], completed_by=senior, result=_result(bcc, False))
    synced = _dermassist(env, "sync", "--project", str(adjudication.id))
    assert "errors=0" in synced or "errors" not in synced, synced
    ran = _dermassist(env, "consensus", "run")
    assert "consensus run" in ran

    engine = create_engine(env["DATABASE_URL"])
    with Session(engine) as session:
        gold = session.execute(
            select(
                Item.external_id, GoldLabel.label_key, GoldLabel.value, GoldLabel.source, GoldLabel.reference
            )
            .join(Item, Item.id == GoldLabel.item_id)
            .where(GoldLabel.deleted.is_(False))
        ).all()
        by_item = {(t, k): (v, s, r) for t, k, v, s, r in gold}
        for item, value in decided.items():
            assert by_item[(item, "bcc")] == (str(value), "adjudication", "senior@study.example")
            assert (item, "ulceration") not in by_item  # not disputed, not marked: no statement
        run = session.scalars(select(ConsensusRun).order_by(ConsensusRun.id.desc())).first()
        assert run is not None and run.params["gold"]["n"] == 4
        assert run.params["gold"]["by_label"]["bcc"] == {"adjudication": 4}
        labels = session.execute(
            select(Item.external_id, ConsensusLabel.value, ConsensusLabel.posterior)
            .join(Item, Item.id == ConsensusLabel.item_id)
            .where(ConsensusLabel.run_id == run.id, ConsensusLabel.label_key == "bcc")
        ).all()
        consensus = {t: (v, p) for t, v, p in labels}
        for item, value in decided.items():
            assert consensus[item] == (str(value), 1.0)
    engine.dispose()

    # The study is frozen; the bundle verifies, until a reader changes an annotation in Label Studio.
    bundle = tmp_path / "bundle"
    frozen = _dermassist(env, "study", "freeze", "--out", str(bundle), "--n-boot", "100")
    assert "4 gold labels" in frozen, frozen
    assert "verified" in _dermassist(env, "study", "verify", str(bundle))
    annotation = ls.export_tasks(project.id)[1]["annotations"][0]
    flipped = _result(
        not any(c == "BCC" for r in annotation["result"] for c in r["value"].get("choices", [])), False
    )
    ls.annotations.update(id=annotation["id"], result=flipped)
    _dermassist(env, "sync", "--project", str(project.id))
    done = subprocess.run(
        [str(DERMASSIST), "study", "verify", str(bundle)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "answers changed" in done.stderr, done.stdout + done.stderr
