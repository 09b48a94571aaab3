"""Simulated dermatologists with known error rates, their answers and their regions.

Simulated dermatologists: rater ``r`` reports each binary target ``t`` (the diagnosis and the seven
patterns) with its own sensitivity and specificity, drawn uniformly from the profile's ranges, and
skips an image with probability ``missing`` (every image keeps at least one rater). Raters answer
independently given the truth (the Dawid-Skene model). For every pattern a rater reports, a region
mask is written: the true mask shifted and dilated or eroded, or a small false-positive blob inside
the lesion when the pattern is absent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from labeling_config import TARGETS
from model.synthetic.cases import RaterProfile
from model.synthetic.painter import BoolMask, dilate


def rater_ids(n: int) -> list[str]:
    """Stable rater identifiers: derm1, derm2, ..."""
    return [f"derm{r + 1}" for r in range(n)]


def draw_rater_quality(n_raters: int, profile: RaterProfile, seed: int) -> pd.DataFrame:
    """Each (rater, target)'s true sensitivity and specificity.

    Returns:
        Columns ``rater, label, sensitivity, specificity``, one row per rater and target.
    """
    rng = np.random.default_rng([seed, 2])
    rows = []
    for rater in rater_ids(n_raters):
        for target in TARGETS:
            rows.append({
                "rater": rater,
                "label": target,
                "sensitivity": round(float(rng.uniform(*profile.sensitivity)), 4),
                "specificity": round(float(rng.uniform(*profile.specificity)), 4),
            })  # fmt: skip
    return pd.DataFrame(rows)


def simulate_ratings(truth: pd.DataFrame, quality: pd.DataFrame, missing: float, seed: int) -> pd.DataFrame:
    """Simulate every rater's answers.

    Args:
        truth: one row per image, columns ``image_id`` and one 0/1 column per target in ``TARGETS``.
        quality: output of :func:`draw_rater_quality`.
        missing: probability that a rater skips an image (each image keeps at least one rater).
        seed: random seed.

    Returns:
        Long table ``image_id, rater, label, value`` (value 0/1), sorted by image, rater, target order.
    """
    rng = np.random.default_rng([seed, 3])
    raters = list(dict.fromkeys(quality["rater"]))
    n_img, n_rat, n_tgt = len(truth), len(raters), len(TARGETS)
    q = quality.set_index(["rater", "label"])
    sens = np.array([[q.loc[(r, t), "sensitivity"] for t in TARGETS] for r in raters])
    spec = np.array([[q.loc[(r, t), "specificity"] for t in TARGETS] for r in raters])
    y = truth[list(TARGETS)].to_numpy(dtype=np.int64)  # (images, targets)
    u = rng.random((n_img, n_rat, n_tgt))
    p_one = np.where(y[:, None, :] == 1, sens[None], 1.0 - spec[None])
    answers = (u < p_one).astype(np.int64)
    present = rng.random((n_img, n_rat)) >= missing
    nobody = ~present.any(axis=1)
    present[nobody, rng.integers(0, n_rat, int(nobody.sum()))] = True
    img_idx, rat_idx, tgt_idx = np.nonzero(np.broadcast_to(present[:, :, None], answers.shape))
    return pd.DataFrame({
        "image_id": truth["image_id"].to_numpy()[img_idx],
        "rater": np.asarray(raters)[rat_idx],
        "label": np.asarray(TARGETS)[tgt_idx],
        "value": answers[img_idx, rat_idx, tgt_idx],
    })  # fmt: skip


def rater_region(
    truth_mask: BoolMask | None, lesion: BoolMask, rng: np.random.Generator, jitter: float
) -> BoolMask:
    """A rater's region for a pattern they reported: the truth shifted and grown or shrunk, or a
    small false-positive blob inside the lesion when the pattern is absent."""
    size = lesion.shape[0]
    scale = size / 256.0
    if truth_mask is None or not truth_mask.any():
        ys, xs = np.nonzero(lesion)
        if len(ys) == 0:
            return np.zeros_like(lesion)
        i = int(rng.integers(len(ys)))
        r = size * rng.uniform(0.04, 0.08)
        coords = np.arange(size) + 0.5
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        blob: BoolMask = (np.hypot(yy - ys[i], xx - xs[i]) <= r) & lesion
        return blob
    dy, dx = np.rint(rng.normal(0, jitter * size, 2)).astype(int)
    shifted = np.zeros_like(truth_mask)
    src = truth_mask[max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
    shifted[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    grown = dilate(shifted, int(rng.integers(-2, 3) * max(1, round(scale))))
    return grown if grown.any() else shifted
