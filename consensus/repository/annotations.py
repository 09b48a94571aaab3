"""Annotations, raters, items and raw events in the store: idempotent, race-free writes.

The same Label Studio annotation id twice is one row; an update replaces the values (unless it is
older than what is stored: replays may arrive out of order); a delete is soft and recorded."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from consensus.models import (
    Annotation,
    AnnotationDeletion,
    AnnotationEvent,
    Base,
    Item,
    Rater,
    Source,
    utcnow,
)
from labeling_config import TARGETS

logger = logging.getLogger(__name__)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def insert_if_absent(session: Session, model: type[Base], values: Mapping[str, Any]) -> Any | None:
    """INSERT one row unless it would violate a unique constraint; return its primary key, or None.

    Race-free on every supported store: two transactions inserting the same row at once (two
    raters' first events for a task the store has not seen) give one row and no error. PostgreSQL
    and SQLite use ``INSERT ... ON CONFLICT DO NOTHING``; other dialects a savepoint.
    """
    bind = session.get_bind()
    table: Any = model.__table__
    statement: Any
    if bind.dialect.name == "postgresql":
        statement = pg_insert(table).values(**values).on_conflict_do_nothing()
    elif bind.dialect.name == "sqlite":
        statement = sqlite_insert(table).values(**values).on_conflict_do_nothing()
    else:
        try:
            with session.begin_nested():
                result: Any = session.execute(insert(table).values(**values))
        except IntegrityError:
            return None
        key = result.inserted_primary_key
        return key[0] if key else None
    primary = next(iter(table.primary_key.columns))
    return session.execute(statement.returning(primary)).scalar()


def get_or_create_rater(session: Session, name: str | None = None, ls_user_id: int | None = None) -> Rater:
    """The rater with this Label Studio user id (or name), created when new (race-free).

    A name already held by another Label Studio user gets the user id appended, so two users are
    never merged into one rater.

    Raises:
        ValueError: when neither a name nor a user id is given.
    """
    if name is None and ls_user_id is None:
        raise ValueError("a rater needs a name or a Label Studio user id")
    for _ in range(3):  # a concurrent creation may take the name between our look and our insert
        rater = None
        if ls_user_id is not None:
            rater = session.scalars(select(Rater).where(Rater.ls_user_id == ls_user_id)).first()
        if rater is None and name is not None:
            rater = session.scalars(select(Rater).where(Rater.name == name)).first()
            if rater is not None and ls_user_id is not None and rater.ls_user_id not in (None, ls_user_id):
                name, rater = f"{name} (ls-user-{ls_user_id})", None
                continue
        if rater is not None:
            if ls_user_id is not None and rater.ls_user_id is None:
                rater.ls_user_id = ls_user_id
            return rater
        label = name if name is not None else f"ls-user-{ls_user_id}"
        insert_if_absent(session, Rater, {"name": label, "ls_user_id": ls_user_id, "created_at": utcnow()})
    raise RuntimeError(f"could not create the rater {name!r} (Label Studio user {ls_user_id})")


def _find_item(session: Session, external_id: str, ls_task_id: int | None) -> Item | None:
    item = None
    if ls_task_id is not None:
        item = session.scalars(select(Item).where(Item.ls_task_id == ls_task_id)).first()
    if item is None:
        item = session.scalars(select(Item).where(Item.external_id == external_id)).first()
    return item


def get_or_create_item(
    session: Session,
    external_id: str,
    ls_task_id: int | None = None,
    image: str | None = None,
    data: Mapping[str, Any] | None = None,
    ls_project_id: int | None = None,
) -> Item:
    """The item with this Label Studio task id (or external id), created when new; fills what was unknown.

    Race-free: concurrent first events of one task create one item.

    Raises:
        ValueError: the external id is stored for another task.
    """
    item = _find_item(session, external_id, ls_task_id)
    if item is None:
        insert_if_absent(
            session,
            Item,
            {
                "external_id": external_id,
                "ls_task_id": ls_task_id,
                "ls_project_id": ls_project_id,
                "image": image,
                "data": dict(data or {}),
                "created_at": utcnow(),
            },
        )
        item = _find_item(session, external_id, ls_task_id)
        if item is None:  # the conflicting row holds our external id under another task id
            raise ValueError(f"item {external_id!r} is stored for another task than {ls_task_id}")
    if ls_task_id is not None and item.ls_task_id is None:
        item.ls_task_id = ls_task_id
    if image is not None and item.image != image:
        item.image = image
    if data is not None and dict(data) != item.data:
        item.data = dict(data)
    if ls_project_id is not None and item.ls_project_id != ls_project_id:
        item.ls_project_id = ls_project_id
    return item


def record_event(
    session: Session,
    source: Source,
    action: str,
    payload: Mapping[str, Any],
    ls_project_id: int | None = None,
    error: str | None = None,
    received_at: datetime | None = None,
) -> AnnotationEvent:
    """Append a raw event to the log (it is never changed afterwards)."""
    event = AnnotationEvent(
        source=source,
        action=action,
        payload=dict(payload),
        ls_project_id=ls_project_id,
        error=error,
        received_at=received_at or utcnow(),
    )
    session.add(event)
    session.flush()
    return event


#: The longest ``model_version`` the store keeps (``annotations.parent_model_version``).
MAX_MODEL_VERSION_CHARS = 200
#: The longest diagnosis value the store keeps (``annotations.diagnosis`` / ``parent_diagnosis``).
MAX_DIAGNOSIS_CHARS = 64


@dataclass(frozen=True)
class Exposure:
    """What a reader saw before answering: the Label Studio prediction the annotation started from.

    Attributes:
        prediction: Label Studio's prediction id (``parent_prediction``); None: a blank task.
        model_version: the prediction's ``model_version``, where the payload gave it.
        labels: what the prediction showed, target key -> 0 / 1 (None: the prediction was not in the
            payload, or could not be read).
        diagnosis: the diagnosis value it showed, if any.
    """

    prediction: int | None = None
    model_version: str | None = None
    labels: dict[str, int] | None = None
    diagnosis: str | None = None

    @property
    def assisted(self) -> bool:
        """Whether the read started from a prediction."""
        return self.prediction is not None


def _check_labels(labels: Mapping[str, Any], what: str) -> dict[str, int]:
    """``labels`` in the store's terms (target key -> 0 / 1, in target order).

    Raises:
        ValueError: for unknown target keys or values other than 0 / 1.
    """
    unknown = sorted(set(labels) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; expected some of {list(TARGETS)}")
    bad = {k: v for k, v in labels.items() if v not in (0, 1)}
    if bad:
        raise ValueError(f"{what} values must be 0 or 1, got {bad}")
    return {k: int(labels[k]) for k in TARGETS if k in labels}


def _check_exposure(exposure: Exposure) -> Exposure:
    """The exposure as stored (labels normalised); the bounds the columns need.

    Raises:
        ValueError: a prediction id outside SQL's BIGINT, an over-long model version or diagnosis,
            bad labels, or details of a prediction without its id.
    """
    prediction = exposure.prediction
    if prediction is not None and (
        isinstance(prediction, bool) or not isinstance(prediction, int) or not 0 < prediction < 2**63
    ):
        raise ValueError(f"parent_prediction must be an id in 1..2**63-1, got {prediction!r}")
    version = exposure.model_version
    if version is not None and (not isinstance(version, str) or len(version) > MAX_MODEL_VERSION_CHARS):
        raise ValueError(
            f"a prediction's model_version must be text of at most {MAX_MODEL_VERSION_CHARS} characters"
        )
    diagnosis = exposure.diagnosis
    if diagnosis is not None and (not isinstance(diagnosis, str) or len(diagnosis) > MAX_DIAGNOSIS_CHARS):
        raise ValueError(f"a prediction's diagnosis must be text of at most {MAX_DIAGNOSIS_CHARS} characters")
    labels = None if exposure.labels is None else _check_labels(exposure.labels, "prediction label")
    if prediction is None and (version is not None or labels is not None or diagnosis is not None):
        raise ValueError("a prediction's details need its id (parent_prediction)")
    return Exposure(prediction, version, labels, diagnosis)


def _exposure_of(row: Annotation) -> Exposure:
    return Exposure(row.parent_prediction, row.parent_model_version, row.parent_labels, row.parent_diagnosis)


def _merged(new: Exposure, stored: Exposure) -> Exposure:
    """A version that names the same prediction without its details (a webhook whose task carried
    prediction ids only) keeps the details already stored (from a sync's export, which carries them)."""
    if new.prediction is None or new.prediction != stored.prediction:
        return new
    if new.labels is None and new.model_version is None and new.diagnosis is None:
        return stored
    return new


def _set_exposure(row: Annotation, exposure: Exposure) -> None:
    row.parent_prediction = exposure.prediction
    row.parent_model_version = exposure.model_version
    row.parent_labels = exposure.labels
    row.parent_diagnosis = exposure.diagnosis


@dataclass(frozen=True)
class Upsert:
    """What :func:`upsert_annotation` did."""

    annotation_id: int
    created: bool
    changed: bool


def upsert_annotation(
    session: Session,
    item: Item,
    rater: Rater,
    labels: Mapping[str, int],
    source: Source,
    diagnosis: str | None = None,
    regions: list[Any] | None = None,
    ls_annotation_id: int | None = None,
    updated_at: datetime | None = None,
    exposure: Exposure | None = None,
) -> Upsert:
    """Insert or replace a rater's annotation of an item; identical replays change nothing.

    Args:
        session: the open session (not committed here).
        item: the item annotated.
        rater: who annotated it.
        labels: target key -> 0 / 1 (keys from ``labeling_config.TARGETS``).
        source: where it came from.
        diagnosis: the diagnosis value as chosen (e.g. "BCC", "mel").
        regions: brush regions as given.
        ls_annotation_id: Label Studio's annotation id, if any.
        updated_at: when Label Studio last changed it; an older version than the stored one is ignored.
        exposure: the prediction the rater started from (default: none, a blank task). A version that
            names the stored prediction without its details keeps the stored details.

    Raises:
        ValueError: for unknown target keys or values other than 0 / 1, or an exposure the columns
            cannot hold (see :class:`Exposure`).
    """
    values = _check_labels(labels, "label")
    shown = _check_exposure(exposure or Exposure())
    when = updated_at or utcnow()
    tombstone = session.get(AnnotationDeletion, ls_annotation_id) if ls_annotation_id is not None else None
    stale = tombstone is not None and (
        updated_at is None or _aware(updated_at) <= _aware(tombstone.deleted_at)  # type: ignore[operator]
    )
    # Optimistic: most events bring a new annotation, stored by this one statement. When the row
    # exists (an update, a replay, this rater's earlier annotation of the item) or a concurrent
    # transaction stores it first, the insert does nothing and the row is updated below.
    key = insert_if_absent(
        session,
        Annotation,
        {
            "item_id": item.id,
            "rater_id": rater.id,
            "ls_annotation_id": ls_annotation_id,
            "diagnosis": diagnosis,
            "labels": values,
            "regions": list(regions or []),
            "source": source,
            "created_at": when,
            "updated_at": when,
            # A version not newer than the annotation's deletion is kept for the audit, deleted.
            "deleted": stale,
            "deleted_at": tombstone.deleted_at if stale and tombstone is not None else None,
            "parent_prediction": shown.prediction,
            "parent_model_version": shown.model_version,
            "parent_labels": shown.labels,
            "parent_diagnosis": shown.diagnosis,
        },
    )
    if key is not None:
        return Upsert(int(key), created=not stale, changed=not stale)
    existing = _find_annotation(session, item, rater, ls_annotation_id)
    if existing is None:
        raise ValueError(f"annotation {ls_annotation_id} conflicts with a stored annotation")
    if stale:
        logger.info("ignoring annotation %s: not newer than its deletion", ls_annotation_id)
        return Upsert(existing.id, created=False, changed=False)

    stored_at = _aware(existing.updated_at)
    if updated_at is not None and stored_at is not None and _aware(updated_at) < stored_at:  # type: ignore[operator]
        logger.info("ignoring an older version of annotation %s", ls_annotation_id)
        return Upsert(existing.id, created=False, changed=False)
    shown = _merged(shown, _exposure_of(existing))
    same = (
        existing.labels == values
        and existing.diagnosis == diagnosis
        and existing.regions == list(regions or [])
        and not existing.deleted
        and (ls_annotation_id is None or existing.ls_annotation_id == ls_annotation_id)
        and _exposure_of(existing) == shown
    )
    if same:
        return Upsert(existing.id, created=False, changed=False)
    existing.labels = values
    existing.diagnosis = diagnosis
    existing.regions = list(regions or [])
    existing.source = source
    existing.updated_at = when
    existing.deleted = False
    existing.deleted_at = None
    _set_exposure(existing, shown)
    if ls_annotation_id is not None:
        existing.ls_annotation_id = ls_annotation_id
    return Upsert(existing.id, created=False, changed=True)


def _find_annotation(
    session: Session, item: Item, rater: Rater, ls_annotation_id: int | None
) -> Annotation | None:
    """The stored annotation, by Label Studio id, else this rater's annotation of the item."""
    existing = None
    if ls_annotation_id is not None:
        existing = _locked(session, Annotation.ls_annotation_id == ls_annotation_id)
    if existing is None:
        existing = _locked(session, Annotation.item_id == item.id, Annotation.rater_id == rater.id)
    return existing


def _locked(session: Session, *where: Any) -> Annotation | None:
    """The annotation matching ``where``, freshly read and locked for this transaction (PostgreSQL's
    ``FOR UPDATE``; SQLite has one writer anyway), so concurrent versions of it queue."""
    return session.scalars(
        select(Annotation).where(*where).with_for_update().execution_options(populate_existing=True)
    ).first()


def soft_delete_annotations(
    session: Session, ls_annotation_ids: Iterable[int], at: datetime | None = None
) -> int:
    """Mark annotations deleted (kept for the audit trail) and remember when. Returns how many changed.

    Each id gets a tombstone (also for an annotation the store has not seen yet: its create may
    arrive after its delete), dated ``at`` (default now) or the stored version's own time if that is
    later, so a deletion covers the version it deleted whatever the two clocks say. Any version not
    newer than the tombstone stays deleted (:func:`upsert_annotation`).
    """
    ids = list(dict.fromkeys(ls_annotation_ids))
    if not ids:
        return 0
    now = _aware(at) or utcnow()
    changed = 0
    for ls_id in ids:
        row = _locked(session, Annotation.ls_annotation_id == ls_id)
        stored = _aware(row.updated_at) if row is not None else None
        when: datetime = max(now, stored) if stored is not None else now
        if (
            insert_if_absent(session, AnnotationDeletion, {"ls_annotation_id": ls_id, "deleted_at": when})
            is None
        ):
            tombstone = session.get_one(
                AnnotationDeletion, ls_id, with_for_update=True, populate_existing=True
            )
            stored_when = _aware(tombstone.deleted_at)
            if stored_when is not None and stored_when < when:
                tombstone.deleted_at = when
            else:
                when = stored_when or when
        if row is not None and not row.deleted:
            row.deleted = True
            row.deleted_at = when
            changed += 1
    return changed
