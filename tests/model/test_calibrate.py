"""Temperature scaling and threshold choice on validation outputs."""

import numpy as np
import pytest

from model.multitask.calibrate import calibrate, choose_threshold, fit_temperature


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_temperature_is_recovered(true_t):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 40000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z / true_t))).astype(float)
    assert fit_temperature(z, y) == pytest.approx(true_t, rel=0.06)


def test_temperature_degenerate_inputs():
    assert fit_temperature(np.zeros(5), np.ones(5)) == 1.0
    assert fit_temperature(np.array([]), np.array([])) == 1.0
    # Perfectly separated data sharpens the outputs, but T stays within its bounds.
    assert 0.05 <= fit_temperature(np.array([-4.0, 4.0]), np.array([0.0, 1.0])) < 0.2
    with pytest.raises(ValueError, match="differ in shape"):
        fit_temperature(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="targets must be in"):
        fit_temperature(np.zeros(2), np.array([0.0, 2.0]))


def test_youden_threshold_separates_separable_classes():
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    y = np.array([0, 0, 0, 1, 1, 1])
    t = choose_threshold(p, y)
    assert 0.3 < t <= 0.6
    assert ((p >= t) == y.astype(bool)).all()


def test_target_sensitivity_is_reached_with_the_highest_threshold():
    rng = np.random.default_rng(1)
    y = rng.random(5000) < 0.2
    p = np.clip(rng.normal(np.where(y, 0.65, 0.35), 0.15), 0, 1)
    t = choose_threshold(p, y, target_sensitivity=0.95)
    sensitivity = (p[y] >= t).mean()
    assert sensitivity >= 0.95
    assert (p[y] >= t + 1e-3).mean() < 0.95 or t >= 1.0  # any higher threshold would miss the target
    assert t < choose_threshold(p, y)  # screening trades specificity for sensitivity


def test_threshold_edge_cases():
    assert choose_threshold(np.array([0.2, 0.9]), np.array([1, 1])) == 0.5
    with pytest.raises(ValueError, match="target_sensitivity must be in"):
        choose_threshold(np.array([0.2, 0.9]), np.array([0, 1]), target_sensitivity=0.0)


def test_calibrate_skips_unknown_targets():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (200, 2))
    targets = (rng.random((200, 2)) < 1 / (1 + np.exp(-logits))).astype(float)
    mask = np.ones_like(targets)
    mask[:, 1] = 0  # nothing known for the second output
    temps, thresholds = calibrate(logits, targets, mask, ["a", "b"])
    assert 0.6 < temps["a"] < 1.6 and temps["b"] == 1.0 and thresholds["b"] == 0.5
