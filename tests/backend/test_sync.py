"""Sync: a Label Studio export reconciles the store (missed webhooks, deletions, skipped tasks)."""

from __future__ import annotations

import copy
import json

from sqlalchemy import select

from backend.cli import main
from backend.collection.sync import sync_project
from consensus.models import Annotation, AnnotationEvent
from labeling_config.parse import parse_config
from tests.backend.conftest import LS_TOKEN
from tests.backend.study_events import BCC_XML, study_tasks, webhook_events

# The export label-studio-sdk asks for: every task, JSON.
EXPORT = "/api/projects/1/export?download_all_tasks=true&export_type=JSON"


def live(sessions) -> dict[int, dict]:
    with sessions() as session:
        rows = session.scalars(select(Annotation).where(Annotation.deleted.is_(False))).all()
        return {r.ls_annotation_id: r.labels for r in rows}


def test_sync_fills_what_webhooks_missed_and_is_idempotent(client, sessions, small_study):
    tasks = study_tasks(small_study, None, limit=10)
    events = webhook_events(tasks)
    for event in events[::3]:  # two webhooks in three were missed
        assert client.post("/webhook", json=event).status_code == 200
    assert len(live(sessions)) == len(events[::3])
    summary = sync_project(sessions, 1, tasks, parse_config(BCC_XML))
    assert summary.created == len(events) - len(events[::3]) and summary.errors == 0
    assert len(live(sessions)) == len(events)
    again = sync_project(sessions, 1, tasks, parse_config(BCC_XML))
    assert (again.created, again.changed, again.deleted, again.unchanged) == (0, 0, 0, len(events))


def test_sync_applies_updates_deletions_and_skips(sessions, small_study):
    config = parse_config(BCC_XML)
    tasks = study_tasks(small_study, None, limit=4)
    sync_project(sessions, 1, tasks, config)
    changed = copy.deepcopy(tasks)
    removed = changed[0]["annotations"].pop()  # deleted in Label Studio
    updated = changed[1]["annotations"][0]
    updated["result"][0]["value"]["choices"] = [
        "non-BCC" if updated["result"][0]["value"]["choices"] == ["BCC"] else "BCC"
    ]
    updated["updated_at"] = "2026-11-21T10:00:00Z"
    skipped = changed[2]["annotations"][0]
    skipped["was_cancelled"] = True
    summary = sync_project(sessions, 1, changed, config)
    assert summary.changed == 1 and summary.deleted == 2
    rows = live(sessions)
    assert removed["id"] not in rows and skipped["id"] not in rows
    assert rows[updated["id"]]["bcc"] == int(updated["result"][0]["value"]["choices"] == ["BCC"])


def test_sync_keeps_going_past_an_unreadable_annotation(sessions, small_study):
    tasks = study_tasks(small_study, None, limit=3)
    tasks[0]["annotations"][0]["result"][0]["value"]["choices"] = ["Dragon"]
    summary = sync_project(sessions, 1, tasks, parse_config(BCC_XML))
    assert summary.errors == 1 and summary.created == summary.annotations - 1
    with sessions() as session:
        (event,) = session.scalars(select(AnnotationEvent).where(AnnotationEvent.action == "SYNC")).all()
    assert "Dragon" in event.payload["problems"][0]


def test_sync_command_reads_the_export_through_label_studio_sdk(
    settings, sessions, image_server, small_study, monkeypatch, capsys
):
    url, files = image_server
    tasks = study_tasks(small_study, None, limit=5)
    files.routes["/api/projects/1/"] = (
        200,
        {"Content-Type": "application/json"},
        json.dumps({"id": 1, "label_config": BCC_XML}).encode(),
    )
    files.routes[EXPORT] = (
        200,
        {"Content-Type": "application/json"},
        json.dumps(tasks).encode(),
    )
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LS_TOKEN)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["sync", "--project", "1"]) == 0
    assert f"annotations={sum(len(t['annotations']) for t in tasks)}" in capsys.readouterr().out
    assert len(live(sessions)) == sum(len(t["annotations"]) for t in tasks)
    assert all(h.get("Authorization") == f"Token {LS_TOKEN}" for p, h in files.seen if p.startswith("/api/"))


def test_sync_command_says_what_is_wrong_in_one_line(settings, image_server, monkeypatch, capsys):
    url, _ = image_server  # no project here: every API route answers 404
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LS_TOKEN)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["sync", "--project", "7"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "LABEL_STUDIO_URL" in err and LS_TOKEN not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_syncs_periodically(settings, sessions, image_server, small_study):
    import time

    from backend.collection.sync import PeriodicSync
    from tests.backend.conftest import with_settings

    _, files = image_server
    tasks = study_tasks(small_study, None, limit=3)
    files.routes["/api/projects/1/"] = (200, {}, json.dumps({"id": 1, "label_config": BCC_XML}).encode())
    files.routes[EXPORT] = (
        200,
        {},
        json.dumps(tasks).encode(),
    )
    syncer = PeriodicSync(with_settings(settings, sync_interval=0.2, sync_projects=(1,)), sessions).start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(live(sessions)) < sum(len(t["annotations"]) for t in tasks):
            time.sleep(0.1)
    finally:
        syncer.stop()
    assert len(live(sessions)) == sum(len(t["annotations"]) for t in tasks)
