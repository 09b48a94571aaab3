"""Each output's provenance after training: validated only with enough real positives and AUROC."""

from __future__ import annotations

import numpy as np
import pytest

from model.common.provenance import MIN_POSITIVES, Provenance, assess, shown, status_of

KEYS = ("good", "few", "weak", "never", "all_positive")


def _case(n: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.zeros((n, len(KEYS)))
    y[:60, 0] = 1  # good: 60 positives, perfectly ranked
    y[: MIN_POSITIVES - 1, 1] = 1  # few: one short of the bar, perfectly ranked
    y[:60, 2] = 1  # weak: 60 positives, random scores
    scores = rng.normal(size=y.shape)
    scores[:, 0] = y[:, 0] * 5
    scores[:, 1] = y[:, 1] * 5
    known = np.ones_like(y)
    return {"y": y, "known": known, "scores": scores}


def test_each_status_is_given_for_its_reason():
    case = _case()
    train_known = np.array([100, 100, 100, 0, 100.0])
    train_positive = np.array([20, 20, 20, 0, 100.0])
    found = assess(
        KEYS, train_known, train_positive, case["y"], case["known"], case["scores"], False, "split X"
    )
    assert found["good"]["status"] == Provenance.VALIDATED
    assert found["good"]["value"] == 1.0 and found["good"]["n_positive"] == 60
    assert found["good"]["data"] == "split X" and found["good"]["n_images"] == 400
    assert found["few"]["status"] == Provenance.UNVALIDATED and "fewer than 20" in found["few"]["note"]
    assert found["weak"]["status"] == Provenance.UNVALIDATED and "below 0.8" in found["weak"]["note"]
    assert found["never"]["status"] == Provenance.UNTRAINED
    assert found["all_positive"]["status"] == Provenance.UNTRAINED  # one class only: nothing learnt


def test_synthetic_training_is_never_validated():
    case = _case()
    found = assess(
        KEYS, np.full(5, 100.0), np.full(5, 20.0), case["y"], case["known"], case["scores"], True, "synth"
    )
    assert found["good"]["status"] == Provenance.SYNTHETIC and found["good"]["value"] == 1.0


@pytest.mark.parametrize(
    ("provenance", "expected"),
    [
        (None, False),
        ({}, False),
        ({"k": {"status": "validated"}}, True),
        ({"k": {"status": "synthetic"}}, False),
        ({"k": {"status": "no such status"}}, False),
    ],
)
def test_only_validated_outputs_are_shown(provenance, expected):
    assert shown(provenance, "k") is expected
    assert shown(provenance, "k", show_all=True)
    if not expected:
        assert status_of(provenance, "k") is not Provenance.VALIDATED
