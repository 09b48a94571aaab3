"""STAPLE: cross-checked against SimpleITK's STAPLEImageFilter on jittered lesion masks; bad input."""

from __future__ import annotations

import numpy as np
import pytest

from consensus.staple import staple


def jittered_masks(
    shape: tuple[int, ...], n_raters: int, seed: int, noise: float = 0.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A ball-shaped lesion and raters' versions of it: shifted, grown or shrunk, optionally speckled."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = np.array(shape) / 2
    radius = min(shape) / 4
    truth = ((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(axis=0) <= radius**2
    masks = []
    for _ in range(n_raters):
        c = centre + rng.integers(-4, 5, size=len(shape))
        r = radius + rng.uniform(-5, 5)
        mask = ((grid - c.reshape(-1, *[1] * len(shape))) ** 2).sum(axis=0) <= r**2
        if noise:
            mask ^= rng.random(shape) < noise
        masks.append(mask)
    return truth, masks


def simpleitk_staple(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sitk = pytest.importorskip("SimpleITK")
    flt = sitk.STAPLEImageFilter()
    flt.SetForegroundValue(1.0)
    out = flt.Execute([sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks])
    return sitk.GetArrayFromImage(out), np.array(flt.GetSensitivity()), np.array(flt.GetSpecificity())


@pytest.mark.parametrize(
    ("shape", "n_raters", "seed", "noise"),
    [
        ((128, 128), 3, 0, 0.0),
        ((128, 128), 4, 1, 0.0),
        ((200, 160), 4, 2, 0.02),  # one rater's worth of speckle on every rater
        ((96, 96), 7, 3, 0.005),
        ((32, 40, 36), 4, 4, 0.01),  # a volume
    ],
)
def test_matches_simpleitk(shape, n_raters, seed, noise):
    _, masks = jittered_masks(shape, n_raters, seed, noise)
    result = staple(masks)
    w_itk, sens_itk, spec_itk = simpleitk_staple(masks)
    assert result.converged
    assert ((w_itk >= 0.5) == result.mask).mean() >= 0.999
    np.testing.assert_allclose(result.sensitivity, sens_itk, atol=1e-3)
    np.testing.assert_allclose(result.specificity, spec_itk, atol=1e-3)
    np.testing.assert_allclose(result.probability, w_itk, atol=1e-3)


def test_recovers_the_lesion_and_ranks_the_raters():
    truth, masks = jittered_masks((160, 160), 3, seed=5)
    sloppy = masks[0] ^ (np.random.default_rng(6).random(truth.shape) < 0.05)
    result = staple([*masks, sloppy])
    # The raters' shifted / resized outlines differ from the truth on a rim of ~3% of the pixels.
    assert (result.mask == truth).mean() > 0.95
    # The speckle is voted out: the consensus has none of the sloppy rater's isolated pixels.
    outside = ~np.any(masks, axis=0)
    assert not result.mask[outside].any() and sloppy[outside].sum() > 500
    assert result.specificity[3] < result.specificity[:3].min()  # the speckled rater is found out
    assert result.probability.shape == truth.shape
    assert result.probability.min() >= 0 and result.probability.max() <= 1


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int64, np.float32])
def test_accepts_boolean_and_numeric_masks(dtype):
    _, masks = jittered_masks((64, 64), 3, seed=7)
    reference = staple(masks)
    result = staple(np.stack(masks).astype(dtype))
    np.testing.assert_array_equal(result.mask, reference.mask)


def test_identical_masks_give_the_mask_and_perfect_raters():
    truth, _ = jittered_masks((64, 64), 1, seed=8)
    result = staple([truth, truth, truth])
    np.testing.assert_array_equal(result.mask, truth)
    np.testing.assert_allclose(result.sensitivity, 1.0)
    np.testing.assert_allclose(result.specificity, 1.0)


def test_a_fixed_prior_moves_the_consensus():
    _, masks = jittered_masks((128, 128), 4, seed=9, noise=0.01)
    low, default, high = (staple(masks, prior=p) for p in (0.05, None, 0.6))
    assert default.prior == pytest.approx(np.mean(masks))
    assert low.mask.sum() <= default.mask.sum() <= high.mask.sum()
    assert low.mask.sum() < high.mask.sum()


@pytest.mark.parametrize(
    ("masks", "kwargs", "message"),
    [
        ([np.ones((4, 4))], {}, "at least two raters"),
        ([np.ones((4, 4)), np.ones((4, 5))], {}, "same shape"),
        ([np.zeros((4, 4)), np.full((4, 4), 2)], {}, r"must be binary .* found values \[2(\.0)?\]"),
        ([np.zeros((4, 4)), np.full((4, 4), np.nan)], {}, "must be binary"),
        ([np.zeros((4, 4)), np.zeros((4, 4))], {}, "no rater marked any pixel"),
        ([np.eye(4), np.ones((4, 4))], {"prior": 1.5}, r"prior must be in \(0, 1\), got 1.5"),
        ([np.zeros((0,)), np.zeros((0,))], {}, "empty"),
        ([np.array(["a", "b"]), np.array(["a", "b"])], {}, "numeric or boolean"),
    ],
)
def test_bad_input_raises_a_value_error(masks, kwargs, message):
    with pytest.raises(ValueError, match=message):
        staple(masks, **kwargs)
