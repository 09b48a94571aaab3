"""The U-Net's loss and the metrics of binary lesion masks (Dice, IoU, boundary F-score).

Loss: :func:`dice_bce_loss`. Metrics on binary masks: :func:`dice`, :func:`iou`,
:func:`boundary_f_score`; any 0/1, 0/255, boolean or probability mask is read by :func:`as_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

MaskLike = NDArray[Any] | torch.Tensor
BoolMask = NDArray[np.bool_]


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss, each a mean over the batch.

    ``soft_dice = (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` per image, with ``p`` the
    sigmoid of the logits; the loss is ``BCE + mean(1 - soft_dice)``. BCE gives every pixel a gradient
    from the start; Dice weighs small lesions as much as large ones.

    Args:
        logits: ``(B, 1, H, W)`` (or ``(B, H, W)``) logits.
        target: the same shape, in [0, 1].
        smooth: added to numerator and denominator (an empty prediction of an empty mask scores 1).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    soft_dice = (2 * (probs * flat).sum(1) + smooth) / (probs.sum(1) + flat.sum(1) + smooth)
    return bce + (1 - soft_dice).mean()


# ------------------------------------------------------------------------------------------------
# Metrics on binary masks
# ------------------------------------------------------------------------------------------------


def as_mask(mask: MaskLike) -> BoolMask:
    """A boolean numpy mask: values above 0.5 are lesion (so 0/1, 0/255, bool and probabilities work)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    array: BoolMask = np.asarray(mask) > 0.5
    return array


def dice(pred: MaskLike, target: MaskLike) -> float:
    """Dice ``2|P & T| / (|P| + |T|)`` of two binary masks; 1.0 when both are empty."""
    p, t = as_mask(pred), as_mask(target)
    total = int(p.sum() + t.sum())
    return 1.0 if total == 0 else float(2 * (p & t).sum() / total)


def iou(pred: MaskLike, target: MaskLike) -> float:
    """Intersection over union (Jaccard) of two binary masks; 1.0 when both are empty."""
    p, t = as_mask(pred), as_mask(target)
    union = int((p | t).sum())
    return 1.0 if union == 0 else float((p & t).sum() / union)


def _shifted_any(mask: BoolMask, offsets: Sequence[tuple[int, int]], fill: bool) -> list[BoolMask]:
    """``mask`` shifted by each offset, the uncovered border filled with ``fill``."""
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = np.pad(mask, pad, mode="edge") if fill else np.pad(mask, pad, constant_values=False)
    h, w = mask.shape
    return [padded[pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets]


def boundary(mask: MaskLike) -> BoolMask:
    """Boundary pixels: the mask minus its erosion by a 3 x 3 square (8-connected).

    The image frame is not a boundary: pixels beyond it repeat the edge, so a lesion cut by the
    frame has no contour along it.
    """
    m = as_mask(mask)
    if m.ndim != 2:
        m = m.squeeze()
    if m.ndim != 2:
        raise ValueError(f"boundary needs a 2-D mask, got shape {m.shape}")
    neighbours = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    eroded = np.logical_and.reduce(_shifted_any(m, neighbours, fill=True))
    result: BoolMask = m & ~eroded
    return result


def _dilate_disk(mask: BoolMask, radius: int) -> BoolMask:
    """Pixels within Euclidean distance ``radius`` of a pixel of ``mask``."""
    if radius <= 0:
        return mask.copy()
    offsets = [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if dy * dy + dx * dx <= radius * radius
    ]
    result: BoolMask = np.logical_or.reduce(_shifted_any(mask, offsets, fill=False))
    return result


def boundary_f_score(pred: MaskLike, target: MaskLike, tolerance_px: int = 2) -> float:
    """Boundary F-score: how well the predicted contour follows the reference contour.

    Rule: contours are the pixels removed by a 3 x 3 erosion (:func:`boundary`). A predicted contour
    pixel is a hit when a reference contour pixel lies within Euclidean distance ``tolerance_px``
    (the reference contour dilated by a disk of that radius), and the other way round for recall;
    ``F = 2 P R / (P + R)``. Both masks empty: 1.0; exactly one empty: 0.0. Masks that fill the whole
    frame have no contour: two of them score 1.0, one of them against a partial mask 0.0.

    Args:
        pred: predicted binary mask ``(H, W)`` (or ``(1, H, W)``).
        target: reference binary mask of the same size.
        tolerance_px: matching distance in pixels (2 by default, about 0.5% of a 450-px image side).
    """
    p, t = as_mask(pred).squeeze(), as_mask(target).squeeze()
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: {p.shape} and {t.shape}")
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0
    bp, bt = boundary(p), boundary(t)
    if not bp.any() and not bt.any():
        return 1.0
    if not bp.any() or not bt.any():
        return 0.0
    precision = float((bp & _dilate_disk(bt, tolerance_px)).sum() / bp.sum())
    recall = float((bt & _dilate_disk(bp, tolerance_px)).sum() / bt.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


__all__ = ["as_mask", "boundary", "boundary_f_score", "dice", "dice_bce_loss", "iou"]
