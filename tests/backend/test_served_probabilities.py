"""The served model's probabilities: a numerically stable sigmoid of the calibrated logits."""

import warnings
from types import SimpleNamespace

import numpy as np
from PIL import Image

from backend.serving.multitask import Forward, ServedModel, run_batch


class FixedLogits:
    """An engine that answers every image with the same logits."""

    name = "fixed"

    def __init__(self, logits: list[float]) -> None:
        self.logits = np.asarray(logits, dtype=np.float32)

    def run(self, images, maps=True, extras=False):
        return Forward(np.tile(self.logits, (len(images), 1)), np.zeros((len(images), 0, 0, 0), np.float32))


def served(logits: list[float], temperatures: dict[str, float] | None = None) -> ServedModel:
    targets = [f"t{k}" for k in range(len(logits))]
    meta = SimpleNamespace(targets=targets, temperatures=temperatures or {}, input_size=8)
    return ServedModel(version="fixed", engine=FixedLogits(logits), meta=meta, path=None)


def test_extreme_logits_give_zero_and_one_without_a_warning():
    image = Image.new("RGB", (12, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would raise here
        (out,) = run_batch(served([-1000.0, 1000.0, -88.0, 89.0]), [image], maps=False)
    assert out.probs["t0"] == 0.0 and out.probs["t1"] == 1.0
    assert 0.0 <= out.probs["t2"] < 1e-38 and out.probs["t3"] == 1.0


def test_ordinary_logits_keep_their_probabilities():
    logits = [-6.0, -1.5, 0.0, 0.3, 2.0, 7.5]
    temperatures = {"t1": 1.7, "t4": 0.6}
    (out,) = run_batch(served(logits, temperatures), [Image.new("RGB", (8, 8))], maps=False)
    t = np.array([temperatures.get(f"t{k}", 1.0) for k in range(len(logits))], dtype=np.float32)
    x = np.asarray(logits, dtype=np.float32) / t
    expected = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    found = np.array([out.probs[f"t{k}"] for k in range(len(logits))])
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-7)  # float32 logits: one float32 ulp
