r"""STAPLE: a consensus region from several raters' binary masks of one image and one label.

Simultaneous Truth And Performance Level Estimation (Warfield, Zou & Wells, "Simultaneous truth and
performance level estimation (STAPLE): an algorithm for the validation of image segmentation", IEEE
Trans. Med. Imaging 23(7):903-921, 2004, doi:10.1109/TMI.2004.828354) is Dawid-Skene for pixels: every
pixel :math:`i` has a latent true value :math:`T_i \in \{0, 1\}` with prior :math:`g = P(T_i = 1)`; rater
:math:`j` marks it (:math:`D_{ij} = 1`) with sensitivity :math:`p_j = P(D_{ij} = 1 \mid T_i = 1)` and
leaves it with specificity :math:`q_j = P(D_{ij} = 0 \mid T_i = 0)`, independently given :math:`T_i`.
EM alternates

* **M-step**: :math:`p_j = \sum_i W_i D_{ij} / \sum_i W_i`,
  :math:`q_j = \sum_i (1 - W_i)(1 - D_{ij}) / \sum_i (1 - W_i)`;
* **E-step**: :math:`W_i = g a_i / (g a_i + (1 - g) b_i)` with
  :math:`a_i = \prod_j p_j^{D_{ij}} (1 - p_j)^{1 - D_{ij}}` and
  :math:`b_i = \prod_j (1 - q_j)^{D_{ij}} q_j^{1 - D_{ij}}`,

starting from :math:`W_i` = the share of raters who marked pixel :math:`i`. As in ITK / SimpleITK's
``STAPLEImageFilter`` the prior is fixed during EM: by default the global foreground fraction (the mean
of the initial :math:`W`), and EM stops when no :math:`p_j` or :math:`q_j` moves by more than ``tol``
between iterations.

A pixel's E-step depends only on which raters marked it, so the EM runs over the distinct marking
patterns (at most :math:`2^R` for :math:`R` raters) weighted by their pixel counts: the cost per
iteration does not grow with the image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Floor on the rates before a log: a rate of exactly 0 or 1 would make some pattern impossible.
_EPS = 1e-12


@dataclass(frozen=True)
class StapleResult:
    """What :func:`staple` returns.

    Attributes:
        probability: consensus probability map ``W`` (image shape), ``P(pixel is foreground)``.
        mask: the consensus mask ``W >= threshold``.
        sensitivity: per rater, ``p_j`` (in the order of the masks).
        specificity: per rater, ``q_j``.
        prior: the foreground prior ``g`` used.
        n_iter: EM iterations run.
        converged: whether the tolerance was met before ``n_iter``.
    """

    probability: FloatArray
    mask: BoolArray
    sensitivity: FloatArray
    specificity: FloatArray
    prior: float
    n_iter: int
    converged: bool


def _stack(masks: Sequence[npt.ArrayLike] | npt.NDArray[Any]) -> BoolArray:
    """Raters' masks as one boolean array ``(raters, *image)``; checks shapes and values."""
    arrays = [np.asarray(m) for m in masks]
    if len(arrays) < 2:
        raise ValueError(f"STAPLE needs the masks of at least two raters, got {len(arrays)}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"all masks must have the same shape, got {sorted(shapes)}")
    stacked = np.stack(arrays)
    if stacked.size == 0:
        raise ValueError("the masks are empty (zero pixels)")
    if stacked.dtype != np.bool_:
        if not np.issubdtype(stacked.dtype, np.number):
            raise ValueError(f"masks must be numeric or boolean, got dtype {stacked.dtype}")
        bad = ~np.isin(stacked, (0, 1))  # NaN is caught here too
        if bad.any():
            raise ValueError(
                f"masks must be binary (0/1 or bool); found values {np.unique(stacked[bad])[:5].tolist()}"
            )
    return stacked.astype(bool)


def staple(
    masks: Sequence[npt.ArrayLike] | npt.NDArray[Any],
    prior: float | None = None,
    n_iter: int = 1000,
    tol: float = 1e-7,
    threshold: float = 0.5,
) -> StapleResult:
    """STAPLE consensus of several raters' binary masks of one image and one label.

    Args:
        masks: one binary mask per rater (a sequence of same-shaped arrays, or one array whose first
            axis is the rater); 1 / True = the rater marked the pixel.
        prior: fixed foreground prior ``g``; default the global foreground fraction of the masks (mean
            over raters and pixels), as ITK's ``STAPLEImageFilter`` with ``ConfidenceWeight`` 1.
        n_iter: maximum number of EM iterations.
        tol: stop when no sensitivity or specificity changes by more than this (ITK: 1e-7).
        threshold: the mask is ``probability >= threshold``.

    Returns:
        The probability map, mask, per-rater sensitivities / specificities and convergence.

    Raises:
        ValueError: fewer than two masks, shapes that differ, non-binary values, or a prior outside
            (0, 1).

    Examples:
        >>> a = np.zeros((8, 8), bool); a[2:6, 2:6] = True
        >>> b = a.copy(); b[2, 2] = False
        >>> c = a.copy(); c[1, 1] = True
        >>> result = staple([a, b, c])
        >>> bool((result.mask == a).all())
        True
    """
    stacked = _stack(masks)
    n_raters, shape = stacked.shape[0], stacked.shape[1:]
    if n_raters > 62:
        raise ValueError(f"at most 62 raters per image are supported, got {n_raters}")
    flat = stacked.reshape(n_raters, -1)

    # Encode each pixel's marking pattern as an integer and run EM over the distinct patterns.
    bits = np.left_shift(np.int64(1), np.arange(n_raters, dtype=np.int64))
    codes = bits @ flat.astype(np.int64)
    patterns, inverse, weights = np.unique(codes, return_inverse=True, return_counts=True)
    marked = ((patterns[None, :] & bits[:, None]) != 0).astype(np.float64)  # raters × patterns
    weights = weights.astype(np.float64)

    w = marked.mean(axis=0)  # initial W: share of raters who marked the pattern
    g = float(np.average(w, weights=weights)) if prior is None else float(prior)
    if not 0 < g < 1:
        raise ValueError(
            f"the foreground prior must be in (0, 1), got {g}"
            + (" (no rater marked any pixel, or every rater marked every pixel)" if prior is None else "")
        )

    last_p = last_q = np.full(n_raters, -10.0)
    p = q = last_p
    converged = False
    iteration = 0
    for iteration in range(1, n_iter + 1):
        # M-step: sensitivity and specificity of every rater from the current W.
        fg, bg = w * weights, (1 - w) * weights
        p = (marked @ fg) / max(fg.sum(), _EPS)
        q = ((1 - marked) @ bg) / max(bg.sum(), _EPS)
        # E-step in log space (hundreds of raters would underflow the products).
        lp, l1p = np.log(np.clip(p, _EPS, 1)), np.log(np.clip(1 - p, _EPS, 1))
        lq, l1q = np.log(np.clip(q, _EPS, 1)), np.log(np.clip(1 - q, _EPS, 1))
        log_a = np.log(g) + lp @ marked + l1p @ (1 - marked)
        log_b = np.log1p(-g) + l1q @ marked + lq @ (1 - marked)
        w = 1 / (1 + np.exp(np.clip(log_b - log_a, -700, 700)))
        if iteration > 1 and np.abs(p - last_p).max() <= tol and np.abs(q - last_q).max() <= tol:
            converged = True
            break
        last_p, last_q = p, q
    if not converged:
        logger.debug("STAPLE did not reach tol=%g in %d iterations", tol, n_iter)

    probability = w[inverse].reshape(shape)
    return StapleResult(
        probability=probability,
        mask=probability >= threshold,
        sensitivity=p,
        specificity=q,
        prior=g,
        n_iter=iteration,
        converged=converged,
    )
