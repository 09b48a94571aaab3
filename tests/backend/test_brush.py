"""Our brush RLE encoder writes what label-studio-sdk's writes, byte for byte, and decodes back."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend.label_studio.brush import mask_to_rle


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    blob = np.zeros((450, 600), bool)
    blob[100:300, 150:400] = True
    return [
        np.zeros((45, 60), bool),  # nothing painted
        np.ones((300, 300), bool),  # one run of 360,000 values: split every 65,536
        np.indices((40, 50)).sum(0) % 2 == 0,  # runs of four (one pixel's channels)
        rng.random((97, 131)) > 0.5,
        rng.random((33, 17)) > 0.95,
        np.zeros((1, 1), bool),
        blob,
    ]


@pytest.mark.parametrize("mask", _masks(), ids=lambda m: "x".join(map(str, m.shape)))
def test_the_rle_is_label_studios_own_and_decodes_back(mask):
    ours = mask_to_rle(mask)
    assert ours == [int(v) for v in mask2rle(mask.astype(np.uint8) * 255)]
    decoded = np.asarray(decode_rle(ours)).reshape(*mask.shape, 4)
    assert ((decoded[..., 3] > 0) == mask).all()


def test_a_mask_must_be_two_dimensional():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 4), bool))
