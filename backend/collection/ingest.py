"""Label Studio events and exports into the store: one row per (task, rater), idempotent, soft deletes.

The webhook and the sync share this code, so an annotation reaches the same row whichever way it
came. The raw event is always kept (append-only log): :func:`ingest_webhook` writes it in the same
transaction as what it parsed, and alone (with the reason) when the event cannot be applied.

What a client sends is checked before the store sees it, so nothing in an event can make the store
fail: ids are integers within SQL's 64-bit range, no string holds a NUL byte (PostgreSQL text cannot),
e-mails and values fit their columns. A refused event is still kept, made storable (NUL bytes
replaced, a huge payload truncated). Transient store errors (a restart, a failover, a serialization
failure, a busy SQLite) are retried with a bounded back-off inside Label Studio's 1 s budget; an
event the store still cannot take goes to the on-disk spool (:mod:`backend.collection.spool`) and is applied
when the store is back.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from backend.collection.adjudication import (
    adjudicated_item,
    apply_adjudication,
    disputed_keys,
    withdraw_adjudications,
)
from backend.collection.spool import EventSpool
from backend.label_studio.annotations import MAX_ID as MAX_ID  # SQL's BIGINT: the API reads it here
from backend.label_studio.annotations import (
    AnnotationError,
    ParsedAnnotation,
    parent_prediction,
    parse_result,
    timestamp,
    user_id,
)
from consensus.models import Source, utcnow
from consensus.repository import (
    MAX_MODEL_VERSION_CHARS,
    Exposure,
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
KNOWN_ACTIONS = (*ANNOTATION_EVENTS, DELETE_EVENT, TRAIN_EVENT)  # the webhook metric's label values

#: Resolves the labeling config of a project: (project id, the project object if the event had one).
ConfigResolver = Callable[[int | None, Mapping[str, Any] | None], ProjectConfig]


MAX_NAME_CHARS = 200  # raters.name
MAX_VALUE_CHARS = 64  # annotations.diagnosis, annotation_events.action
#: A refused event larger than this is kept truncated to it (as text) in the raw log.
MAX_KEPT_BYTES = 256 * 1024
#: Retries of transient store errors stop this long after the event arrived (Label Studio waits 1 s).
RETRY_BUDGET_S = 0.6


class EventError(ValueError):
    """An event that cannot be applied to the store; it is kept in the log with this message."""


def check_id(value: Any, where: str) -> int:
    """A Label Studio id: an integer in 1..2**63-1 (SQL BIGINT).

    Raises:
        EventError: naming the field.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(f"{where} must be an integer id, got {_short(value)}")
    if not 0 < value <= MAX_ID:
        raise EventError(f"{where} is {value}, outside the ids SQL stores (1 to 2**63-1)")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_WALKED = (str, float, dict, list)  # concrete types: an ABC check per RLE number is slow
_SCALARS = frozenset({int, bool, type(None)})


def _path(path: Any) -> str:
    """A lazily built field path: ``str`` or ``(parent, index)`` (no string per RLE number)."""
    parts = []
    while isinstance(path, tuple):
        path, index = path
        parts.append(f"[{index}]")
    return path + "".join(reversed(parts))  # type: ignore[no-any-return]


def check_text(payload: Any, where: str = "event") -> None:
    """Refuse NUL bytes (PostgreSQL text cannot hold them) and non-finite numbers anywhere in an event.

    Raises:
        EventError: naming the first offending field.
    """
    stack: list[tuple[Any, Any]] = [(where, payload)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise EventError(f"{_path(path)} contains a NUL byte")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise EventError(f"{_path(path)} is {value}, not a finite number")
        elif isinstance(value, dict):
            for key, child in value.items():
                if isinstance(key, str) and "\x00" in key:
                    raise EventError(f"{_path(path)} has a key with a NUL byte")
                if isinstance(child, _WALKED):
                    stack.append((f"{_path(path)}.{key}", child))
        elif isinstance(value, list) and not _SCALARS.issuperset(map(type, value)):  # an RLE: at C speed
            stack.extend(((path, i), child) for i, child in enumerate(value) if isinstance(child, _WALKED))


def storable(payload: Any) -> dict[str, Any]:
    """A refused event as the raw log can keep it: NUL bytes replaced, non-finite numbers as text,
    and, above :data:`MAX_KEPT_BYTES`, the first bytes of its JSON only."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("\x00", "\ufffd")
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, Mapping):
            return {clean(str(k)): clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    kept = clean(payload if isinstance(payload, Mapping) else {"body": payload})
    text = json.dumps(kept)
    if len(text) > MAX_KEPT_BYTES:
        return {"truncated": True, "bytes": len(text), "head": text[:MAX_KEPT_BYTES]}
    return kept  # type: ignore[no-any-return]


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
    queued: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (0, False, None)} | {"action": self.action}


def project_id(payload: Mapping[str, Any]) -> int | None:
    """The project id of an event (``project`` is an object or an id; else the task's project)."""
    project = payload.get("project")
    if isinstance(project, Mapping):
        project = project.get("id")
    if project is None and isinstance(payload.get("task"), Mapping):
        project = payload["task"].get("project")
    if isinstance(project, bool) or not isinstance(project, int) or not 0 < project <= MAX_ID:
        return None
    return project


def _task_id(task: Mapping[str, Any] | None, annotation: Mapping[str, Any]) -> int:
    raw = task.get("id") if task is not None else annotation.get("task")
    if isinstance(raw, Mapping):
        raw = raw.get("id")
    return check_id(raw, "task.id" if task is not None else "annotation.task")


def apply_annotation(
    session: Session,
    annotation: Mapping[str, Any],
    task: Mapping[str, Any] | None,
    config: ProjectConfig,
    source: Source,
    ls_project: int | None,
    received_at: datetime | None = None,
) -> Outcome:
    """Insert, replace or (for a skipped task) soft-delete one Label Studio annotation.

    Raises:
        EventError: for an annotation that cannot be read (nothing is written then).
    """
    outcome = Outcome(action="annotation")
    annotation_id = check_id(annotation.get("id"), "annotation.id")
    task_id = _task_id(task, annotation)
    if annotation.get("was_cancelled"):
        updated = timestamp(annotation.get("updated_at"))
        outcome.deleted = soft_delete_annotations(session, [annotation_id], at=updated or received_at)
        outcome.deleted += withdraw_adjudications(session, [annotation_id])
        outcome.skipped = 1
        return outcome
    try:
        parsed = parse_result(annotation.get("result", []), config)
        rater_id = check_id(user_id(annotation.get("completed_by")), "annotation.completed_by")
        parent = parent_prediction(annotation, task, config, MAX_MODEL_VERSION_CHARS)
    except AnnotationError as exc:
        raise EventError(f"annotation {annotation_id} of task {task_id}: {exc}") from exc
    if parsed.diagnosis is not None and len(parsed.diagnosis) > MAX_VALUE_CHARS:
        raise EventError(
            f"annotation {annotation_id}: the diagnosis is longer than {MAX_VALUE_CHARS} characters"
        )
    shown = parent.shown
    if shown is not None and shown.diagnosis is not None and len(shown.diagnosis) > MAX_VALUE_CHARS:
        shown = None  # what the prediction showed is kept only where it fits, like the rater's own
    data = task.get("data") if task is not None and isinstance(task.get("data"), Mapping) else None
    adjudicated = adjudicated_item(data)
    if adjudicated is not None:
        keys = disputed_keys(data)
        return _apply_adjudication(
            session, outcome, annotation, (adjudicated, keys), parsed, annotation_id, rater_id
        )
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
    if email is not None and (not isinstance(email, str) or len(email) > MAX_NAME_CHARS):
        raise EventError(f"annotation.completed_by.email must be text of at most {MAX_NAME_CHARS} characters")
    rater = get_or_create_rater(session, name=email or None, ls_user_id=rater_id)
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
        exposure=Exposure(
            prediction=parent.id,
            model_version=parent.model_version,
            labels=shown.labels if shown is not None else None,
            diagnosis=shown.diagnosis if shown is not None else None,
        ),
    )
    outcome.created, outcome.changed = int(result.created), int(result.changed and not result.created)
    return outcome


def _apply_adjudication(
    session: Session,
    outcome: Outcome,
    annotation: Mapping[str, Any],
    target: tuple[str, frozenset[str] | None],
    parsed: ParsedAnnotation,
    annotation_id: int,
    rater_id: int,
) -> Outcome:
    """An annotation of an adjudication task: its labels become gold of the adjudicated item."""
    completed_by = annotation.get("completed_by")
    email = completed_by.get("email") if isinstance(completed_by, Mapping) else None
    adjudicator = (
        email if isinstance(email, str) and 0 < len(email) <= MAX_NAME_CHARS else f"ls-user-{rater_id}"
    )
    try:
        written, _ = apply_adjudication(session, target[0], parsed, annotation_id, adjudicator, target[1])
    except LookupError as exc:
        raise EventError(f"annotation {annotation_id}: {exc}") from exc
    outcome.changed = written
    return outcome


def apply_event(
    session: Session,
    payload: Mapping[str, Any],
    resolve: ConfigResolver,
    source: Source,
    received_at: datetime | None = None,
) -> Outcome:
    """Apply one Label Studio webhook event to the store (the caller owns the transaction).

    Args:
        received_at: when the event arrived (a deletion's time; default now).

    Raises:
        EventError: for an event that cannot be applied.
    """
    action = payload.get("action")
    if not isinstance(action, str):
        raise EventError("the event has no action")
    if len(action) > MAX_VALUE_CHARS:
        raise EventError(f"action is longer than {MAX_VALUE_CHARS} characters")
    check_text(payload)
    ls_project = project_id(payload)
    if action in ANNOTATION_EVENTS:
        annotation, task = payload.get("annotation"), payload.get("task")
        if not isinstance(annotation, Mapping):
            raise EventError(f"{action} without an annotation object")
        if task is not None and not isinstance(task, Mapping):
            raise EventError(f"{action}: task must be an object")
        project = payload.get("project") if isinstance(payload.get("project"), Mapping) else None
        outcome = apply_annotation(
            session, annotation, task, resolve(ls_project, project), source, ls_project, received_at
        )
        outcome.action = action
        return outcome
    if action == DELETE_EVENT:
        annotations = payload.get("annotations")
        if not isinstance(annotations, list):
            raise EventError(f"{action} without an annotations list")
        raw = [a.get("id") if isinstance(a, Mapping) else a for a in annotations]
        ids = [check_id(i, f"annotations[{n}].id") for n, i in enumerate(raw)]
        deleted = soft_delete_annotations(session, ids, at=received_at) + withdraw_adjudications(session, ids)
        return Outcome(action=action, deleted=deleted)
    if action == TRAIN_EVENT:
        return Outcome(action=action, train=True)
    return Outcome(action=action, ignored=True)


def is_transient(exc: BaseException) -> bool:
    """Whether a store error may pass on its own (lost connection, restart, failover, serialization
    failure or deadlock, a busy SQLite): such events are retried, then spooled, never refused."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (OperationalError, InterfaceError))


def ingest_webhook(
    sessions: sessionmaker[Session],
    payload: Mapping[str, Any],
    resolve: ConfigResolver,
    lock: AbstractContextManager[Any] | None = None,
    spool: EventSpool | None = None,
    received_at: datetime | None = None,
    budget_s: float = RETRY_BUDGET_S,
) -> tuple[Outcome, str | None]:
    """Keep the raw event and apply it, in one transaction; keep it alone when it cannot be applied.

    Args:
        sessions: the store.
        payload: the event as received.
        resolve: the project's labeling config.
        lock: held around the write (SQLite: threads of one process queue here instead of in
            SQLite's busy handler, whose back-off sleeps make the latency tail long).
        spool: where an event goes when the store stays away past the retries (None: raise).
        received_at: when it arrived (a spooled event's own time; default now).
        budget_s: how long transient store errors are retried.

    Returns:
        What it did (``queued`` when it went to the spool), and the reason it could not be applied
        (None when it was).

    Raises:
        SQLAlchemyError: the store stayed away and there is no spool to keep the event.
    """
    received = received_at or utcnow()
    deadline = time.monotonic() + budget_s
    with lock if lock is not None else nullcontext():
        delay = 0.01
        while True:
            try:
                return _ingest(sessions, payload, resolve, received)
            except SQLAlchemyError as exc:
                if not (is_transient(exc) or isinstance(exc, IntegrityError)):
                    raise
                if time.monotonic() + delay > deadline:
                    if isinstance(exc, IntegrityError):  # not a race after all: keep it with the reason
                        reason = f"the store refused the event ({type(exc).__name__})"
                        return record_refused(sessions, payload, reason, received), reason
                    if spool is None:
                        raise
                    logger.warning("the store is away (%s); the event waits in the spool", type(exc).__name__)
                    spool.put(dict(payload), received)
                    return Outcome(action=str(payload.get("action", ""))[:MAX_VALUE_CHARS], queued=True), None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)


def _ingest(
    sessions: sessionmaker[Session],
    payload: Mapping[str, Any],
    resolve: ConfigResolver,
    received_at: datetime,
) -> tuple[Outcome, str | None]:
    action = str(payload.get("action", ""))[:MAX_VALUE_CHARS]
    ls_project = project_id(payload)
    with sessions() as session:
        try:
            # apply_event checks the payload (NUL, non-finite numbers) before anything is written,
            # so the raw event below is storable; both land in this one transaction.
            outcome = apply_event(session, payload, resolve, Source.WEBHOOK, received_at)
            event = record_event(
                session, Source.WEBHOOK, action, payload, ls_project, received_at=received_at
            )
            outcome.event_id = event.id
            session.commit()
            return outcome, None
        except EventError as exc:
            reason = str(exc)
            session.rollback()
        except SQLAlchemyError as exc:
            session.rollback()
            if is_transient(exc) or isinstance(exc, IntegrityError):
                raise
            logger.exception("event %s could not be applied", action)
            reason = f"the store refused the event ({type(exc).__name__})"
    return record_refused(sessions, payload, reason, received_at), reason


def record_refused(
    sessions: sessionmaker[Session], payload: Any, reason: str, received_at: datetime | None = None
) -> Outcome:
    """Keep a refused event in the raw log (made storable) with why it was refused."""
    body = storable(payload)
    action = body.get("action") if isinstance(body.get("action"), str) else "MALFORMED"
    action = str(action)[:MAX_VALUE_CHARS]
    ls_project = project_id(body)
    with sessions() as session:
        event = record_event(
            session, Source.WEBHOOK, action, body, ls_project, error=reason[:2000], received_at=received_at
        )
        session.commit()
        logger.warning("kept event %s unapplied: %s", event.id, reason)
        return Outcome(action=action, event_id=event.id)
