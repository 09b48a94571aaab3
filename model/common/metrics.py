"""Statistics both systems report: bootstrap intervals over lesions, and map-to-mask agreement.

Images of one lesion (and a patient's lesions) are not independent, so an interval resamples *groups*
whole where the evaluated set says which images belong together: :func:`bootstrap` for any statistic of
a set of rows, :func:`bootstrap_means` (the same draws, vectorised) for means of per-image figures.
Without groups both resample images, and a set with one image per group gives the same draws as no
groups. :func:`resampling` picks the groups of a table (patients, else lesions, else images) and says
what was resampled, for the reports. :func:`map_agreement` measures where a Grad-CAM map puts its energy
relative to a reference mask. NumPy and pandas only: serving and the consensus analyses use them
without PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from model.common.agreement import spatial_agreement
from model.common.maps import scale_maps

Array = NDArray[Any]

#: What :func:`resampling` can resample, and the words a report uses for one and for many.
UNITS = {"patient": "patients", "lesion": "lesions", "image": "images"}


def _members(groups: Array | None, n: int | None) -> tuple[list[Array], int]:
    """Row positions of each group (one row per group without groups), and the number of rows."""
    if groups is None:
        if n is None:
            raise ValueError("give the groups (one key per row) or the number of rows n")
        return [np.array([i]) for i in range(n)], n
    groups = np.asarray(groups)
    if n is not None and n != len(groups):
        raise ValueError(f"{len(groups)} group keys for {n} rows")
    codes, uniques = pd.factorize(pd.Series(groups))
    if (codes < 0).any():
        raise ValueError("every row needs a group key (found a missing one)")
    return [np.flatnonzero(codes == g) for g in range(len(uniques))], len(groups)


def bootstrap(
    statistic: Callable[[Array], dict[str, float]],
    groups: Array | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    n: int | None = None,
) -> dict[str, dict[str, float]]:
    """A statistic on all rows and its 95% percentile interval over a bootstrap of groups.

    Args:
        statistic: rows (index array) -> named values.
        groups: group key of each row (lesion or patient ids); groups are resampled whole. None:
            rows (images) are resampled one by one (then ``n`` says how many there are).
        n_boot: bootstrap replicates.
        seed: random seed (the same seed, rows and groups give the same interval).
        n: the number of rows; needed without ``groups``.

    Returns:
        name -> {"value", "low", "high"}.

    Raises:
        ValueError: neither groups nor ``n``, a length that differs from ``n``, or a missing key.
    """
    members, n_rows = _members(groups, n)
    point = statistic(np.arange(n_rows))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        chosen = rng.integers(0, len(members), len(members))
        rows = np.concatenate([members[g] for g in chosen]) if len(members) else np.array([], int)
        for k, v in statistic(rows).items():
            samples[k].append(v)
    out: dict[str, dict[str, float]] = {}
    for k, v in point.items():
        values = np.asarray(samples[k], dtype=float)
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if values.size else (np.nan, np.nan)
        out[k] = {"value": float(v), "low": float(low), "high": float(high)}
    return out


def bootstrap_means(
    values: dict[str, Array], groups: Array | None = None, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean of each per-image metric and its 95% percentile interval over a bootstrap of groups.

    Groups (lesions, patients) are resampled whole, as :func:`bootstrap` does: images of one lesion
    are not independent. Without groups, or with one image per group, this is the bootstrap over
    images.

    Returns:
        name -> {"mean", "low", "high"}.
    """
    n_rows = len(next(iter(values.values()))) if values else 0
    keys = np.arange(n_rows) if groups is None else np.asarray(groups)
    codes, uniques = pd.factorize(pd.Series(keys))
    n_groups = len(uniques)
    rng = np.random.default_rng(seed)
    # How often each group is drawn in each replicate: (n_boot, n_groups).
    draws = np.stack(
        [np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups) for _ in range(n_boot)]
    )
    sizes = np.bincount(codes, minlength=n_groups).astype(float)
    out: dict[str, dict[str, float]] = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=float)
        sums = np.bincount(codes, weights=v, minlength=n_groups)
        means = (draws @ sums) / np.maximum(draws @ sizes, 1.0)
        low, high = np.percentile(means, [2.5, 97.5])
        out[name] = {"mean": float(v.mean()), "low": float(low), "high": float(high)}
    return out


@dataclass(frozen=True)
class Resampling:
    """What a bootstrap resamples: one group key per image (None: the images themselves).

    Attributes:
        groups: one key per row, or None.
        unit: ``"patient"``, ``"lesion"`` or ``"image"``.
        n_units: how many there are (distinct keys, or rows).
        n_images: rows.
    """

    groups: Array | None
    unit: str
    n_units: int
    n_images: int

    def subset(self, rows: Array) -> Resampling:
        """The same resampling of some of the rows (a boolean mask or positions)."""
        index = np.arange(self.n_images)[rows]
        if self.groups is None:
            return Resampling(None, self.unit, len(index), len(index))
        groups = np.asarray(self.groups)[index]
        return Resampling(groups, self.unit, int(pd.Series(groups).nunique()), len(index))

    def describe(self) -> str:
        """``"bootstrap over 1,234 lesions (2,000 images)"``, or ``"bootstrap over 812 images"``."""
        words = UNITS[self.unit] if self.n_units != 1 else self.unit
        text = f"bootstrap over {self.n_units:,} {words}"
        return text if self.unit == "image" else f"{text} ({self.n_images:,} images)"

    def as_dict(self) -> dict[str, Any]:
        """What ``metrics.json`` records: ``unit``, ``n_units``, ``n_images`` and the words."""
        return {
            "unit": self.unit,
            "n_units": self.n_units,
            "n_images": self.n_images,
            "text": self.describe(),
        }


def _keys(table: pd.DataFrame, column: str) -> Array | None:
    """A column as text (None where empty or missing), or None without the column."""
    if column not in table.columns:
        return None
    text = [None if pd.isna(v) else str(v).strip() for v in table[column]]
    return np.array([v or None for v in text], dtype=object)


def resampling(table: pd.DataFrame, unit: str = "auto") -> Resampling:
    """The groups an evaluation's bootstrap resamples, from a table's ``patient_id`` / ``lesion_id``.

    Args:
        table: one row per image (:func:`model.common.data.load_table`'s columns; ``patient_id`` where
            the data name patients).
        unit: ``"patient"`` (an image without a patient is its lesion's own group), ``"lesion"``,
            ``"image"``, or ``"auto"``: patients where the table names any, else lesions where any
            lesion id differs from its image id (``load_table`` gives an image without one its own
            id), else images.

    Raises:
        ValueError: an unknown unit, or a unit the table has no column for.
    """
    if unit not in ("auto", *UNITS):
        raise ValueError(f"unit must be 'auto', 'patient', 'lesion' or 'image', got {unit!r}")
    n = len(table)
    image_ids = _keys(table, "image_id")
    if image_ids is None:
        image_ids = np.array([str(i) for i in range(n)], dtype=object)
    lesions, patients = _keys(table, "lesion_id"), _keys(table, "patient_id")
    if lesions is not None:
        lesions = np.where(pd.isna(lesions), image_ids, lesions)
    if unit == "auto":
        if patients is not None and pd.notna(patients).any():
            unit = "patient"
        elif lesions is not None and (lesions != image_ids).any():
            unit = "lesion"
        else:
            unit = "image"
    if unit == "image":
        return Resampling(None, "image", n, n)
    if (unit == "lesion" and lesions is None) or (unit == "patient" and patients is None):
        raise ValueError(f"the table has no {unit}_id column to resample {UNITS[unit]} by")
    keys = np.array([f"lesion:{v}" for v in (image_ids if lesions is None else lesions)], dtype=object)
    if unit == "patient" and patients is not None:
        # Patient ids are per source folder, as load_tables makes lesion ids.
        sources = _keys(table, "source")
        for i, patient in enumerate(patients):
            if patient is not None:
                keys[i] = f"patient:{sources[i]}:{patient}" if sources is not None else f"patient:{patient}"
    return Resampling(keys, unit, len(set(keys)), n)


def map_agreement(raw: Array, mask: NDArray[np.bool_], threshold: float = 0.5) -> dict[str, float]:
    """Energy share inside ``mask``, IoU of the thresholded map, pointing game, and the mask's area share
    (:func:`model.common.agreement.spatial_agreement` of the map scaled to the mask's size)."""
    h, w = mask.shape
    cam = scale_maps(np.asarray(raw, dtype=np.float32), (h, w))
    return spatial_agreement(cam, mask, threshold)


__all__ = ["UNITS", "Resampling", "bootstrap", "bootstrap_means", "map_agreement", "resampling"]
