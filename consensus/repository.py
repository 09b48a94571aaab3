"""SQL <-> long tables: the only way annotations and consensus results enter or leave the store.

Writes are idempotent: the same Label Studio annotation id twice is one row; an update replaces the
values (unless it is older than what is stored: replays may arrive out of order); a delete is soft
and recorded. Every function takes the session explicitly and never commits: the caller owns the
transaction, so a batch either lands whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sqlalchemy import func, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from consensus.models import (
    Annotation,
    AnnotationDeletion,
    AnnotationEvent,
    Base,
    ConsensusLabel,
    ConsensusMask,
    ConsensusRun,
    Item,
    ModelVersion,
    Rater,
    RaterReliability,
    RunKind,
    Source,
    TrainingJob,
    utcnow,
)
from labeling_config import HAM_CLASSES, HAM_DIAGNOSES, TARGETS
from labeling_config.parse import LESION_KEY, Role

logger = logging.getLogger(__name__)

RATINGS_COLUMNS = ("image_id", "rater", "label", "value")
ANSWER_COLUMNS = ("task", "worker", "label_key", "value")
#: The label keys of a lesion run (``lesion.xml``): the HAM10000 diagnosis and the lesion outline.
HAM_KEY: str = Role.HAM_DIAGNOSIS.value
RELIABILITY_COLUMNS = (
    "sensitivity",
    "sensitivity_low",
    "sensitivity_high",
    "specificity",
    "specificity_low",
    "specificity_high",
)


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

    Raises:
        ValueError: for unknown target keys or values other than 0 / 1.
    """
    unknown = sorted(set(labels) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown label keys {unknown}; expected some of {list(TARGETS)}")
    bad = {k: v for k, v in labels.items() if v not in (0, 1)}
    if bad:
        raise ValueError(f"label values must be 0 or 1, got {bad}")
    values = {k: int(labels[k]) for k in TARGETS if k in labels}
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
    same = (
        existing.labels == values
        and existing.diagnosis == diagnosis
        and existing.regions == list(regions or [])
        and not existing.deleted
        and (ls_annotation_id is None or existing.ls_annotation_id == ls_annotation_id)
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


def validate_ratings(table: pd.DataFrame) -> pd.DataFrame:
    """Check a long ratings table (``image_id, rater, label, value``) and return it normalised.

    Raises:
        ValueError: naming the problem: missing columns, no rows, missing values (with the first
            rows), unknown label keys, values other than 0 / 1, or one rater giving two different
            values for one label of one image.
    """
    missing = [c for c in RATINGS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"the ratings table lacks the column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("the ratings table has no rows")
    df = table[list(RATINGS_COLUMNS)].copy()
    blank = df.isna() | df.astype(str).apply(lambda col: col.str.strip() == "")
    if blank.any().any():
        rows = [int(i) + 2 for i in df.index[blank.any(axis=1)][:5]]  # +2: header line, 1-based
        cols = [c for c in RATINGS_COLUMNS if blank[c].any()]
        raise ValueError(f"missing values in column(s) {cols} at CSV line(s) {rows}")
    df["image_id"] = df["image_id"].astype(str)
    df["rater"] = df["rater"].astype(str)
    df["label"] = df["label"].astype(str)
    unknown = sorted(set(df["label"]) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown label keys {unknown}; expected some of {list(TARGETS)}")
    values = pd.to_numeric(df["value"], errors="coerce")
    bad = df.loc[~values.isin([0, 1]), "value"]
    if len(bad):
        raise ValueError(f"values must be 0 or 1; found {sorted(map(str, set(bad)))[:5]}")
    df["value"] = values.astype(int)
    conflicts = df.groupby(["image_id", "rater", "label"])["value"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        first = conflicts.index[0]
        raise ValueError(f"rater {first[1]!r} gives two values for {first[2]!r} of image {first[0]!r}")
    return df.drop_duplicates(["image_id", "rater", "label"]).reset_index(drop=True)


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_ratings` did."""

    rows: int
    items: int
    raters: int
    created: int
    changed: int
    unchanged: int


def import_ratings(session: Session, table: pd.DataFrame, origin: str = "table") -> ImportSummary:
    """Import a long ratings table (the synthetic ``ratings.csv`` or any such table) into the store.

    Everything is validated before anything is written, and the import is one event in the log.

    Raises:
        ValueError: see :func:`validate_ratings`.
    """
    df = validate_ratings(table)
    digest = hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()
    record_event(
        session, Source.IMPORT, "RATINGS_IMPORTED", {"origin": origin, "rows": len(df), "sha256": digest}
    )
    raters = {name: get_or_create_rater(session, name=name) for name in sorted(df["rater"].unique())}
    items: dict[str, Item] = {}
    created = changed = unchanged = 0
    for (image_id, rater_name), group in df.groupby(["image_id", "rater"], sort=True):
        image_key = str(image_id)
        if image_key not in items:
            items[image_key] = get_or_create_item(session, external_id=image_key)
        labels = dict(zip(group["label"], group["value"].astype(int), strict=True))
        result = upsert_annotation(session, items[image_key], raters[str(rater_name)], labels, Source.IMPORT)
        created += result.created
        changed += result.changed and not result.created
        unchanged += not result.changed
    return ImportSummary(len(df), len(items), len(raters), created, changed, unchanged)


def answers(session: Session, label_keys: Iterable[str] = TARGETS) -> pd.DataFrame:
    """Every live (not deleted) answer as a long table ``task, worker, label_key, value``.

    ``task`` is the item's external id and ``worker`` the rater's name; a label a rater did not give
    is simply absent (missing answers are absent rows, as the estimators expect).
    """
    keys = list(label_keys)
    rows = session.execute(
        select(Item.external_id, Rater.name, Annotation.labels)
        .join(Annotation, Annotation.item_id == Item.id)
        .join(Rater, Annotation.rater_id == Rater.id)
        .where(Annotation.deleted.is_(False))
        .order_by(Item.external_id, Rater.name)
    ).all()
    records = [
        (task, worker, key, int(labels[key]))
        for task, worker, labels in rows
        for key in keys
        if key in labels
    ]
    return pd.DataFrame(records, columns=["task", "worker", "label_key", "value"])


_HAM_BY_NAME = {name.lower(): code for code, name in HAM_DIAGNOSES.items()}


def ham_code(value: Any) -> str | None:
    """A stored diagnosis as one of the seven HAM10000 codes (the code itself or its full name), else None.

    A diagnosis that is not a HAM10000 one (``BCC`` / ``non-BCC``) is a ``bcc.xml`` project's.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text if text in HAM_CLASSES else _HAM_BY_NAME.get(text.lower())


def lesion_answers(session: Session, region_label: str = LESION_KEY) -> pd.DataFrame:
    """Every live answer of a ``lesion.xml`` project: a long table ``task, worker, label_key, value, region``.

    One row per HAM10000 diagnosis (``label_key`` :data:`HAM_KEY`, ``value`` its code, ``region`` None) and
    one per lesion outline (``label_key`` ``region_label``, ``value`` a digest of the stored region, so that
    a hash of the table changes with any outline, and ``region`` the stored region as it is: decoding it is
    the caller's business). Rows are ordered by task and rater; a rater with two outlines of an item gives
    two rows.
    """
    rows = session.execute(
        select(Item.external_id, Rater.name, Annotation.diagnosis, Annotation.regions)
        .join(Annotation, Annotation.item_id == Item.id)
        .join(Rater, Annotation.rater_id == Rater.id)
        .where(Annotation.deleted.is_(False))
        .order_by(Item.external_id, Rater.name)
    ).all()
    records: list[tuple[str, str, str, str, Any]] = []
    for task, worker, diagnosis, regions in rows:
        code = ham_code(diagnosis)
        if code is not None:
            records.append((task, worker, HAM_KEY, code, None))
        for region in regions or []:
            if isinstance(region, Mapping) and region.get("label") == region_label:
                digest = hashlib.sha256(json.dumps(region, sort_keys=True, default=str).encode()).hexdigest()
                records.append((task, worker, region_label, digest, region))
    return pd.DataFrame(records, columns=[*ANSWER_COLUMNS, "region"])


def answers_hash(table: pd.DataFrame) -> str:
    """Content hash of a long answers table (order-independent)."""
    ordered = table.sort_values(list(table.columns)).reset_index(drop=True)
    return hashlib.sha256(ordered.to_csv(index=False).encode()).hexdigest()


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def pack_mask(mask: NDArray[np.bool_]) -> bytes:
    """A 2-D boolean mask as bytes (``numpy.packbits`` of the flattened mask, row-major)."""
    return np.packbits(np.asarray(mask, dtype=bool).ravel()).tobytes()


def unpack_mask(data: bytes, height: int, width: int) -> NDArray[np.bool_]:
    """The mask :func:`pack_mask` packed, at its size."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=height * width)
    mask: NDArray[np.bool_] = flat.reshape(height, width).astype(bool)
    return mask


@dataclass(frozen=True)
class RegionConsensus:
    """A region consensus (e.g. STAPLE) of one label of one item, as :func:`save_consensus_run` stores it.

    Attributes:
        task: the item's external id.
        label_key: the region's label (e.g. ``"lesion"``).
        mask: the consensus mask (2-D, boolean).
        probabilities: per class (``"1"`` foreground, ``"0"`` background), the mean pixel posterior over
            the pixels the consensus gives that class; a class without pixels is absent.
        raters: the raters whose masks it combines, in the estimator's order.
        details: what the estimator found (per-rater rates, prior, convergence).
    """

    task: str
    label_key: str
    mask: NDArray[np.bool_]
    probabilities: Mapping[str, float]
    raters: Sequence[str] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> str:
        """``"1"`` when the consensus region has a pixel, else ``"0"``."""
        return "1" if bool(np.any(self.mask)) else "0"


def save_consensus_run(
    session: Session,
    method: str,
    params: Mapping[str, Any],
    answers_table: pd.DataFrame,
    probas: Mapping[str, pd.DataFrame],
    convergence: Mapping[str, Any] | None = None,
    reliability: pd.DataFrame | None = None,
    kind: RunKind = RunKind.BCC,
    regions: Sequence[RegionConsensus] = (),
) -> ConsensusRun:
    """Store one consensus run: parameters, convergence, posteriors per item and label, reliability.

    Args:
        session: the open session.
        method: estimator name (e.g. ``"dawid-skene"``).
        params: the estimator's hyperparameters.
        answers_table: the answers it was fitted on (``task, worker, label_key, value``).
        probas: label key -> DataFrame (index: task, columns: classes) of posterior probabilities.
        convergence: per label: iterations, converged, log-likelihood, ...
        reliability: rows ``label_key, worker, sensitivity, sensitivity_low, sensitivity_high,
            specificity, specificity_low, specificity_high, n_items``.
        kind: which reference standard the run builds.
        regions: region consensuses: each is one ``consensus_labels`` row (its value and summary
            posterior) and one ``consensus_masks`` row (the mask).

    Raises:
        ValueError: for a task or rater the store does not know, or a region that is not a 2-D mask.
    """
    run = ConsensusRun(
        kind=kind,
        method=method,
        params=dict(params),
        convergence=dict(convergence or {}),
        n_items=int(answers_table["task"].nunique()),
        n_raters=int(answers_table["worker"].nunique()),
        n_answers=len(answers_table),
        data_hash=answers_hash(answers_table),
    )
    session.add(run)
    session.flush()
    item_ids: dict[str, int] = dict(session.execute(select(Item.external_id, Item.id)).all())
    rater_ids: dict[str, int] = dict(session.execute(select(Rater.name, Rater.id)).all())
    rows: list[dict[str, Any]] = []
    for key, frame in probas.items():
        unknown = set(map(str, frame.index)) - set(item_ids)
        if unknown:
            raise ValueError(f"consensus for unknown items {sorted(unknown)[:5]}")
        values = frame.to_numpy(dtype=float)
        best = values.argmax(axis=1)
        classes = [str(c) for c in frame.columns]
        for task, probs, b in zip(frame.index, values, best, strict=True):
            rows.append({
                "run_id": run.id,
                "item_id": item_ids[str(task)],
                "label_key": key,
                "value": classes[b],
                "posterior": float(probs[b]),
                "probabilities": dict(zip(classes, map(float, probs), strict=True)),
            })  # fmt: skip
    masks: list[dict[str, Any]] = []
    for region in regions:
        if str(region.task) not in item_ids:
            raise ValueError(f"consensus for unknown items {[region.task]}")
        mask = np.asarray(region.mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"the {region.label_key} consensus of {region.task!r} is not a 2-D mask")
        value = region.value
        item_id = item_ids[str(region.task)]
        rows.append({
            "run_id": run.id, "item_id": item_id, "label_key": region.label_key, "value": value,
            "posterior": float(region.probabilities[value]),
            "probabilities": {str(k): float(v) for k, v in region.probabilities.items()},
        })  # fmt: skip
        masks.append({
            "run_id": run.id, "item_id": item_id, "label_key": region.label_key, "height": mask.shape[0],
            "width": mask.shape[1], "mask": pack_mask(mask), "raters": list(region.raters),
            "details": dict(region.details),
        })  # fmt: skip
    if rows:
        session.execute(insert(ConsensusLabel), rows)
    if masks:
        session.execute(insert(ConsensusMask), masks)
    if reliability is not None and len(reliability):
        unknown = set(reliability["worker"].astype(str)) - set(rater_ids)
        if unknown:
            raise ValueError(f"reliability for unknown raters {sorted(unknown)[:5]}")
        session.execute(
            insert(RaterReliability),
            [
                {
                    "run_id": run.id,
                    "rater_id": rater_ids[str(r["worker"])],
                    "label_key": str(r["label_key"]),
                    **{c: _finite(r.get(c)) for c in RELIABILITY_COLUMNS},
                    "n_items": int(r.get("n_items", 0)),
                }
                for r in reliability.to_dict("records")
            ],
        )
    session.flush()
    return run


def latest_run(session: Session, kind: RunKind | None = RunKind.BCC) -> ConsensusRun | None:
    """The most recent consensus run of this kind (default: a ``bcc.xml`` one; None: any), if any."""
    query = select(ConsensusRun)
    if kind is not None:
        query = query.where(ConsensusRun.kind == kind)
    return session.scalars(query.order_by(ConsensusRun.id.desc()).limit(1)).first()


def consensus_table(session: Session, run: ConsensusRun) -> pd.DataFrame:
    """A run's consensus as a long table ``task, label_key, value, posterior``."""
    rows = session.execute(
        select(Item.external_id, ConsensusLabel.label_key, ConsensusLabel.value, ConsensusLabel.posterior)
        .join(Item, ConsensusLabel.item_id == Item.id)
        .where(ConsensusLabel.run_id == run.id)
        .order_by(Item.external_id, ConsensusLabel.label_key)
    ).all()
    return pd.DataFrame(rows, columns=["task", "label_key", "value", "posterior"])


def consensus_probabilities(session: Session, run: ConsensusRun, label_key: str) -> pd.DataFrame:
    """A run's posteriors of one label: task x class (the classes in stored order), 0 where absent."""
    rows = session.execute(
        select(Item.external_id, ConsensusLabel.probabilities)
        .join(Item, ConsensusLabel.item_id == Item.id)
        .where(ConsensusLabel.run_id == run.id, ConsensusLabel.label_key == label_key)
        .order_by(Item.external_id)
    ).all()
    frame = pd.DataFrame([probs for _, probs in rows], index=pd.Index([t for t, _ in rows], name="task"))
    return frame.fillna(0.0).astype(float)


def consensus_masks(session: Session, run: ConsensusRun, label_key: str) -> dict[str, NDArray[np.bool_]]:
    """A run's consensus masks of one label: item external id -> mask."""
    rows = session.execute(
        select(Item.external_id, ConsensusMask.mask, ConsensusMask.height, ConsensusMask.width)
        .join(Item, ConsensusMask.item_id == Item.id)
        .where(ConsensusMask.run_id == run.id, ConsensusMask.label_key == label_key)
        .order_by(Item.external_id)
    ).all()
    return {task: unpack_mask(data, height, width) for task, data, height, width in rows}


# ------------------------------------------------------------------ what the backend's routes read


def items_changed_since_last_job(session: Session) -> int:
    """Items with a live annotation created or changed since the latest training job (all, if none)."""
    since = session.scalar(select(func.max(TrainingJob.created_at)))
    query = select(func.count(func.distinct(Annotation.item_id))).where(Annotation.deleted.is_(False))
    if since is not None:
        query = query.where(Annotation.updated_at > since)
    return int(session.scalar(query) or 0)


def model_versions(session: Session) -> list[ModelVersion]:
    """Every registered model version, oldest first, with its outputs loaded."""
    query = select(ModelVersion).order_by(ModelVersion.id).options(selectinload(ModelVersion.outputs))
    return list(session.scalars(query).all())


def recent_jobs(session: Session, limit: int = 50) -> list[TrainingJob]:
    """The latest training jobs, newest first."""
    return list(session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit)).all())


def store_counts(session: Session) -> dict[str, int]:
    """Raw events kept and live annotations (for /metrics)."""
    events = session.scalar(select(func.count()).select_from(AnnotationEvent)) or 0
    live = session.scalar(select(func.count()).select_from(Annotation).where(Annotation.deleted.is_(False)))
    return {"events": int(events), "annotations": int(live or 0)}
