"""Adjudication: the adjudicator's annotations become gold of the adjudicated item (webhook and sync, on
SQLite and PostgreSQL), and the adjudication tasks carry every reading and what is disputed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from backend.collection.ingest import EventError, apply_event
from backend.collection.sync import sync_project, with_emails
from backend.label_studio.adjudication import (
    DISPUTED_KEYS,
    SOURCE_ITEM,
    SOURCE_TASK,
    adjudication_tasks,
    reader_predictions,
)
from consensus.db import init_db
from consensus.models import Annotation, Source
from consensus.repository import get_or_create_item
from consensus.repository.gold import gold_table
from labeling_config import load_config
from labeling_config.parse import parse_config

CONFIG = parse_config(load_config("bcc"))


def resolve(_project: int | None, _obj: Any) -> Any:
    return CONFIG


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(store_url)
    with factory.begin() as session:
        get_or_create_item(session, "ls-3", ls_task_id=3, ls_project_id=1)
    yield factory
    engine.dispose()


def result(diagnosis: str, patterns: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    items = [
        {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [diagnosis]}}
    ]
    if patterns:
        items.append(
            {
                "from_name": "patterns",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": list(patterns)},
            }
        )
    return items


def adjudication_event(
    action: str = "ANNOTATION_CREATED", diagnosis: str = "BCC", patterns: tuple[str, ...] = (), keys: str | None = "bcc",
    source_item: str = "ls-3", annotation: int = 70,
) -> dict[str, Any]:  # fmt: skip
    data: dict[str, Any] = {"image": "/x.png", SOURCE_ITEM: source_item, SOURCE_TASK: 3}
    if keys is not None:
        data[DISPUTED_KEYS] = keys
    return {
        "action": action,
        "annotation": {"id": annotation, "task": 90, "completed_by": {"id": 9, "email": "senior@derm.org"},
                       "result": result(diagnosis, patterns)},
        "task": {"id": 90, "data": data},
        "project": {"id": 2},
    }  # fmt: skip


def apply(sessions: sessionmaker[Session], payload: dict[str, Any]) -> None:
    with sessions.begin() as session:
        apply_event(session, payload, resolve, Source.WEBHOOK)


def gold(sessions: sessionmaker[Session]) -> dict[tuple[str, str], tuple[Any, str, str]]:
    with sessions() as session:
        table, _ = gold_table(session)
    return {(r.task, r.label_key): (r.value, r.source, r.reference) for r in table.itertuples()}


def test_an_adjudication_is_gold_of_the_adjudicated_item_not_a_reading(sessions):
    apply(sessions, adjudication_event(patterns=("Ulceration",)))
    assert gold(sessions) == {
        ("ls-3", "bcc"): (1, "adjudication", "senior@derm.org"),
        # Not disputed, but marked present: a statement. The other patterns, unmarked, are not.
        ("ls-3", "ulceration"): (1, "adjudication", "senior@derm.org"),
    }
    with sessions() as session:
        assert session.scalars(select(Annotation)).all() == []


def test_an_update_replaces_and_a_delete_or_skip_withdraws(sessions):
    apply(sessions, adjudication_event(patterns=("Ulceration",)))
    apply(sessions, adjudication_event("ANNOTATION_UPDATED", diagnosis="non-BCC"))
    assert gold(sessions) == {("ls-3", "bcc"): (0, "adjudication", "senior@derm.org")}
    apply(sessions, adjudication_event("ANNOTATION_UPDATED", diagnosis="non-BCC"))  # a replay
    assert len(gold(sessions)) == 1
    apply(sessions, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 70}], "project": {"id": 2}})
    assert gold(sessions) == {}
    apply(sessions, adjudication_event("ANNOTATION_UPDATED"))
    assert gold(sessions)[("ls-3", "bcc")][0] == 1
    skipped = adjudication_event("ANNOTATION_UPDATED")
    skipped["annotation"]["was_cancelled"] = True
    apply(sessions, skipped)
    assert gold(sessions) == {}


def test_without_disputed_keys_every_answered_label_is_gold(sessions):
    apply(sessions, adjudication_event(keys=None))
    assert {k for _, k in gold(sessions)} == {"bcc", "pigment_network", "ulceration", "ovoid_nests",
        "multiple_globules", "maple_leaf", "spoke_wheel", "arborizing_telangiectasia"}  # fmt: skip


def test_an_adjudication_of_an_unknown_item_is_refused(sessions):
    with sessions() as session, pytest.raises(EventError, match="not in the store"):
        apply_event(session, adjudication_event(source_item="ls-404"), resolve, Source.WEBHOOK)


def test_a_sync_of_the_adjudication_project_adds_and_withdraws(sessions):
    payload = adjudication_event()
    task = {**payload["task"], "annotations": [payload["annotation"]]}
    summary = sync_project(sessions, 2, [task], CONFIG)
    assert summary.errors == 0 and gold(sessions)[("ls-3", "bcc")][0] == 1
    summary = sync_project(sessions, 2, [{**task, "annotations": []}], CONFIG)
    assert summary.deleted == 1 and gold(sessions) == {}


def test_a_synced_reader_is_named_by_e_mail():
    task = {"id": 1, "annotations": [{"id": 5, "completed_by": 4}, {"id": 6, "completed_by": 8}]}
    named = with_emails(task, {4: "a@derm.org"})
    assert named["annotations"][0]["completed_by"] == {"id": 4, "email": "a@derm.org"}
    assert named["annotations"][1]["completed_by"] == 8
    assert task["annotations"][0]["completed_by"] == 4  # the export itself is left as it was


def test_adjudication_tasks_show_every_reading_and_what_is_disputed():
    source = [
        {"id": 3, "data": {"image": "/a.png", "lesion_id": "L1"}, "annotations": [
            {"id": 1, "completed_by": 4, "result": result("BCC")},
            {"id": 2, "completed_by": {"id": 5, "email": "b@derm.org"}, "result": result("non-BCC")},
            {"id": 3, "completed_by": 6, "result": result("BCC"), "was_cancelled": True},
            {"id": 4, "completed_by": 7, "result": []},
        ]},
        {"id": 4, "data": {"image": "/b.png"}, "annotations": []},
    ]  # fmt: skip
    disputed = pd.DataFrame(
        [("ls-3", "bcc", "1", 0.55, 2, "0:1 1:1", "uncertain+no majority"),
         ("ls-3", "ulceration", "0", 0.6, 2, "0:2", "uncertain"),
         ("ls-9", "bcc", "1", 0.5, 2, "0:1 1:1", "no majority")],
        columns=["task", "label_key", "value", "posterior", "n_answers", "votes", "reason"],
    )  # fmt: skip
    (task,) = adjudication_tasks(source, disputed, "senior", run_id=12, emails={4: "a@derm.org"})
    data = task["data"]
    assert data["lesion_id"] == "L1" and data[SOURCE_ITEM] == "ls-3" and data[SOURCE_TASK] == 3
    assert data[DISPUTED_KEYS] == "bcc,ulceration" and data["dermassist_run"] == 12
    assert data["dermassist_disputed"].startswith(
        "bcc: uncertain+no majority (posterior 0.55 for 1; votes 0:1 1:1)"
    )
    assert [p["model_version"] for p in task["predictions"]] == ["reader: a@derm.org", "reader: b@derm.org"]
    assert reader_predictions(source[0])[0]["model_version"] == "reader: user 4"
