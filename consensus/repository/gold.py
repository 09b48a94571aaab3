"""Gold labels: known classes of items (an adjudicator's reading, histopathology), with provenance.

A histopathology file (``image_id, diagnosis, source, date``; ``source`` and ``date`` optional) gives,
for each image, the BCC target (1 when the diagnosis is a basal cell carcinoma, else 0) and, where
the diagnosis is one of HAM10000's seven, the HAM10000 diagnosis. An adjudication gives every label
the adjudicator answered (see ``backend.collection.adjudication``). Each (item, label, source) is one
row; where sources disagree the consensus takes the first of :data:`SOURCE_PRECEDENCE`, and
:func:`gold_table` reports how many such conflicts there were.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from consensus.models import GoldLabel, Item, utcnow
from consensus.repository.annotations import get_or_create_item, insert_if_absent
from labeling_config import DIAGNOSIS_KEY, HAM_DIAGNOSES, TARGETS
from labeling_config.parse import Role, normalize

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

#: Columns of a histopathology file; ``source`` and ``date`` may be absent.
GOLD_COLUMNS: tuple[str, ...] = ("image_id", "diagnosis", "source", "date")
#: Where two sources give one label of one item, the first listed wins; others follow alphabetically.
SOURCE_PRECEDENCE: tuple[str, ...] = ("histopathology", "adjudication")
#: The columns of :func:`gold_table`.
GOLD_TABLE_COLUMNS: tuple[str, ...] = ("task", "label_key", "value", "source", "reference", "observed_on")

HAM_KEY = Role.HAM_DIAGNOSIS.value
_MAX_SOURCE = 32
_MAX_REFERENCE = 300

_HAM_SPELLINGS = {normalize(k): k for k in HAM_DIAGNOSES} | {
    normalize(v): k for k, v in HAM_DIAGNOSES.items()
}


def diagnosis_labels(diagnosis: str) -> dict[str, str]:
    """The gold labels one histopathological diagnosis gives: ``bcc`` always, the HAM10000 class if known.

    Examples:
        >>> diagnosis_labels("Basal cell carcinoma")
        {'bcc': '1', 'ham_diagnosis': 'bcc'}
        >>> diagnosis_labels("mel")
        {'bcc': '0', 'ham_diagnosis': 'mel'}
        >>> diagnosis_labels("seborrheic keratosis")
        {'bcc': '0'}
    """
    spelled = normalize(diagnosis)
    if not spelled:
        raise ValueError(f"diagnosis {diagnosis!r} is empty")
    ham = _HAM_SPELLINGS.get(spelled)
    labels = {DIAGNOSIS_KEY: "1" if ham == "bcc" else "0"}
    if ham is not None:
        labels[HAM_KEY] = ham
    return labels


def validate_gold_file(table: pd.DataFrame) -> pd.DataFrame:
    """Check a histopathology table and return it with ``source`` and ``date`` filled (as text).

    Raises:
        ValueError: missing ``image_id`` / ``diagnosis`` columns, no rows, empty values (with the first
            rows), a source or reference too long, or one image given two different diagnoses by one
            source.
    """
    missing = [c for c in GOLD_COLUMNS[:2] if c not in table.columns]
    if missing:
        raise ValueError(f"the gold file lacks the column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError("the gold file has no rows")
    frame = table.copy()
    if "source" not in frame.columns:
        frame["source"] = SOURCE_PRECEDENCE[0]
    if "date" not in frame.columns:
        frame["date"] = None
    for column in ("image_id", "diagnosis"):
        empty = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if empty.any():
            rows = [int(i) + 2 for i in frame.index[empty][:5]]  # +2: the header and 1-based lines
            raise ValueError(f"{int(empty.sum())} row(s) have no {column} (file lines {rows})")
    frame["image_id"] = frame["image_id"].astype(str).str.strip()
    frame["diagnosis"] = frame["diagnosis"].astype(str).str.strip()
    frame["source"] = frame["source"].fillna(SOURCE_PRECEDENCE[0]).astype(str).str.strip().str.lower()
    frame["date"] = frame["date"].where(frame["date"].notna(), None)
    long = frame["source"].str.len() > _MAX_SOURCE
    if long.any():
        raise ValueError(
            f"source must be at most {_MAX_SOURCE} characters: {frame['source'][long].iloc[0]!r}"
        )
    clash = frame.groupby(["image_id", "source"])["diagnosis"].nunique()
    clash = clash[clash > 1]
    if len(clash):
        raise ValueError(
            f"{len(clash)} image(s) have two different diagnoses from one source, e.g. {clash.index[0]}"
        )
    return frame.drop_duplicates(["image_id", "source"])


@dataclass(frozen=True)
class GoldImport:
    """What :func:`import_gold` stored."""

    images: int  # images in the file
    new_items: int  # of which the store did not know yet
    labels: int  # gold labels written (new or changed)
    unchanged: int  # gold labels already stored with the same value


def upsert_gold(
    session: Session,
    item: Item,
    label_key: str,
    value: str,
    source: str,
    reference: str | None = None,
    observed_on: str | None = None,
    ls_annotation_id: int | None = None,
) -> bool:
    """Store one gold label (race-free); True when it was new or its value changed.

    A repeated statement with the same value changes nothing (replays are idempotent); a deleted one
    comes back.
    """
    values: dict[str, Any] = {
        "item_id": item.id,
        "label_key": label_key,
        "value": str(value),
        "source": source,
        "reference": None if reference is None else str(reference)[:_MAX_REFERENCE],
        "observed_on": None if observed_on is None else str(observed_on)[:32],
        "ls_annotation_id": ls_annotation_id,
        "created_at": utcnow(),
        "updated_at": utcnow(),
        "deleted": False,
    }
    if insert_if_absent(session, GoldLabel, values) is not None:
        return True
    row = session.scalars(
        select(GoldLabel)
        .where(GoldLabel.item_id == item.id, GoldLabel.label_key == label_key, GoldLabel.source == source)
        .with_for_update()
    ).one()
    same = (row.value, row.reference, row.observed_on, row.deleted) == (
        values["value"],
        values["reference"],
        values["observed_on"],
        False,
    )
    if same:
        return False
    changed = row.value != values["value"] or row.deleted
    row.value, row.reference, row.observed_on = values["value"], values["reference"], values["observed_on"]
    row.ls_annotation_id = ls_annotation_id if ls_annotation_id is not None else row.ls_annotation_id
    row.deleted, row.updated_at = False, utcnow()
    return changed


def import_gold(session: Session, table: pd.DataFrame, reference: str | None = None) -> GoldImport:
    """Store a histopathology table as gold labels (the caller commits).

    Args:
        session: the open session.
        table: ``image_id, diagnosis[, source][, date]``; checked by :func:`validate_gold_file`.
        reference: where the table came from (e.g. the file name), kept with every label.

    Returns:
        Counts of what was stored.

    Raises:
        ValueError: as :func:`validate_gold_file`.
    """
    frame = validate_gold_file(table)
    known = set(
        session.scalars(select(Item.external_id).where(Item.external_id.in_(frame["image_id"].tolist())))
    )
    written = unchanged = 0
    for image_id, diagnosis, source, date in frame[["image_id", "diagnosis", "source", "date"]].itertuples(
        index=False
    ):
        item = get_or_create_item(session, image_id)
        for key, value in diagnosis_labels(diagnosis).items():
            if upsert_gold(session, item, key, value, source, reference, None if date is None else str(date)):
                written += 1
            else:
                unchanged += 1
    images = frame["image_id"].nunique()
    logger.info("gold import: %d images (%d new), %d labels written", images, images - len(known), written)
    return GoldImport(images, images - len(known), written, unchanged)


def delete_gold(session: Session, ls_annotation_ids: Iterable[int]) -> int:
    """Soft-delete the gold labels of these (adjudication) annotations; returns how many rows changed."""
    ids = [int(i) for i in ls_annotation_ids]
    if not ids:
        return 0
    result: Any = session.execute(
        update(GoldLabel)
        .where(GoldLabel.ls_annotation_id.in_(ids), GoldLabel.deleted.is_(False))
        .values(deleted=True, updated_at=utcnow())
    )
    return int(result.rowcount or 0)


def _rank(source: str) -> int:
    return SOURCE_PRECEDENCE.index(source) if source in SOURCE_PRECEDENCE else len(SOURCE_PRECEDENCE)


def gold_table(session: Session, label_keys: Iterable[str] | None = None) -> tuple[pd.DataFrame, int]:
    """One gold label per (item, label key): the live rows, the first source of :data:`SOURCE_PRECEDENCE`.

    Args:
        session: the open session.
        label_keys: keep only these keys; default every key.

    Returns:
        ``(table, conflicts)``: rows :data:`GOLD_TABLE_COLUMNS` (``task`` is the item's external id,
        ``value`` an int for the binary targets, text otherwise), sorted by task and key; and how many
        (item, key) pairs had sources that disagreed (the lower-ranked ones are left out).
    """
    import pandas as pd

    query = (
        select(Item.external_id, GoldLabel.label_key, GoldLabel.value, GoldLabel.source, GoldLabel.reference,
               GoldLabel.observed_on)
        .join(Item, Item.id == GoldLabel.item_id)
        .where(GoldLabel.deleted.is_(False))
    )  # fmt: skip
    keys = None if label_keys is None else list(label_keys)
    if keys is not None:
        query = query.where(GoldLabel.label_key.in_(keys))
    rows = [tuple(r) for r in session.execute(query)]
    frame = pd.DataFrame(rows, columns=list(GOLD_TABLE_COLUMNS))
    if frame.empty:
        return frame, 0
    frame["rank"] = [_rank(s) for s in frame["source"]]
    frame = frame.sort_values(["task", "label_key", "rank", "source"])
    conflicts = int((frame.groupby(["task", "label_key"])["value"].nunique() > 1).sum())
    best = frame.drop_duplicates(["task", "label_key"]).drop(columns="rank").reset_index(drop=True)
    binary = best["label_key"].isin(TARGETS)
    best["value"] = [int(v) if b else v for v, b in zip(best["value"], binary, strict=True)]
    return best, conflicts


def gold_counts(table: pd.DataFrame) -> Mapping[str, dict[str, int]]:
    """Per label key, how many gold labels each source gives (what a run and its report state)."""
    counts: dict[str, dict[str, int]] = {}
    for key, source in zip(table["label_key"], table["source"], strict=True):
        per_key = counts.setdefault(str(key), {})
        per_key[str(source)] = per_key.get(str(source), 0) + 1
    return counts
