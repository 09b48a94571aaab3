"""Explanation maps as numpy arrays: scaling, thresholding and the compact region shown to a dermatologist.

NumPy (and SciPy) only, so a serving process that runs its networks with ONNX Runtime can draw regions
without importing PyTorch. :func:`scale_maps` is pytorch-grad-cam's ``scale_cam_image`` (min-max,
bilinear resize as ``torch.nn.functional.interpolate(..., align_corners=False)``, ReLU, min-max), the
same steps as :func:`model.common.explain.scale_maps` on tensors (a test holds the two together).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

EPS = 1e-7  # pytorch-grad-cam's guard in its min-max scaling

FloatArray = NDArray[np.float32]


def _minmax(maps: FloatArray) -> FloatArray:
    low = maps.min(axis=(-2, -1), keepdims=True)
    shifted = maps - low
    high = shifted.max(axis=(-2, -1), keepdims=True)
    scaled: FloatArray = (shifted / (EPS + high)).astype(np.float32)
    return scaled


def _bilinear_matrix(size_in: int, size_out: int) -> FloatArray:
    """``(size_out, size_in)`` weights of a bilinear resize along one axis (``align_corners=False``)."""
    scale = size_in / size_out
    source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = (source - low).astype(np.float32)
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def resize_bilinear(maps: NDArray[Any], size: tuple[int, int]) -> FloatArray:
    """``(..., h, w)`` maps resized to ``size = (H, W)`` as PyTorch's bilinear interpolation does."""
    array = np.asarray(maps, dtype=np.float32)
    rows = _bilinear_matrix(array.shape[-2], size[0])
    cols = _bilinear_matrix(array.shape[-1], size[1])
    resized: FloatArray = (rows @ array @ cols.T).astype(np.float32)
    return resized


def scale_maps(raw: NDArray[Any], size: tuple[int, int]) -> FloatArray:
    """pytorch-grad-cam's scaling of ``(..., h, w)`` maps to ``size = (H, W)``, values in [0, 1]."""
    maps = _minmax(np.asarray(raw, dtype=np.float32))
    return _minmax(np.maximum(resize_bilinear(maps, size), 0.0))


def _one_map(raw_or_cam: Any) -> FloatArray:
    cam = np.asarray(raw_or_cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"expected one 2-D map, got shape {tuple(cam.shape)}")
    return cam


def _check_lesion(lesion: NDArray[np.bool_] | None, height: int, width: int) -> None:
    if lesion is not None and lesion.shape != (height, width):
        raise ValueError(f"lesion mask is {lesion.shape}, the image {(height, width)}")


def cam_to_mask(
    raw_or_cam: Any,
    width: int,
    height: int,
    threshold: float = 0.5,
    lesion: NDArray[np.bool_] | None = None,
) -> NDArray[np.bool_]:
    """A binary region mask at the image's original size from one map.

    The rule: resize the map to ``height x width`` (as :func:`scale_maps`), keep pixels at or above
    ``threshold`` of the map's range, and, when a lesion mask of that size is given, only inside it.

    Raises:
        ValueError: for a threshold outside (0, 1] or a lesion mask of another size.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    scaled = scale_maps(_one_map(raw_or_cam), (height, width))
    mask: NDArray[np.bool_] = scaled >= threshold
    _check_lesion(lesion, height, width)
    if lesion is not None:
        mask &= lesion.astype(bool)
    return mask


def compact_region(
    raw_or_cam: Any,
    width: int,
    height: int,
    lesion: NDArray[np.bool_] | None = None,
    threshold: float = 0.5,
    max_share: float = 0.3,
) -> NDArray[np.bool_]:
    """The region a dermatologist is shown for one finding: compact, and inside the lesion.

    :func:`cam_to_mask` keeps every pixel above half the map's maximum over the whole image; on real
    images that is often a blob over most of the lesion and the skin beside it. Here the map (resized as
    :func:`scale_maps`) is first restricted to the lesion mask and rescaled to its maximum *there*, then
    thresholded, and only the connected piece holding that maximum is kept; if it still covers more
    than ``max_share`` of the lesion (of the image, without a lesion mask), the threshold rises until
    the piece's area fits. An empty lesion mask means no lesion was found: no region.

    Raises:
        ValueError: a threshold or share outside (0, 1], or a lesion mask of another size.
    """
    from scipy import ndimage

    if not 0.0 < threshold <= 1.0 or not 0.0 < max_share <= 1.0:
        raise ValueError(f"threshold and max_share must be in (0, 1], got {threshold}, {max_share}")
    scaled = scale_maps(_one_map(raw_or_cam), (height, width))
    _check_lesion(lesion, height, width)
    if lesion is not None:
        scaled = scaled * lesion.astype(bool)
    peak = float(scaled.max())
    if peak <= 0.0:
        return np.zeros((height, width), dtype=bool)
    scaled = scaled / peak
    at = np.unravel_index(int(np.argmax(scaled)), scaled.shape)
    area = int(lesion.sum()) if lesion is not None else height * width
    cap = max(1, int(max_share * area))

    def piece(level: float) -> NDArray[np.bool_]:
        labels, _ = ndimage.label(scaled >= level)
        found: NDArray[np.bool_] = labels == labels[at]
        return found

    level = threshold
    region = piece(level)
    for _ in range(32):  # raise the level to the piece's cap-th highest value until the piece fits
        if region.sum() <= cap:
            break
        level = max(float(np.partition(scaled[region], -cap)[-cap]), np.nextafter(level, 2.0))
        region = piece(level)
    return region
