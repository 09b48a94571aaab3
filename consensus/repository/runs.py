"""Consensus runs in the store: saved with their parameters, labels, reliability and region masks."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from consensus.models import (
    ConsensusLabel,
    ConsensusMask,
    ConsensusRun,
    Item,
    Rater,
    RaterReliability,
    RunKind,
)
from consensus.repository.answers import answers_hash

logger = logging.getLogger(__name__)


RELIABILITY_COLUMNS = (
    "sensitivity",
    "sensitivity_low",
    "sensitivity_high",
    "specificity",
    "specificity_low",
    "specificity_high",
)

if TYPE_CHECKING:
    import pandas as pd


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
    import pandas as pd

    rows = session.execute(
        select(Item.external_id, ConsensusLabel.label_key, ConsensusLabel.value, ConsensusLabel.posterior)
        .join(Item, ConsensusLabel.item_id == Item.id)
        .where(ConsensusLabel.run_id == run.id)
        .order_by(Item.external_id, ConsensusLabel.label_key)
    ).all()
    return pd.DataFrame(rows, columns=["task", "label_key", "value", "posterior"])


def consensus_probabilities(session: Session, run: ConsensusRun, label_key: str) -> pd.DataFrame:
    """A run's posteriors of one label: task x class (the classes in stored order), 0 where absent."""
    import pandas as pd

    rows = session.execute(
        select(Item.external_id, ConsensusLabel.probabilities)
        .join(Item, ConsensusLabel.item_id == Item.id)
        .where(ConsensusLabel.run_id == run.id, ConsensusLabel.label_key == label_key)
        .order_by(Item.external_id)
    ).all()
    frame = pd.DataFrame([probs for _, probs in rows], index=pd.Index([t for t, _ in rows], name="task"))
    return frame.fillna(0.0).astype(float)


def reader_reliability(session: Session, run: ConsensusRun, label_key: str) -> pd.Series:
    """Per rater (by name), the mean of the sensitivity and specificity a run estimated for one binary
    label (one of them where the other is unknown), highest first; raters with neither are left out."""
    import pandas as pd

    rows = session.execute(
        select(Rater.name, RaterReliability.sensitivity, RaterReliability.specificity)
        .join(Rater, RaterReliability.rater_id == Rater.id)
        .where(RaterReliability.run_id == run.id, RaterReliability.label_key == label_key)
    ).all()
    values = {
        name: sum(known) / len(known)
        for name, sens, spec in rows
        if (known := [v for v in (sens, spec) if v is not None])
    }
    series = pd.Series(values, dtype=float, name="reliability")
    series.index.name = "worker"
    return series.sort_values(ascending=False, kind="stable")


def consensus_masks(session: Session, run: ConsensusRun, label_key: str) -> dict[str, NDArray[np.bool_]]:
    """A run's consensus masks of one label: item external id -> mask."""
    rows = session.execute(
        select(Item.external_id, ConsensusMask.mask, ConsensusMask.height, ConsensusMask.width)
        .join(Item, ConsensusMask.item_id == Item.id)
        .where(ConsensusMask.run_id == run.id, ConsensusMask.label_key == label_key)
        .order_by(Item.external_id)
    ).all()
    return {task: unpack_mask(data, height, width) for task, data, height, width in rows}
