"""Label Studio events and exports into the store: one row per (task, rater), idempotent, soft deletes.

The webhook and the sync share this code, so an annotation reaches the same row whichever way it
came. The raw event is always kept (append-only log): :func:`ingest_webhook` writes it in the same
transaction as what it parsed, and alone (with the reason) when the event cannot be applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from backend.ls_annotations import AnnotationError, parse_result, timestamp, user_id
from consensus.models import Source
from consensus.repository import (
    get_or_create_item,
    get_or_create_rater,
    record_event,
    soft_delete_annotations,
    upsert_annotation,
)
from labeling_config.parse import ProjectConfig

logger = logging.getLogger(__name__)

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_EVENT = "ANNOTATIONS_DELETED"
TRAIN_EVENT = "START_TRAINING"

#: Resolves the labeling config of a project: (project id, the project object if the event had one).
ConfigResolver = Callable[[int | None, Mapping[str, Any] | None], ProjectConfig]


class EventError(ValueError):
    """An event that cannot be applied to the store; it is kept in the log with this message."""


@dataclass
class Outcome:
    """What one event did to the store."""

    action: str
    event_id: int | None = None
    created: int = 0
    changed: int = 0
    deleted: int = 0
    skipped: int = 0
    train: bool = False
    ignored: bool = False
    items: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: v for k, v in self.__dict__.items() if k not in ("items",) and v not in (0, False, None)
        } | {"action": self.action}


def project_id(payload: Mapping[str, Any]) -> int | None:
    """The project id of an event (``project`` is an object or an id; else the task's project)."""
    project = payload.get("project")
    if isinstance(project, Mapping):
        project = project.get("id")
    if project is None and isinstance(payload.get("task"), Mapping):
        project = payload["task"].get("project")
    if isinstance(project, bool) or not isinstance(project, int):
        return None
    return project


def _task_id(task: Mapping[str, Any] | None, annotation: Mapping[str, Any]) -> int:
    raw = task.get("id") if task is not None else annotation.get("task")
    if isinstance(raw, Mapping):
        raw = raw.get("id")
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise EventError(f"the annotation's task id is missing or not an integer ({raw!r})")
    return raw


def apply_annotation(
    session: Session,
    annotation: Mapping[str, Any],
    task: Mapping[str, Any] | None,
    config: ProjectConfig,
    source: Source,
    ls_project: int | None,
) -> Outcome:
    """Insert, replace or (for a skipped task) soft-delete one Label Studio annotation.

    Raises:
        EventError: for an annotation that cannot be read (nothing is written then).
    """
    outcome = Outcome(action="annotation")
    annotation_id = annotation.get("id")
    if isinstance(annotation_id, bool) or not isinstance(annotation_id, int):
        raise EventError(f"the annotation has no integer id ({annotation_id!r})")
    task_id = _task_id(task, annotation)
    if annotation.get("was_cancelled"):
        outcome.deleted = soft_delete_annotations(session, [annotation_id])
        outcome.skipped = 1
        return outcome
    try:
        parsed = parse_result(annotation.get("result", []), config)
        rater_id = user_id(annotation.get("completed_by"))
    except AnnotationError as exc:
        raise EventError(f"annotation {annotation_id} of task {task_id}: {exc}") from exc
    data = task.get("data") if task is not None and isinstance(task.get("data"), Mapping) else None
    image = data.get(config.image_key) if data is not None else None
    item = get_or_create_item(
        session,
        external_id=f"ls-{task_id}",
        ls_task_id=task_id,
        image=image if isinstance(image, str) else None,
        data=data,
        ls_project_id=ls_project,
    )
    email = (
        annotation.get("completed_by", {}).get("email")
        if isinstance(annotation.get("completed_by"), Mapping)
        else None
    )
    rater = get_or_create_rater(session, name=email, ls_user_id=rater_id)
    result = upsert_annotation(
        session,
        item,
        rater,
        parsed.labels,
        source,
        diagnosis=parsed.diagnosis,
        regions=parsed.regions,
        ls_annotation_id=annotation_id,
        updated_at=timestamp(annotation.get("updated_at")),
    )
    outcome.created, outcome.changed = int(result.created), int(result.changed and not result.created)
    outcome.items.append(item.id)
    return outcome


def apply_event(
    session: Session, payload: Mapping[str, Any], resolve: ConfigResolver, source: Source
) -> Outcome:
    """Apply one Label Studio webhook event to the store (the caller owns the transaction).

    Raises:
        EventError: for an event that cannot be applied.
    """
    action = payload.get("action")
    if not isinstance(action, str):
        raise EventError("the event has no action")
    ls_project = project_id(payload)
    if action in ANNOTATION_EVENTS:
        annotation, task = payload.get("annotation"), payload.get("task")
        if not isinstance(annotation, Mapping):
            raise EventError(f"{action} without an annotation object")
        if task is not None and not isinstance(task, Mapping):
            raise EventError(f"{action}: task must be an object")
        project = payload.get("project") if isinstance(payload.get("project"), Mapping) else None
        outcome = apply_annotation(
            session, annotation, task, resolve(ls_project, project), source, ls_project
        )
        outcome.action = action
        return outcome
    if action == DELETE_EVENT:
        annotations = payload.get("annotations")
        if not isinstance(annotations, list):
            raise EventError(f"{action} without an annotations list")
        raw = [a.get("id") if isinstance(a, Mapping) else a for a in annotations]
        ids = [i for i in raw if isinstance(i, int) and not isinstance(i, bool)]
        if len(ids) != len(raw):
            raise EventError(f"{action}: every annotation needs an integer id")
        return Outcome(action=action, deleted=soft_delete_annotations(session, ids))
    if action == TRAIN_EVENT:
        return Outcome(action=action, train=True)
    return Outcome(action=action, ignored=True)


def ingest_webhook(
    sessions: sessionmaker[Session],
    payload: Mapping[str, Any],
    resolve: ConfigResolver,
    lock: AbstractContextManager[Any] | None = None,
) -> tuple[Outcome, str | None]:
    """Keep the raw event and apply it, in one transaction; keep it alone when it cannot be applied.

    Args:
        sessions: the store.
        payload: the event as received.
        resolve: the project's labeling config.
        lock: held around the write (SQLite: threads of one process queue here instead of in
            SQLite's busy handler, whose back-off sleeps make the latency tail long).

    Returns:
        What it did, and the reason it could not be applied (None when it was).
    """
    with lock if lock is not None else nullcontext():
        return _ingest(sessions, payload, resolve)


def _ingest(
    sessions: sessionmaker[Session], payload: Mapping[str, Any], resolve: ConfigResolver
) -> tuple[Outcome, str | None]:
    action = str(payload.get("action", ""))[:64]
    ls_project = project_id(payload)
    with sessions() as session:
        try:
            event = record_event(session, Source.WEBHOOK, action, payload, ls_project)
            outcome = apply_event(session, payload, resolve, Source.WEBHOOK)
            outcome.event_id = event.id
            session.commit()
            return outcome, None
        except EventError as exc:
            reason = str(exc)
        except SQLAlchemyError as exc:
            logger.exception("event %s could not be applied", action)
            reason = f"the store refused the event ({type(exc).__name__})"
        session.rollback()
    with sessions() as session:
        event = record_event(session, Source.WEBHOOK, action, payload, ls_project, error=reason)
        session.commit()
        logger.warning("kept event %s unapplied: %s", event.id, reason)
        return Outcome(action=action, event_id=event.id), reason
