"""Calibration and decision thresholds, chosen on validation data. Pure numpy.

Temperature scaling (Guo et al. 2017) divides an output's logit by ``T`` before the sigmoid. The
negative log-likelihood is convex in ``beta = 1 / T`` (a one-parameter logistic regression without
intercept), so a safeguarded Newton iteration finds the optimum exactly.

Thresholds act on the calibrated probability. The default maximises Youden's J (sensitivity +
specificity - 1). A screening service that must miss few cancers sets a target sensitivity instead:
the highest threshold whose validation sensitivity reaches the target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_curve

FloatArray = NDArray[np.floating[Any]]


def _sigmoid(z: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free
    return out


def fit_temperature(logits: FloatArray, targets: FloatArray, max_iter: int = 50) -> float:
    """The temperature that minimises the binary NLL of ``sigmoid(logits / T)`` against ``targets``.

    Args:
        logits: ``(N,)`` raw outputs.
        targets: ``(N,)`` labels or probabilities in [0, 1].
        max_iter: Newton iterations.

    Returns:
        ``T`` in [0.05, 20]; 1.0 when the data cannot identify it (empty, or every logit 0).

    Raises:
        ValueError: for mismatched shapes or targets outside [0, 1].
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    if z.shape != y.shape:
        raise ValueError(f"logits {z.shape} and targets {y.shape} differ in shape")
    if y.size and (y.min() < 0 or y.max() > 1):
        raise ValueError("targets must be in [0, 1]")
    if y.size == 0 or not np.any(z):
        return 1.0
    beta = 1.0
    low, high = 1.0 / 20.0, 1.0 / 0.05
    for _ in range(max_iter):
        p = _sigmoid(beta * z)
        grad = float(np.sum((p - y) * z))
        hess = float(np.sum(p * (1 - p) * z * z))
        if hess <= 1e-12:
            break
        step = grad / hess
        new = min(max(beta - step, low), high)
        if abs(new - beta) < 1e-8:
            beta = new
            break
        beta = new
    return float(1.0 / beta)


def choose_threshold(probs: FloatArray, labels: FloatArray, target_sensitivity: float | None = None) -> float:
    """A decision threshold on ``probs``: Youden's J, or the highest one reaching a sensitivity.

    Args:
        probs: ``(N,)`` calibrated probabilities.
        labels: ``(N,)`` 0/1 labels (probabilities are rounded at 0.5).
        target_sensitivity: if given, the highest threshold whose sensitivity is at least this.

    Returns:
        A threshold in [0, 1]; 0.5 when only one class is present (nothing to choose from).

    Raises:
        ValueError: for mismatched shapes or a target sensitivity outside (0, 1].
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = (np.asarray(labels, dtype=np.float64).ravel() >= 0.5).astype(int)
    if p.shape != y.shape:
        raise ValueError(f"probs {p.shape} and labels {y.shape} differ in shape")
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    if y.size == 0 or y.min() == y.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # the first is +inf: predict nothing positive
    if target_sensitivity is not None:
        reaching = np.nonzero(tpr >= target_sensitivity - 1e-12)[0]
        return float(thresholds[reaching[0]])
    return float(thresholds[int(np.argmax(tpr - fpr))])


def calibrate(
    logits: FloatArray,
    targets: FloatArray,
    mask: FloatArray,
    names: list[str],
    target_sensitivity: float | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-output temperatures and thresholds from validation logits.

    Args:
        logits: ``(N, K)``.
        targets: ``(N, K)`` in [0, 1].
        mask: ``(N, K)``; 1 where the target is known.
        names: the K output keys.
        target_sensitivity: passed to :func:`choose_threshold` (None: Youden's J).

    Returns:
        ``(temperatures, thresholds)``, each keyed by output name.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    known = np.asarray(mask) > 0
    temperatures: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    for k, name in enumerate(names):
        rows = known[:, k]
        t = fit_temperature(logits[rows, k], targets[rows, k])
        temperatures[name] = t
        thresholds[name] = choose_threshold(
            _sigmoid(logits[rows, k] / t), targets[rows, k], target_sensitivity
        )
    return temperatures, thresholds
