"""Reconcile the store with a Label Studio project's export, so a missed webhook loses nothing.

Label Studio sends webhooks once, with a 1 s timeout and no retry; a backend that was down, slow or
killed misses them. ``sync`` reads the project's full export and makes the store match it:
annotations that are new or newer are written (the same code as the webhook, so the rows are the
same), annotations the store holds for the project but the export no longer has are soft-deleted,
and skipped tasks are soft-deleted too. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from backend.collection.adjudication import ADJUDICATION, adjudicated_item, withdraw_adjudications
from backend.collection.ingest import EventError, apply_annotation
from backend.label_studio.client import LabelStudioError, connect, label_studio_errors
from backend.settings import Settings
from consensus.models import Annotation, GoldLabel, Item, Source
from consensus.repository import record_event, soft_delete_annotations
from labeling_config.parse import ProjectConfig

logger = logging.getLogger(__name__)


@dataclass
class SyncSummary:
    """What a sync did."""

    project: int
    tasks: int = 0
    annotations: int = 0
    created: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _withdraw_missing_adjudications(session: Session, items: set[str], seen: set[int]) -> int:
    """Soft-delete the adjudications of these items whose annotation the export no longer holds."""
    if not items:
        return 0
    rows = session.scalars(
        select(GoldLabel.ls_annotation_id)
        .join(Item, Item.id == GoldLabel.item_id)
        .where(
            Item.external_id.in_(sorted(items)),
            GoldLabel.source == ADJUDICATION,
            GoldLabel.deleted.is_(False),
            GoldLabel.ls_annotation_id.is_not(None),
        )
    ).all()
    return withdraw_adjudications(session, sorted({i for i in rows if i is not None and i not in seen}))


def sync_project(
    sessions: sessionmaker[Session],
    project: int,
    tasks: Iterable[Mapping[str, Any]],
    config: ProjectConfig,
) -> SyncSummary:
    """Make the store match ``tasks`` (a Label Studio JSON export of ``project``), in one transaction.

    Annotations that cannot be read are counted in ``errors`` and logged with their reason; the rest
    of the export still lands.
    """
    summary = SyncSummary(project=project)
    seen: set[int] = set()
    adjudicated: set[str] = set()  # items adjudicated by this project's tasks (an adjudication project)
    problems: list[str] = []
    with sessions() as session:
        for task in tasks:
            summary.tasks += 1
            source = adjudicated_item(task.get("data") if isinstance(task.get("data"), Mapping) else None)
            if source is not None:
                adjudicated.add(source)
            for annotation in task.get("annotations") or []:
                summary.annotations += 1
                if isinstance(annotation.get("id"), int):
                    seen.add(annotation["id"])
                try:
                    outcome = apply_annotation(session, annotation, task, config, Source.SYNC, project)
                except EventError as exc:
                    summary.errors += 1
                    problems.append(str(exc))
                    logger.warning("sync: %s", exc)
                    continue
                summary.created += outcome.created
                summary.changed += outcome.changed
                summary.deleted += outcome.deleted
                if not (outcome.created or outcome.changed or outcome.deleted):
                    summary.unchanged += 1
        stale = session.scalars(
            select(Annotation.ls_annotation_id)
            .join(Item, Annotation.item_id == Item.id)
            .where(
                Item.ls_project_id == project,
                Annotation.deleted.is_(False),
                Annotation.ls_annotation_id.is_not(None),
            )
        ).all()
        gone = [i for i in stale if i is not None and i not in seen]
        summary.deleted += soft_delete_annotations(session, gone)
        summary.deleted += _withdraw_missing_adjudications(session, adjudicated, seen)
        record_event(
            session,
            Source.SYNC,
            "SYNC",
            {"summary": summary.as_dict(), "problems": problems[:100]},
            ls_project_id=project,
        )
        session.commit()
    logger.info("sync of project %d: %s", project, summary.as_dict())
    return summary


def sync_from_label_studio(settings: Settings, sessions: sessionmaker[Session], project: int) -> SyncSummary:
    """Read a project's config and export through label-studio-sdk and reconcile the store.

    Raises:
        LabelStudioError: Label Studio is not configured, unreachable or refuses the key.
    """
    from labeling_config.parse import parse_config

    url, key = settings.label_studio_url, settings.label_studio_api_key
    if not url or not key:
        raise LabelStudioError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to sync from Label Studio")
    with connect(url, key) as ls, label_studio_errors(url):
        xml = ls.label_config(project)
        tasks = ls.export_tasks(project)
        emails = user_emails(ls)
    return sync_project(sessions, project, [with_emails(t, emails) for t in tasks], parse_config(xml))


def user_emails(ls: Any) -> dict[int, str]:
    """Label Studio user id -> e-mail; empty where the user list cannot be read (a key without the
    right to list users): readers are then named by their id, as before."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        return {int(u.id): str(u.email) for u in ls.users.list() if u.id is not None and u.email}
    except (ApiError, httpx.HTTPError, ValueError, TypeError) as exc:  # the names are a nicety
        logger.info("sync: the user list could not be read (%s); readers are named by id", exc)
        return {}


def with_emails(task: Mapping[str, Any], emails: Mapping[int, str]) -> Mapping[str, Any]:
    """An exported task whose annotations name their reader by id only, given the reader's e-mail too
    (as a webhook gives it), so a reader first seen through a sync is stored under their e-mail."""
    annotations = task.get("annotations")
    if not isinstance(annotations, list):
        return task
    named = []
    for annotation in annotations:
        who = annotation.get("completed_by") if isinstance(annotation, Mapping) else None
        if isinstance(who, int) and not isinstance(who, bool) and who in emails:
            annotation = {**annotation, "completed_by": {"id": who, "email": emails[who]}}
        named.append(annotation)
    return {**task, "annotations": named}


class PeriodicSync:
    """``serve``'s background reconciliation of ``SYNC_PROJECTS`` every ``SYNC_INTERVAL`` seconds."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeriodicSync:
        self._thread = threading.Thread(target=self._loop, name="dermassist-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.sync_interval):
            for project in self.settings.sync_projects:
                try:
                    sync_from_label_studio(self.settings, self.sessions, project)
                except Exception as exc:  # the next round tries again
                    logger.warning("periodic sync of project %d failed: %s", project, exc)
