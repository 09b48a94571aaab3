"""Statistics both systems report: bootstrap intervals over lesions, and map-to-mask agreement.

Images of one lesion are not independent, so every interval resamples *lesions* (groups) whole:
:func:`bootstrap` for any statistic of a set of rows, :func:`bootstrap_means` (the same draws,
vectorised) for means of per-image figures. :func:`map_agreement` measures where a Grad-CAM map puts
its energy relative to a reference mask. NumPy and pandas only: serving and the consensus analyses use
them without PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from model.common.agreement import spatial_agreement
from model.common.maps import scale_maps

Array = NDArray[Any]


def bootstrap(
    statistic: Callable[[Array], dict[str, float]],
    groups: Array,
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """A statistic on all rows and its 95% percentile interval over a bootstrap of groups.

    Args:
        statistic: rows (index array) -> named values.
        groups: group label of each row (lesion ids); groups are resampled whole.
        n_boot: bootstrap replicates.
        seed: random seed.

    Returns:
        name -> {"value", "low", "high"}.
    """
    codes, uniques = pd.factorize(pd.Series(groups))
    members = [np.flatnonzero(codes == g) for g in range(len(uniques))]
    point = statistic(np.arange(len(groups)))
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
    values: dict[str, Array], groups: Array, n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Mean of each per-image metric and its 95% percentile interval over a bootstrap of groups.

    Groups (lesions) are resampled whole, as :func:`bootstrap` does: images of one lesion
    are not independent. With one image per lesion this is the bootstrap over images.

    Returns:
        name -> {"mean", "low", "high"}.
    """
    codes, uniques = pd.factorize(pd.Series(groups))
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


def map_agreement(raw: Array, mask: NDArray[np.bool_], threshold: float = 0.5) -> dict[str, float]:
    """Energy share inside ``mask``, IoU of the thresholded map, pointing game, and the mask's area share
    (:func:`model.common.agreement.spatial_agreement` of the map scaled to the mask's size)."""
    h, w = mask.shape
    cam = scale_maps(np.asarray(raw, dtype=np.float32), (h, w))
    return spatial_agreement(cam, mask, threshold)


__all__ = ["bootstrap", "bootstrap_means", "map_agreement"]
