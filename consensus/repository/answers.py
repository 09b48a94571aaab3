"""The raters' answers as long tables: imported rating files in, what the estimators read out."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from consensus.models import (
    Annotation,
    Item,
    Rater,
    Source,
)
from consensus.repository.annotations import (
    get_or_create_item,
    get_or_create_rater,
    record_event,
    upsert_annotation,
)
from labeling_config import HAM_CLASSES, HAM_DIAGNOSES, TARGETS
from labeling_config.parse import LESION_KEY, Role

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


RATINGS_COLUMNS = ("image_id", "rater", "label", "value")


ANSWER_COLUMNS = ("task", "worker", "label_key", "value")


#: The label keys of a lesion run (``lesion.xml``): the HAM10000 diagnosis and the lesion outline.
HAM_KEY: str = Role.HAM_DIAGNOSIS.value


def validate_ratings(table: pd.DataFrame) -> pd.DataFrame:
    """Check a long ratings table (``image_id, rater, label, value``) and return it normalised.

    Raises:
        ValueError: naming the problem: missing columns, no rows, missing values (with the first
            rows), unknown label keys, values other than 0 / 1, or one rater giving two different
            values for one label of one image.
    """
    import pandas as pd

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
    import pandas as pd

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
    import pandas as pd

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
