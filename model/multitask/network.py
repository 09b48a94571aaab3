"""DermNet: MobileNet-V2 with a BCC head and a dermoscopic-pattern head (Matas et al., arXiv:2407.00104).

The network takes images in [0, 1] (normalisation is inside, so every caller — training, serving,
Grad-CAM, ONNX export — feeds the same thing) and returns one logit per target in
``labeling_config.TARGETS`` order: the diagnosis, then the seven patterns.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import mobilenet_v2

from labeling_config import PATTERN_KEYS, TARGETS
from model.common.checkpoint import load_network
from model.common.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_features_state, imagenet_weights_path
from model.multitask.meta import ARCH, CheckpointMeta, DermNetMeta

logger = logging.getLogger(__name__)


class DermNet(nn.Module):
    """MobileNet-V2 ``features`` + global average pooling + dropout + two linear heads.

    Args:
        num_patterns: outputs of the pattern head (seven: ``PATTERN_KEYS``).
        dropout: dropout before the heads.
        width_mult: MobileNet-V2 width multiplier (1.0 as published; smaller for tests).
        output_stride: 32 as published, or 16: the last stride-2 convolution keeps stride 1 and
            the convolutions after it are dilated (as DeepLab does), so the last feature map, and
            with it every Grad-CAM map, has twice the resolution (14 x 14 at 224 px). The weights
            keep their shapes, so ImageNet initialisation applies unchanged.
        mean: per-channel normalisation mean applied inside ``forward``.
        std: per-channel normalisation std applied inside ``forward``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        num_patterns: int = len(PATTERN_KEYS),
        dropout: float = 0.2,
        width_mult: float = 1.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_patterns < 1:
            raise ValueError(f"num_patterns must be at least 1, got {num_patterns}")
        backbone = mobilenet_v2(weights=None, width_mult=width_mult)
        self.features = backbone.features
        set_output_stride(self.features, output_stride)
        self.output_stride = output_stride
        channels = backbone.last_channel
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.bcc_head = nn.Linear(channels, 1)
        self.pattern_head = nn.Linear(channels, num_patterns)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.width_mult = width_mult
        self.dropout_p = dropout
        for head in (self.bcc_head, self.pattern_head):
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)

    @property
    def num_outputs(self) -> int:
        return 1 + self.pattern_head.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``(B, 1280, H/32, W/32)``: where Grad-CAM looks."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        features: torch.Tensor = self.features((x - self.mean) / self.std)
        return features

    def forward_heads(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1 + num_patterns)`` from a feature map."""
        pooled = self.dropout(torch.flatten(self.pool(features), 1))
        return torch.cat([self.bcc_head(pooled), self.pattern_head(pooled)], dim=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        """Logits ``(B, 1 + num_patterns)`` in ``TARGETS`` order for images in [0, 1].

        With ``return_features``, ``(logits, features)``: training's localisation loss needs the last
        feature map, and going through ``forward`` keeps DistributedDataParallel in the loop.
        """
        features = self.forward_features(x)
        logits = self.forward_heads(features)
        return (logits, features) if return_features else logits

    def head_samples(self, pooled: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Monte Carlo dropout logits ``(B, T, K)``: the heads on the pooled features ``(B, C)`` under
        each of ``T`` dropout masks ``(T, C)`` (:func:`dropout_masks`)."""
        dropped = pooled[:, None, :] * masks[None]
        return torch.cat([self.bcc_head(dropped), self.pattern_head(dropped)], dim=-1)

    def head_weights(self) -> torch.Tensor:
        """The two heads stacked: ``(1 + num_patterns, channels)``, rows in ``TARGETS`` order."""
        return torch.cat([self.bcc_head.weight, self.pattern_head.weight], dim=0)


#: Monte Carlo dropout samples per image for the ``bald`` acquisition strategy.
MC_SAMPLES = 20


def dropout_masks(channels: int, p: float, samples: int = MC_SAMPLES, seed: int = 0) -> torch.Tensor:
    """``samples`` fixed dropout masks ``(T, channels)``: 0 with probability ``p``, else ``1 / (1 - p)``.

    Fixed (seeded) rather than drawn per call, so an image's Monte Carlo estimate is the same on every
    call and on both engines (the ONNX graph holds the same masks); with ``p = 0`` every mask is ones
    and the samples all equal the deterministic output.
    """
    if p <= 0.0:
        return torch.ones(samples, channels)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(samples, channels, generator=generator) >= p
    return keep.float() / (1.0 - p)


def set_output_stride(features: nn.Module, output_stride: int) -> None:
    """Trade the strides that would take ``features`` past ``output_stride`` for dilation, in place.

    Raises:
        ValueError: for an output stride other than 8, 16 or 32.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    stride, dilation = 1, 1
    for module in features.modules():  # definition order is execution order in MobileNet-V2
        if not isinstance(module, nn.Conv2d) or module.kernel_size != (3, 3):
            continue
        if module.stride == (2, 2):
            if stride * 2 > output_stride:
                module.stride = (1, 1)
                module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
                dilation *= 2
                continue
            stride *= 2
        module.dilation, module.padding = (dilation, dilation), (dilation, dilation)


def load_imagenet_features(model: DermNet) -> None:
    """Copy torchvision's ImageNet MobileNet-V2 weights into ``model.features``, from the local cache only.

    Raises:
        FileNotFoundError: the file is not in torchvision's cache (nothing is downloaded).
        ValueError: the file's SHA-256 does not begin with the prefix in its name, or the model's
            width is not 1.0.
    """
    if model.width_mult != 1.0:
        raise ValueError(f"ImageNet weights need width_mult=1.0, the model has {model.width_mult}")
    model.features.load_state_dict(imagenet_features_state())
    logger.info("initialised MobileNet-V2 features from ImageNet weights at %s", imagenet_weights_path())


def build_model(
    weights: str | Path | None = None, dropout: float = 0.2, width_mult: float = 1.0, output_stride: int = 32
) -> DermNet:
    """Build a DermNet, optionally initialised.

    Args:
        weights: ``None`` (random initialisation), ``"imagenet"`` (torchvision's ImageNet features from
            the local cache), or the path of a dermassist checkpoint whose weights are loaded.
        dropout: dropout before the heads.
        width_mult: MobileNet-V2 width multiplier.
        output_stride: 32 (as published) or 16 (finer Grad-CAM maps); see :class:`DermNet`.

    Returns:
        The model, in training mode.

    Raises:
        FileNotFoundError: the weights file is absent.
        ValueError: an unknown ``weights`` value or a checkpoint of another architecture.
    """
    if weights is None:
        logger.info("training MobileNet-V2 from scratch (no pretrained weights given)")
        return DermNet(dropout=dropout, width_mult=width_mult, output_stride=output_stride)
    if weights == "imagenet":
        model = DermNet(dropout=dropout, width_mult=width_mult, output_stride=output_stride)
        load_imagenet_features(model)
        return model
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {weights!r}: no such file (use None, 'imagenet' or a checkpoint path)"
        )
    model, _ = load_checkpoint(path)
    model.train()
    return model


def dermnet_from_meta(meta: DermNetMeta) -> DermNet:
    """An untrained DermNet with the architecture ``meta`` describes.

    Raises:
        ValueError: another architecture, or targets that differ from this version's schema.
    """
    if meta.arch != ARCH:
        raise ValueError(f"the checkpoint holds a {meta.arch!r} model; this loader reads {ARCH!r}")
    if list(meta.targets) != list(TARGETS):
        raise ValueError(
            f"the checkpoint was trained for the targets {meta.targets}, but the schema now has "
            f"{list(TARGETS)}; retrain it (the schema lives in labeling_config/schema.py)"
        )
    return DermNet(
        num_patterns=len(meta.targets) - 1,
        dropout=meta.dropout,
        width_mult=meta.width_mult,
        output_stride=meta.output_stride,
        mean=(meta.mean[0], meta.mean[1], meta.mean[2]),
        std=(meta.std[0], meta.std[1], meta.std[2]),
    )


def load_checkpoint(path: str | Path) -> tuple[DermNet, DermNetMeta]:
    """Load a DermNet checkpoint's network (in eval mode) and its metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a dermassist checkpoint, another system's, or targets that differ from this
            version's schema.
    """
    return load_network(path, DermNetMeta, dermnet_from_meta)


__all__ = [
    "ARCH",
    "TARGETS",
    "CheckpointMeta",
    "DermNet",
    "DermNetMeta",
    "build_model",
    "dermnet_from_meta",
    "load_checkpoint",
    "load_imagenet_features",
]
