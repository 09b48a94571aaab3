"""The lesion pair's inputs and outputs in NumPy, with PyTorch's numbers: what serving without PyTorch needs.

- :func:`resize`: bilinear resizing of a ``(C, H, W)`` array exactly as ``torch.nn.functional.interpolate``
  does it (``mode="bilinear"``, ``align_corners=False``, with or without ``antialias``): the U-Net's
  probabilities up to the image's own size, the lesion crop down (or up) to the classifier's side.
- :func:`lesion_box` / :func:`crop_lesion`: the segmented lesion as the dual classifier's lesion encoder
  sees it (:func:`model.lesion.dual.lesion_crop` is the PyTorch twin used in training).
- :func:`encode_rows`: age / sex / site as the classifier's metadata inputs
  (:func:`model.lesion.dual.encode_metadata` wraps it in tensors).

Tests hold each function to its PyTorch twin (within float32 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

from labeling_config import SEXES, SITES

AGE_SCALE = 100.0
FloatArray = NDArray[np.float32]


@lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int, antialias: bool) -> FloatArray:
    """The ``(n_out, n_in)`` matrix of PyTorch's bilinear interpolation along one axis
    (``align_corners=False``; ATen's ``UpSampleKernel``: the separable filter of the antialiased path,
    or the two-tap weights of the plain one)."""
    scale = n_in / n_out
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            taps = np.arange(lo, hi)
            w = np.clip(1.0 - np.abs((taps - center + 0.5) * invscale), 0.0, None)
            total = w.sum()
            matrix[i, lo:hi] = w / total if total != 0 else w
    else:
        for i in range(n_out):
            source = max(scale * (i + 0.5) - 0.5, 0.0)
            index = min(int(source), n_in - 1)
            weight = min(max(source - index, 0.0), 1.0)
            matrix[i, index] += 1.0 - weight
            matrix[i, index + (1 if index < n_in - 1 else 0)] += weight
    return matrix.astype(np.float32)


def resize(array: NDArray[Any], size: tuple[int, int], antialias: bool = False) -> FloatArray:
    """``(C, H, W)`` (or ``(H, W)``) resized to ``size = (height, width)`` bilinearly, as PyTorch's
    ``interpolate(..., mode="bilinear", align_corners=False, antialias=antialias)``."""
    data = np.asarray(array, dtype=np.float32)
    flat = data[None] if data.ndim == 2 else data
    rows = _weights(flat.shape[1], size[0], antialias)
    cols = _weights(flat.shape[2], size[1], antialias)
    out: FloatArray = np.einsum("oh,chw,pw->cop", rows, flat, cols, optimize=True).astype(np.float32)
    return out[0] if data.ndim == 2 else out


def lesion_box(mask: NDArray[Any], margin: float = 0.1) -> tuple[int, int, int, int]:
    """The lesion's bounding box ``(top, left, bottom, right)`` with a margin; the whole image if empty."""
    height, width = mask.shape[:2]
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0, 0, height, width
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    dy, dx = int((bottom - top) * margin), int((right - left) * margin)
    return max(0, top - dy), max(0, left - dx), min(height, bottom + dy), min(width, right + dx)


def crop_lesion(image: NDArray[Any], mask: NDArray[Any], size: int, margin: float = 0.1) -> FloatArray:
    """``(3, H, W)`` in [0, 1] cropped to the mask's box (with ``margin``) and resized to ``size`` square,
    antialiased: :func:`model.lesion.dual.lesion_crop` without PyTorch."""
    top, left, bottom, right = lesion_box(np.asarray(mask), margin)
    return resize(np.asarray(image)[:, top:bottom, left:right], (size, size), antialias=True)


def encode_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, NDArray[Any]]:
    """Age / sex / site of each row (HAM10000's ``age``, ``sex``, ``localization``, or ``site``) as the
    classifier's inputs: ``age`` (B,) years / 100, ``age_missing`` (B,) 0/1 (float32), ``sex`` and
    ``site`` (B,) indices into ``SEXES`` / ``SITES`` (int64).

    Missing or unreadable values become "unknown" (sex, site) or a missing-age flag; values outside
    the vocabulary are "unknown" too.
    """
    ages, missing, sexes, sites = [], [], [], []
    for row in rows:
        raw = row.get("age")
        try:
            age = float(raw) if raw is not None else math.nan
        except (TypeError, ValueError):
            age = math.nan
        ok = math.isfinite(age) and 0.0 <= age <= 120.0
        ages.append(age / AGE_SCALE if ok else 0.0)
        missing.append(0.0 if ok else 1.0)
        sexes.append(_index(row.get("sex"), SEXES))
        sites.append(_index(row.get("localization", row.get("site")), SITES))
    return {
        "age": np.asarray(ages, dtype=np.float32),
        "age_missing": np.asarray(missing, dtype=np.float32),
        "sex": np.asarray(sexes, dtype=np.int64),
        "site": np.asarray(sites, dtype=np.int64),
    }


def _index(value: Any, vocabulary: Sequence[str]) -> int:
    text = str(value).strip().lower() if value is not None else ""
    if text in ("", "nan", "none"):
        text = "unknown"
    return vocabulary.index(text) if text in vocabulary else vocabulary.index("unknown")
