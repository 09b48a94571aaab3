"""The reads with what the reader saw (AI exposure), as a long table for :mod:`consensus.exposure`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from consensus.groups import image_key, lesion_group
from consensus.models import Annotation, Item, Rater
from consensus.repository.answers import HAM_KEY, ham_code
from labeling_config import TARGETS

if TYPE_CHECKING:
    import pandas as pd

#: One row per live read and label.
STORED_READ_COLUMNS = (
    "rater", "item", "image", "group", "project", "label_key", "value",
    "parent_prediction", "model_version", "shown", "updated_at",
)  # fmt: skip


def exposure_reads(session: Session, label_keys: Iterable[str] = TARGETS) -> pd.DataFrame:
    """Every live read with the prediction it started from: :data:`STORED_READ_COLUMNS`.

    ``item`` is the item's external id, ``image`` the key that finds the same image in another project
    (:func:`consensus.groups.image_key`), ``group`` its lesion or patient
    (:func:`consensus.groups.lesion_group`), ``project`` the Label Studio project (None for imported
    ratings), ``parent_prediction`` the prediction id (None: a blank start), ``shown`` the value the
    prediction showed for the label (None where not known). ``label_keys`` may name the HAM10000
    diagnosis (:data:`HAM_KEY`): its value is the class code.
    """
    import pandas as pd

    keys = list(label_keys)
    rows = session.execute(
        select(Item, Rater.name, Annotation)
        .join(Annotation, Annotation.item_id == Item.id)
        .join(Rater, Annotation.rater_id == Rater.id)
        .where(Annotation.deleted.is_(False))
        .order_by(Item.external_id, Rater.name)
    ).all()
    records: list[tuple[Any, ...]] = []
    for item, rater, read in rows:
        image = image_key(item.external_id, item.image, item.data, item.content_hash)
        _, group = lesion_group(item.external_id, item.data)
        head = (rater, item.external_id, image, group, item.ls_project_id)
        tail = (read.parent_prediction, read.parent_model_version)
        for key in keys:
            if key == HAM_KEY:
                value, shown = ham_code(read.diagnosis), ham_code(read.parent_diagnosis)
            else:
                value = read.labels.get(key)
                shown = (read.parent_labels or {}).get(key)
            if value is not None:
                records.append((*head, key, value, *tail, shown, read.updated_at))
    table = pd.DataFrame(records, columns=list(STORED_READ_COLUMNS))
    # Ids stay integers beside missing ones (a CSV shows 2, not 2.0).
    return table.astype({"project": "Int64", "parent_prediction": "Int64"})
