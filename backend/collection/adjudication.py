"""An adjudicator's annotations become gold labels of the items they adjudicate.

The tasks of an adjudication project (made by ``dermassist adjudicate``, see
:mod:`backend.label_studio.adjudication`) carry :data:`SOURCE_ITEM` in their data: the store's
external id of the item they adjudicate. An annotation of such a task is not one more reader: each
label it answers is stored as a gold label of that item (source ``adjudication``, the adjudicator as
reference, the annotation id for updates and deletes), which the next consensus run holds at its class.
The webhook and the sync both come here through :func:`backend.collection.ingest.apply_annotation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.label_studio.adjudication import DISPUTED_KEYS, SOURCE_ITEM
from backend.label_studio.annotations import ParsedAnnotation
from consensus.models import GoldLabel, Item
from consensus.repository import ham_code
from consensus.repository.gold import HAM_KEY, delete_gold, upsert_gold

#: The gold source name of an adjudication.
ADJUDICATION = "adjudication"


def adjudicated_item(data: Mapping[str, Any] | None) -> str | None:
    """The external id of the item a task adjudicates, or None for an ordinary task."""
    if data is None:
        return None
    value = data.get(SOURCE_ITEM)
    return value if isinstance(value, str) and 0 < len(value) <= 300 else None


def disputed_keys(data: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The label keys an adjudication task was made for, or None where the task does not say."""
    value = data.get(DISPUTED_KEYS) if data is not None else None
    if not isinstance(value, str):
        return None
    return frozenset(k.strip() for k in value.split(",") if k.strip())


def gold_values(parsed: ParsedAnnotation, keys: frozenset[str] | None = None) -> dict[str, str]:
    """The labels an adjudication gives: the HAM10000 class and the binary targets it answered.

    With ``keys`` (the disputed labels of the task), a binary target outside them counts only where the
    adjudicator marked it present: a pattern left unmarked on a task about the diagnosis is not a
    statement that it is absent.
    """
    values = {
        key: str(int(value))
        for key, value in parsed.labels.items()
        if keys is None or key in keys or int(value) == 1
    }
    code = ham_code(parsed.diagnosis)
    if code is not None:
        values[HAM_KEY] = code
    return values


def apply_adjudication(
    session: Session,
    external_id: str,
    parsed: ParsedAnnotation,
    annotation_id: int,
    adjudicator: str,
    keys: frozenset[str] | None = None,
) -> tuple[int, int]:
    """Store an adjudication's labels as gold of ``external_id``; return ``(written, unchanged)``.

    Labels the adjudicator no longer gives (an updated annotation that drops one) are soft-deleted
    and counted as written.

    Raises:
        LookupError: the store does not know the adjudicated item (the source project was never
            synced), so there is nothing to attach the gold to.
    """
    item = session.scalars(select(Item).where(Item.external_id == external_id)).first()
    if item is None:
        raise LookupError(f"the adjudicated item {external_id!r} is not in the store; sync its project first")
    values = gold_values(parsed, keys)
    written = unchanged = 0
    for key, value in values.items():
        if upsert_gold(session, item, key, value, ADJUDICATION, adjudicator, ls_annotation_id=annotation_id):
            written += 1
        else:
            unchanged += 1
    dropped = session.scalars(
        select(GoldLabel).where(
            GoldLabel.ls_annotation_id == annotation_id,
            GoldLabel.deleted.is_(False),
            GoldLabel.label_key.not_in(list(values) or [""]),
        )
    ).all()
    for row in dropped:
        row.deleted = True
    return written + len(dropped), unchanged


def withdraw_adjudications(session: Session, annotation_ids: list[int]) -> int:
    """Soft-delete the gold labels of deleted or skipped adjudication annotations."""
    return delete_gold(session, annotation_ids)
