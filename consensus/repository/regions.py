"""The raters' painted pattern regions as a long table, beside the answers the estimators read."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from consensus.models import Annotation, Item, Rater
from labeling_config import PATTERN_KEYS

if TYPE_CHECKING:
    import pandas as pd

REGION_ANSWER_COLUMNS = ("task", "worker", "label_key", "value", "region")


def region_digest(region: Mapping[str, Any]) -> str:
    """A stored region's content hash (what a run keeps so that a changed region shows)."""
    return hashlib.sha256(json.dumps(region, sort_keys=True, default=str).encode()).hexdigest()


def pattern_region_answers(session: Session, label_keys: Iterable[str] = PATTERN_KEYS) -> pd.DataFrame:
    """Every live annotation's say on each pattern's region: a long table ``task, worker, label_key, value,
    region``.

    Per annotation and pattern key: one row per stored region with that label (``region`` the stored region
    as it is, decoding it is the caller's business; ``value`` the rater's 0 / 1 for the pattern, or None
    when the annotation has none), else, where the rater answered the pattern, one row with ``region``
    None. A pattern the rater neither answered nor painted gives no row. Ordered by task and rater.
    """
    import pandas as pd

    keys = list(label_keys)
    rows = session.execute(
        select(Item.external_id, Rater.name, Annotation.labels, Annotation.regions)
        .join(Annotation, Annotation.item_id == Item.id)
        .join(Rater, Annotation.rater_id == Rater.id)
        .where(Annotation.deleted.is_(False))
        .order_by(Item.external_id, Rater.name)
    ).all()
    records: list[tuple[str, str, str, int | None, Any]] = []
    for task, worker, labels, regions in rows:
        labels = labels or {}
        for key in keys:
            said = int(labels[key]) if key in labels else None
            painted = [r for r in regions or [] if isinstance(r, Mapping) and r.get("label") == key]
            records.extend((task, worker, key, said, region) for region in painted)
            if not painted and said is not None:
                records.append((task, worker, key, said, None))
    return pd.DataFrame(records, columns=list(REGION_ANSWER_COLUMNS))
