"""The event spool: what the store could not take waits on disk, is claimed by one replayer, and is
applied once the store is back, with the time it arrived."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from backend.collection.spool import SUFFIX, EventSpool
from consensus.models import Annotation, AnnotationEvent
from tests.backend.test_app import annotation_event

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_put_then_replay_in_order_and_remove(tmp_path):
    spool = EventSpool(tmp_path / "spool")
    for i in range(3):
        spool.put({"n": i}, T0.replace(minute=i))
    assert len(spool.pending()) == 3 and not list((tmp_path / "spool").glob(".*.tmp"))
    seen: list[tuple[Any, datetime]] = []
    assert spool.replay(lambda payload, when: seen.append((payload["n"], when)) or True) == 3
    assert seen == [(0, T0), (1, T0.replace(minute=1)), (2, T0.replace(minute=2))]
    assert spool.pending() == []


def test_a_store_still_away_keeps_the_event_and_stops_the_round(tmp_path):
    spool = EventSpool(tmp_path / "spool")
    spool.put({"n": 0}, T0)
    spool.put({"n": 1}, T0.replace(minute=1))
    calls: list[int] = []
    assert spool.replay(lambda payload, _: calls.append(payload["n"]) or False) == 0
    assert calls == [0], "the round stops at the first failure, so order is kept"
    assert len(spool.pending()) == 2
    assert spool.replay(lambda *_: True) == 2


def test_a_claim_left_by_a_dead_process_is_taken_back(tmp_path):
    spool = EventSpool(tmp_path / "spool")
    path = spool.put({"n": 0}, T0)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    claimed = path.with_name(f"{path.name}.claimed-{int(dead.stdout)}")
    os.replace(path, claimed)
    alive = path.with_name(f"other{SUFFIX}.claimed-{os.getpid()}")  # ours: being applied right now
    alive.write_text("{}")
    assert spool.pending() == [path]
    assert alive.exists()


def test_a_store_outage_is_answered_202_and_applied_when_it_is_back(client, app, sessions, monkeypatch):
    state = app.extensions["dermassist"]
    real = state.sessions

    def broken() -> Any:
        raise OperationalError("connect", {}, ConnectionRefusedError("the store restarts"))

    monkeypatch.setattr(state, "sessions", broken)
    response = client.post("/webhook", json=annotation_event(annotation_id=77))
    assert response.status_code == 202 and response.get_json()["status"] == "queued"
    assert len(state.spool.pending()) == 1
    assert state.spool.replay(state.apply_spooled) == 0  # still away: kept
    monkeypatch.setattr(state, "sessions", real)
    assert state.spool.replay(state.apply_spooled) == 1
    with sessions() as session:
        assert [a.ls_annotation_id for a in session.scalars(select(Annotation))] == [77]
        (event,) = session.scalars(select(AnnotationEvent)).all()
        assert event.error is None
    assert state.spool.pending() == []


def test_spool_unwritable_too_is_a_503(client, app, monkeypatch):
    state = app.extensions["dermassist"]

    def broken() -> Any:
        raise OperationalError("connect", {}, ConnectionRefusedError("the store restarts"))

    def full(*_: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state, "sessions", broken)
    monkeypatch.setattr(state.spool, "put", full)
    response = client.post("/webhook", json=annotation_event())
    assert response.status_code == 503 and response.get_json()["error"] == "store_unavailable"
