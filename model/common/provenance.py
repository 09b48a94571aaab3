"""Where each output of a model comes from: validated on real images, synthetic only, or untrained.

A model's outputs differ in what backs them. The release model's BCC head was trained and validated on
real dermoscopy (HAM10000); its pigment-network head on ISIC 2018's attribute masks; its six BCC-pattern
heads never saw a labelled image. The backend shows a dermatologist only what was validated on real
images (see ``backend.label_studio.predictions``), so every checkpoint records, per output, one of:

- ``validated``: trained on real images and, on a held-out validation split of real images with at
  least :data:`MIN_POSITIVES` positives, AUROC at least :data:`MIN_AUROC`. The figure, its data and
  its size are recorded beside the status.
- ``unvalidated``: trained on real labels, but the validation split had too few positives to say, or
  the figure fell below the bar.
- ``synthetic``: trained (and validated, if at all) on synthetic drawings only.
- ``untrained``: no labelled example of this output was ever seen; the head is its initialisation.

Pure functions over arrays: :mod:`model.multitask.train` calls :func:`assess` at its best epoch, the release
tool
overrides it with the figures of the final evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

MIN_POSITIVES = 20
MIN_AUROC = 0.80
MIN_DICE = 0.85  # a lesion outline a dermatologist can start from


class Provenance(StrEnum):
    VALIDATED = "validated"
    UNVALIDATED = "unvalidated"
    SYNTHETIC = "synthetic"
    UNTRAINED = "untrained"


def record(
    status: Provenance | str,
    *,
    metric: str | None = None,
    value: float | None = None,
    interval: Sequence[float] | None = None,
    n_images: int | None = None,
    n_positive: int | None = None,
    data: str | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """One output's provenance as a plain dict (as stored in checkpoints, manifests and the store)."""
    entry: dict[str, Any] = {"status": Provenance(status).value}
    for key, item in (
        ("metric", metric),
        ("value", None if value is None or math.isnan(value) else round(float(value), 4)),
        ("interval", None if interval is None else [round(float(v), 4) for v in interval]),
        ("n_images", n_images),
        ("n_positive", n_positive),
        ("data", data),
        ("note", note),
    ):
        if item is not None:
            entry[key] = item
    return entry


def assess(
    targets: Sequence[str],
    train_known: NDArray[np.floating[Any]],
    train_positive: NDArray[np.floating[Any]],
    val_targets: NDArray[np.floating[Any]],
    val_known: NDArray[np.floating[Any]],
    val_scores: NDArray[np.floating[Any]],
    synthetic: bool,
    data: str,
) -> dict[str, dict[str, Any]]:
    """Each output's provenance after training.

    Args:
        targets: output keys, in column order.
        train_known: ``(K,)`` training images with a known label per output.
        train_positive: ``(K,)`` of those, positives (targets >= 0.5).
        val_targets, val_known, val_scores: ``(N, K)`` validation targets, known-masks and scores.
        synthetic: the training data is synthetic drawings.
        data: what the validation split is, in words (kept with the figure).
    """
    from sklearn.metrics import roc_auc_score

    out: dict[str, dict[str, Any]] = {}
    for k, key in enumerate(targets):
        if train_known[k] == 0 or train_positive[k] == 0 or train_positive[k] == train_known[k]:
            out[key] = record(Provenance.UNTRAINED, note="no training image had both labels of this output")
            continue
        rows = val_known[:, k] > 0
        y = val_targets[rows, k] >= 0.5
        n_pos = int(y.sum())
        auroc = float(roc_auc_score(y, val_scores[rows, k])) if 0 < n_pos < int(rows.sum()) else math.nan
        out[key] = from_auroc(auroc, int(rows.sum()), n_pos, data, synthetic=synthetic)
    return out


def from_auroc(
    auroc: float,
    n_images: int,
    n_positive: int,
    data: str,
    interval: Sequence[float] | None = None,
    synthetic: bool = False,
) -> dict[str, Any]:
    """An output judged by its validation AUROC: validated on real images with at least
    ``MIN_POSITIVES`` positives and AUROC at least ``MIN_AUROC``; the record says why not otherwise."""
    if synthetic:
        status, note = Provenance.SYNTHETIC, "synthetic drawings only"
    elif n_positive >= MIN_POSITIVES and auroc >= MIN_AUROC:
        status, note = Provenance.VALIDATED, None
    elif n_positive < MIN_POSITIVES:
        status, note = Provenance.UNVALIDATED, f"fewer than {MIN_POSITIVES} positives in the validation split"
    else:
        status, note = Provenance.UNVALIDATED, f"validation AUROC below {MIN_AUROC}"
    return record(
        status, metric="auroc", value=auroc, interval=interval, n_images=n_images, n_positive=n_positive,
        data=data, note=note,
    )  # fmt: skip


def status_of(provenance: Mapping[str, Mapping[str, Any]] | None, key: str) -> Provenance:
    """An output's status; an output a checkpoint says nothing about counts as untrained."""
    entry = (provenance or {}).get(key)
    if not entry:
        return Provenance.UNTRAINED
    try:
        return Provenance(str(entry.get("status")))
    except ValueError:
        return Provenance.UNTRAINED


def shown(provenance: Mapping[str, Mapping[str, Any]] | None, key: str, show_all: bool = False) -> bool:
    """Whether an output may be shown to a dermatologist as a pre-annotation."""
    return show_all or status_of(provenance, key) is Provenance.VALIDATED


def from_figure(
    metric: str, value: float, n_images: int, bar: float, synthetic: bool, data: str
) -> dict[str, Any]:
    """An output judged by one validation figure (a Dice, a macro AUROC): validated when real, at
    least 100 images and the figure at least ``bar``."""
    if synthetic:
        status = Provenance.SYNTHETIC
    elif n_images >= 100 and value >= bar:
        status = Provenance.VALIDATED
    else:
        status = Provenance.UNVALIDATED
    return record(status, metric=metric, value=value, n_images=n_images, data=data)
