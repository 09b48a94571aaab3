"""Grad-CAM agreement with a reference region (energy inside, pointing game, IoU) on constructed maps."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from model.common.agreement import (
    energy_inside,
    map_region,
    pointing_game,
    spatial_agreement,
    thresholded_iou,
)

SIZE = (64, 80)


def square(top: int, left: int, side: int = 16) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def bump(y: float, x: float, sigma: float = 3.0) -> np.ndarray:
    yy, xx = np.indices(SIZE)
    return np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))


MASK = square(10, 10)


def test_a_map_inside_the_mask_scores_one_and_hits():
    cam = bump(17.5, 17.5, sigma=2.0)
    found = spatial_agreement(cam, MASK)
    assert found["energy_inside"] > 0.99
    assert found["pointing"] == 1.0
    assert found["area"] == pytest.approx(MASK.mean())
    assert 0 < found["iou"] < 1  # the bump's half-maximum disc is smaller than the square


def test_a_map_outside_the_mask_scores_zero_and_misses():
    cam = bump(50, 65)
    found = spatial_agreement(cam, MASK)
    assert found["energy_inside"] < 1e-6
    assert found["pointing"] == 0.0
    assert found["iou"] == 0.0


def test_a_flat_map_scores_the_masks_area_and_points_nowhere():
    cam = np.ones(SIZE)
    assert energy_inside(cam, MASK) == pytest.approx(MASK.mean())
    assert not pointing_game(cam, MASK)
    assert energy_inside(np.zeros(SIZE), MASK) != energy_inside(np.zeros(SIZE), MASK)  # NaN: no mass


def test_negative_values_carry_no_energy():
    cam = -bump(18, 18) + 0.5 * bump(50, 65)
    assert energy_inside(cam, MASK) < 1e-6


def test_the_pointing_game_tolerance_reaches_a_peak_just_outside():
    cam = bump(10, 30)  # the mask's columns are 10..25: the peak is 5 px to its right
    assert not pointing_game(cam, MASK)
    assert not pointing_game(cam, MASK, tolerance=4)
    assert pointing_game(cam, MASK, tolerance=5)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(cam, MASK, tolerance=-1)


def test_iou_thresholds_the_map_at_a_share_of_its_maximum():
    cam = MASK.astype(float) * 2.0 + square(40, 40).astype(float) * 0.9  # second square below half max
    assert thresholded_iou(cam, MASK) == 1.0
    assert thresholded_iou(cam, MASK, threshold=0.4) == pytest.approx(0.5)  # both squares kept
    assert (map_region(cam, 0.5) == MASK).all()
    assert not map_region(np.zeros(SIZE)).any()
    assert np.isnan(thresholded_iou(np.zeros(SIZE), np.zeros(SIZE, bool)))
    with pytest.raises(ValueError, match="threshold"):
        map_region(cam, 0.0)


def test_sizes_must_agree():
    with pytest.raises(ValueError, match="size of the mask"):
        spatial_agreement(np.ones((8, 8)), MASK)
    with pytest.raises(ValueError, match="NaN"):
        energy_inside(np.full(SIZE, np.nan), MASK)


def test_the_metrics_import_no_torch():
    source = Path(__file__).resolve().parents[2] / "model" / "common" / "agreement.py"
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not {name for name in imported if name.split(".")[0] == "torch"}
