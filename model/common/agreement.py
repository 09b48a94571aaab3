"""Where an explanation map points, against a reference region: energy inside, pointing game, IoU.

NumPy (and SciPy for the pointing game's tolerance) only, so a serving process that runs its networks
with ONNX Runtime can score its maps without importing PyTorch. Every function takes one map already at
the mask's size (:func:`model.common.maps.scale_maps` resizes a raw Grad-CAM map) and one boolean mask.

- **Energy inside** (the "energy-based pointing game" of Score-CAM, Wang et al. 2020): the share of the
  map's positive mass that falls inside the mask. A map spread evenly over the image scores the mask's
  area share, which :func:`spatial_agreement` reports beside it as the chance level.
- **Pointing game** (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016): a hit
  when the map's maximum lies inside the mask, or within ``tolerance`` pixels of it (Zhang et al. use 15
  px at the original resolution). The maximum is the first maximal pixel in row-major order; a flat map
  (no maximum) is a miss.
- **IoU**: the map thresholded at ``threshold`` of its own maximum (default 0.5: the rule of
  :func:`model.common.maps.cam_to_mask` for a min-max normalised map, which is what the backend paints
  as the predicted region) against the mask, intersection over union.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray


def _check(cam: NDArray[Any], mask: NDArray[Any]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    heat = np.asarray(cam, dtype=np.float64)
    region = np.asarray(mask, dtype=bool)
    if heat.ndim != 2 or heat.shape != region.shape:
        raise ValueError(f"expected one 2-D map the size of the mask, got {heat.shape} and {region.shape}")
    if not np.isfinite(heat).all():
        raise ValueError("the map holds NaN or infinite values")
    return heat, region


def energy_inside(cam: NDArray[Any], mask: NDArray[Any]) -> float:
    """Share of the map's positive mass inside the mask (NaN for a map with no positive value)."""
    heat, region = _check(cam, mask)
    positive = np.clip(heat, 0.0, None)
    total = float(positive.sum())
    return float(positive[region].sum() / total) if total > 0 else float("nan")


def pointing_game(cam: NDArray[Any], mask: NDArray[Any], tolerance: int = 0) -> bool:
    """Whether the map's maximum lies in the mask, or within ``tolerance`` pixels (chessboard distance).

    Raises:
        ValueError: a negative tolerance, or a map and mask of different sizes.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    heat, region = _check(cam, mask)
    if heat.max() <= heat.min():
        return False
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    if region[peak]:
        return True
    if tolerance == 0:
        return False
    y, x = (int(v) for v in peak)
    return bool(
        region[max(0, y - tolerance) : y + tolerance + 1, max(0, x - tolerance) : x + tolerance + 1].any()
    )


def map_region(cam: NDArray[Any], threshold: float = 0.5) -> NDArray[np.bool_]:
    """The map's region: pixels at or above ``threshold`` of its maximum (none for a map without a positive
    value).

    Raises:
        ValueError: a threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    heat = np.asarray(cam, dtype=np.float64)
    peak = float(heat.max()) if heat.size else 0.0
    if peak <= 0:
        return np.zeros(heat.shape, dtype=bool)
    region: NDArray[np.bool_] = heat >= threshold * peak
    return region


def thresholded_iou(cam: NDArray[Any], mask: NDArray[Any], threshold: float = 0.5) -> float:
    """IoU of :func:`map_region` with the mask (NaN when both are empty)."""
    heat, region = _check(cam, mask)
    predicted = map_region(heat, threshold)
    union = int((predicted | region).sum())
    return float((predicted & region).sum() / union) if union else float("nan")


def spatial_agreement(
    cam: NDArray[Any], mask: NDArray[Any], threshold: float = 0.5, tolerance: int = 0
) -> dict[str, float]:
    """All three figures for one map and one mask, and the mask's area share (energy inside's chance level).

    Returns:
        ``energy_inside``, ``pointing`` (1.0 hit, 0.0 miss), ``iou``, ``area``.
    """
    heat, region = _check(cam, mask)
    return {
        "energy_inside": energy_inside(heat, region),
        "pointing": float(pointing_game(heat, region, tolerance)),
        "iou": thresholded_iou(heat, region, threshold),
        "area": float(region.mean()),
    }


__all__ = ["energy_inside", "map_region", "pointing_game", "spatial_agreement", "thresholded_iou"]
