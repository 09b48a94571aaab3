"""The lesion segmentation system's checkpoints and builder (the network is :mod:`model.lesion.unet`).

:class:`SegMeta` is what a U-Net checkpoint carries (:class:`~model.common.checkpoint.ModelMeta` with
the U-Net's part), :func:`save_segnet` / :func:`load_segnet` write and read it, :func:`build_segnet`
starts a network from scratch, from the encoder's ImageNet file or from a checkpoint. A pixel is lesion
where the probability at the image's own size is at least :data:`THRESHOLD` (:data:`THRESHOLD_RULE`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from model.common.checkpoint import load_network, save_checkpoint
from model.common.imagenet import cached_file, read_imagenet_file
from model.lesion.meta import ARCH_PREFIX, DEFAULT_INPUT_SIZE, THRESHOLD, THRESHOLD_RULE, SegMeta
from model.lesion.unet import ENCODERS, SegNet

logger = logging.getLogger(__name__)


def encoder_weights_path(encoder: str = "mobilenet_v2") -> Path:
    """Where torchvision keeps an encoder's ImageNet file: ``$TORCH_HOME/hub/checkpoints/``."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(ENCODERS)}")
    return cached_file(ENCODERS[encoder].imagenet_url)


def load_imagenet_encoder(model: SegNet) -> None:
    """Copy torchvision's ImageNet weights into ``model.encoder``, from the local cache only.

    For ``mobilenet_v2`` this is the file DermNet uses (``model.common.imagenet.imagenet_weights_path``).

    Raises:
        FileNotFoundError: the file is not in torchvision's cache (nothing is downloaded).
        ValueError: a width other than 1.0, or a file whose SHA-256 does not begin with the prefix in
            its name.
    """
    if model.width_mult != 1.0:
        raise ValueError(f"ImageNet weights need width_mult=1.0, the model has {model.width_mult}")
    spec = ENCODERS[model.encoder_name]
    path = encoder_weights_path(model.encoder_name)
    state = read_imagenet_file(path, spec.sha256_prefix, f"the {model.encoder_name} encoder")
    mapped = OrderedDict((new, value) for key, value in state.items() if (new := spec.remap(key)) is not None)
    model.encoder.load_state_dict(mapped)
    logger.info("initialised the %s encoder from ImageNet weights at %s", model.encoder_name, path)


def save_segnet(
    path: str | Path,
    model: SegNet,
    meta: SegMeta,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any] | None = None,
) -> SegMeta:
    """:func:`~model.common.checkpoint.save_checkpoint` of a SegNet, the architecture fields of ``meta``
    taken from ``model`` (so they cannot disagree with the weights).

    Returns:
        The metadata as stored (with its version).
    """
    module: SegNet = getattr(model, "module", model)
    hparams = module.hparams()
    meta = dataclasses.replace(meta, **hparams, arch=f"{ARCH_PREFIX}{hparams['encoder']}")
    return save_checkpoint(path, module, meta, optimizer, scheduler, state)


def segnet_from_meta(meta: SegMeta) -> SegNet:
    """An untrained SegNet with the architecture ``meta`` describes."""
    return SegNet(
        encoder=meta.encoder,
        width_mult=meta.width_mult,
        input_size=meta.input_size,
        aspp_rates=meta.aspp_rates,
        aspp_channels=meta.aspp_channels,
        decoder_channels=meta.decoder_channels,
        mean=(meta.mean[0], meta.mean[1], meta.mean[2]),
        std=(meta.std[0], meta.std[1], meta.std[2]),
    )


def load_segnet(path: str | Path) -> tuple[SegNet, SegMeta]:
    """Load a segmentation checkpoint's network (in eval mode) and its metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a dermassist checkpoint, or another system's (e.g. a DermNet).
    """
    return load_network(path, SegMeta, segnet_from_meta)


def build_segnet(
    weights: str | Path | None = None,
    width_mult: float = 1.0,
    encoder: str = "mobilenet_v2",
    input_size: int = DEFAULT_INPUT_SIZE,
    **kwargs: Any,
) -> SegNet:
    """Build a SegNet, optionally initialised.

    Args:
        weights: ``None`` (random initialisation), ``"imagenet"`` (the encoder from torchvision's
            ImageNet file in the local cache; the decoder stays random), or the path of a segmentation
            checkpoint (its architecture replaces the other arguments).
        width_mult: MobileNet-V2 width multiplier.
        encoder: encoder name (see :data:`ENCODERS`).
        input_size: the side images are trained at (sets the ASPP rates).
        **kwargs: other :class:`SegNet` arguments.

    Returns:
        The model, in training mode.

    Raises:
        FileNotFoundError: the weights file is absent.
        ValueError: an unknown encoder or a checkpoint of another architecture.
    """
    if weights is None or weights == "imagenet":
        model = SegNet(encoder=encoder, width_mult=width_mult, input_size=input_size, **kwargs)
        if weights == "imagenet":
            load_imagenet_encoder(model)
        else:
            logger.info("training SegNet (%s) from scratch (no pretrained weights given)", encoder)
        return model
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {weights!r}: no such file (use None, 'imagenet' or a checkpoint path)"
        )
    model, _ = load_segnet(path)
    model.train()
    return model


__all__ = [
    "THRESHOLD",
    "THRESHOLD_RULE",
    "SegMeta",
    "build_segnet",
    "encoder_weights_path",
    "load_imagenet_encoder",
    "load_segnet",
    "save_segnet",
    "segnet_from_meta",
]
