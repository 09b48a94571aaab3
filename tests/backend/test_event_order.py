"""Deletes win over older versions, in every order of created / updated / deleted / replayed, on
SQLite and PostgreSQL; concurrent first events of one task create one item, one rater, no error."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from backend.collection.ingest import apply_event
from consensus.db import init_db
from consensus.models import Annotation, AnnotationDeletion, Item, Rater, Source
from labeling_config import load_config
from labeling_config.parse import parse_config

CONFIG = parse_config(load_config("bcc"))


def resolve(_project: int | None, _obj: Any) -> Any:
    return CONFIG


def event(
    action: str, updated_at: str | None, choice: str = "BCC", annotation: int = 7, task: int = 3
) -> dict:
    if action == "ANNOTATIONS_DELETED":
        return {"action": action, "annotations": [{"id": annotation}], "project": {"id": 1}}
    body: dict[str, Any] = {
        "id": annotation,
        "task": task,
        "completed_by": {"id": 5, "email": "derm@example.org"},
        "result": [
            {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}
        ],
    }
    if updated_at is not None:
        body["updated_at"] = updated_at
    return {
        "action": action,
        "annotation": body,
        "task": {"id": task, "data": {"image": "/x.png"}},
        "project": {"id": 1},
    }


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(store_url)
    yield factory
    engine.dispose()


def apply(sessions: sessionmaker[Session], payload: dict, received_at: datetime | None = None) -> None:
    with sessions() as session:
        apply_event(session, payload, resolve, Source.WEBHOOK, received_at)
        session.commit()


def stored(sessions: sessionmaker[Session]) -> list[tuple[bool, str | None]]:
    with sessions() as session:
        return [(a.deleted, a.diagnosis) for a in session.scalars(select(Annotation))]


CREATED = event("ANNOTATION_CREATED", "2026-11-20T10:00:00Z", "non-BCC")
UPDATED = event("ANNOTATION_UPDATED", "2026-11-20T11:00:00Z", "BCC")
DELETED = event("ANNOTATIONS_DELETED", None)
DELETE_AT = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # the delete arrived at noon
ORDERS = list(itertools.permutations(["created", "updated", "deleted", "replayed"]))


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_a_deletion_wins_over_every_version_not_newer_in_any_order(sessions, order):
    events = {"created": CREATED, "updated": UPDATED, "deleted": DELETED, "replayed": UPDATED}
    for name in order:
        apply(sessions, events[name], DELETE_AT if name == "deleted" else None)
    rows = stored(sessions)
    assert len(rows) == 1 and rows[0][0], f"{order} left the reading live"
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(AnnotationDeletion)) == 1

    # A version made after the deletion brings the reading back, whatever came before it.
    apply(sessions, event("ANNOTATION_UPDATED", "2026-11-20T13:00:00Z", "non-BCC"))
    assert stored(sessions) == [(False, "non-BCC")]
    # ...and a replay of the old update afterwards changes nothing.
    apply(sessions, UPDATED)
    assert stored(sessions) == [(False, "non-BCC")]


def test_an_update_without_a_time_does_not_undelete(sessions):
    apply(sessions, CREATED)
    apply(sessions, DELETED)
    apply(sessions, event("ANNOTATION_UPDATED", None, "BCC"))
    assert stored(sessions) == [(True, "non-BCC")]


def test_a_delete_covers_the_version_it_deleted_even_if_label_studios_clock_is_ahead(sessions):
    # Label Studio's clock says 12:30 for the update; our clock received the delete at 12:00.
    apply(sessions, event("ANNOTATION_UPDATED", "2026-11-20T12:30:00Z", "BCC"))
    apply(sessions, DELETED, DELETE_AT)
    apply(sessions, event("ANNOTATION_UPDATED", "2026-11-20T12:30:00Z", "BCC"))  # the replay
    assert stored(sessions) == [(True, "BCC")]


def test_sync_follows_the_same_rule(sessions):
    from backend.collection.sync import sync_project

    apply(sessions, CREATED)
    apply(sessions, DELETED, DELETE_AT)
    stale_export = [{"id": 3, "data": {"image": "/x.png"}, "annotations": [UPDATED["annotation"]]}]
    summary = sync_project(sessions, 1, stale_export, CONFIG)
    assert summary.errors == 0 and summary.changed == 0 and summary.created == 0
    assert stored(sessions) == [(True, "non-BCC")]


def test_concurrent_first_events_of_the_same_tasks_create_one_item_and_one_rater_each(sessions):
    """Eight writers, each the first to see tasks 1..10 for its own rater (and one shared rater)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def writer(w: int) -> None:
        try:
            barrier.wait()
            for task in range(1, 11):
                payload = event(
                    "ANNOTATION_CREATED", "2026-11-20T10:00:00Z", annotation=task * 100 + w, task=task
                )
                payload["annotation"]["completed_by"] = {
                    "id": 10 + w % 4,
                    "email": f"rater{w % 4}@example.org",
                }
                for attempt in range(20):
                    try:
                        apply(sessions, payload)
                        break
                    except Exception as exc:  # SQLite's lock (the app serialises its writers)
                        if "locked" not in str(exc) or attempt == 19:
                            raise
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Item)) == 10
        assert session.scalar(select(func.count()).select_from(Rater)) == 4
        # four raters per task: two writers share each rater, the later of their versions is kept
        assert session.scalar(select(func.count()).select_from(Annotation)) == 40


def test_a_rater_name_held_by_another_user_is_not_merged(sessions):
    first = event("ANNOTATION_CREATED", "2026-11-20T10:00:00Z", annotation=1, task=1)
    second = event("ANNOTATION_CREATED", "2026-11-20T10:00:00Z", annotation=2, task=1)
    second["annotation"]["completed_by"] = {"id": 6, "email": "derm@example.org"}
    apply(sessions, first)
    apply(sessions, second)
    with sessions() as session:
        raters = sorted((r.ls_user_id, r.name) for r in session.scalars(select(Rater)))
    assert raters == [(5, "derm@example.org"), (6, "derm@example.org (ls-user-6)")]


def test_deletion_time_defaults_to_now(sessions):
    apply(sessions, CREATED)
    apply(sessions, DELETED)
    with sessions() as session:
        tombstone = session.get_one(AnnotationDeletion, 7)
        when = (
            tombstone.deleted_at if tombstone.deleted_at.tzinfo else tombstone.deleted_at.replace(tzinfo=UTC)
        )
    assert abs(when - datetime.now(UTC)) < timedelta(minutes=1)
