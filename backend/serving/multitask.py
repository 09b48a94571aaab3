"""The BCC model in the backend (the ``multitask`` system): loaded for serving, run on a batch in one pass.

:func:`load_served` loads a registered checkpoint (the holder, :mod:`backend.serving.holder`, keeps it and
swaps it on promotion). :func:`run_batch` resizes the images as validation does (square, no crop), runs
one forward pass per chunk and returns, per image, the calibrated probability of every output and its
Grad-CAM map at feature resolution (to be resized to the image's own size by the caller).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.common.explain import explain
from model.multitask.network import CheckpointMeta, DermNet, load_checkpoint

logger = logging.getLogger(__name__)

BATCH_SIZE = 16


@dataclass(frozen=True)
class ServedModel:
    """A loaded checkpoint: network in eval mode, its metadata and where it came from."""

    version: str
    network: DermNet
    meta: CheckpointMeta
    path: Path


@dataclass(frozen=True)
class ImageOutput:
    """The model's answer for one image.

    Attributes:
        probs: target key -> calibrated probability.
        maps: ``(K, h, w)`` Grad-CAM maps at feature resolution, in target order.
    """

    probs: dict[str, float]
    maps: torch.Tensor


def load_served(path: str | Path) -> ServedModel:
    """Load a checkpoint for serving.

    Raises:
        FileNotFoundError, ValueError: as :func:`model.multitask.network.load_checkpoint`.
    """
    network, meta = load_checkpoint(path)
    network.eval()
    return ServedModel(version=meta.version, network=network, meta=meta, path=Path(path))


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as the network's input: ``(3, size, size)`` in [0, 1], resized without cropping."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def run_batch(served: ServedModel, images: Sequence[Image.Image], maps: bool = True) -> list[ImageOutput]:
    """Probabilities and Grad-CAM maps for every image, one forward pass per chunk of images.

    Args:
        maps: compute the maps (``False``: probabilities only, e.g. scoring a validation split; the
            outputs' ``maps`` are then empty).
    """
    meta = served.meta
    temperatures = [float(meta.temperatures.get(k, 1.0)) for k in meta.targets]
    outputs: list[ImageOutput] = []
    for start in range(0, len(images), BATCH_SIZE):
        chunk = torch.stack([to_tensor(im, meta.input_size) for im in images[start : start + BATCH_SIZE]])
        if maps:
            explanation = explain(served.network, chunk, temperatures=temperatures, size=(1, 1))
            probs, raw = explanation.probs.detach().numpy(), explanation.raw.detach()
        else:
            with torch.no_grad():
                logits = served.network(chunk)
            probs = torch.sigmoid(logits / torch.tensor(temperatures)).numpy()
            raw = torch.zeros(len(chunk), 0, 0, 0)
        for i in range(len(chunk)):
            outputs.append(
                ImageOutput(
                    probs={k: float(probs[i, j]) for j, k in enumerate(meta.targets)},
                    maps=raw[i].clone(),
                )
            )
    return outputs
