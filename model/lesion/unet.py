"""SegNet: the lesion U-Net with dual attention gates and ASPP (Atiq & Fattah, arXiv:2510.17773).

The second published system segments the lesion first (its "Deep-UNet" with Dual Attention Gates and
an Atrous Spatial Pyramid Pooling bottleneck) and feeds the segmented lesion to its classifier. This
module is that network; its checkpoints and builder are :mod:`model.lesion.segmentation`, its loss and
mask metrics :mod:`model.lesion.masks`, its training :mod:`model.lesion.train_seg` and its evaluation
:mod:`model.lesion.evaluate_seg`.

Architecture (input ``(B, 3, H, W)`` in [0, 1], any ``H`` and ``W``; output one logit per pixel)::

    encoder (ImageNet CNN)      skips at strides 2, 4, 8, 16; bottleneck at stride 32
    ASPP at the bottleneck      1x1 | three dilated 3x3 | image pooling -> concat -> 1x1 projection
    decoder, four stages        upsample -> dual attention gate on the skip -> concat -> 2 x 3x3 conv-BN-ReLU
    head                        1x1 conv to one logit at stride 2, bilinear upsampling to H x W

- **Encoders** are torchvision feature extractors cut after the last stride-32 block, chosen by name
  (:data:`ENCODERS`): ``mobilenet_v2`` (default: the backbone of DermNet and of the first system, its
  ImageNet file is the one already in the local cache), ``efficientnet_b3`` (the paper's encoder) and
  ``resnet34``. Normalisation is inside the network, as in ``model.multitask.network.DermNet``.
- **ASPP** (Chen et al. 2017, DeepLabV3): rates 6, 12, 18 were chosen for a 33 x 33 map (513 px at
  stride 16). Here the bottleneck is at stride 32 and images are small (6 x 6 at 192 px), where those
  rates would sample mostly zero padding and each dilated branch would collapse to a 1x1 convolution.
  :func:`aspp_rates_for` keeps their ratio to the map side instead: (1, 2, 3) at 192 px, (3, 6, 9) at
  512 px. The pooling branch has no BatchNorm, so a batch of one trains.
- **Dual attention gate** on each skip ``x`` with the upsampled decoder signal ``g`` (the gating
  signal, at the skip's resolution):

  - spatial, the additive attention gate of Oktay et al. 2018 (arXiv:1804.03999):
    ``a_s = sigmoid(BN(psi(ReLU(BN(W_x x) + BN(W_g g)))))``, one weight per pixel;
  - channel, squeeze-and-excitation (Hu et al. 2018) conditioned on the decoder too:
    ``a_c = sigmoid(FC(ReLU(FC([GAP(x), GAP(g)]))))``, one weight per skip channel;

  and the gated skip is ``x * a_c * a_s``. Oktay's gate takes ``g`` at the coarser resolution and
  strides ``W_x``; gating after upsampling is the same computation at one resolution and handles odd
  sizes without padding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.common.imagenet import IMAGENET_MEAN, IMAGENET_STD, url_sha256_prefix
from model.lesion.meta import ARCH_PREFIX, DEFAULT_INPUT_SIZE, aspp_rates_for

# ------------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderSpec:
    """How to build an encoder and map torchvision's ImageNet weights onto it.

    Attributes:
        build: ``width_mult -> (features, taps)``: a ``nn.Sequential`` and the indices of the blocks
            whose outputs are at strides 2, 4, 8, 16 and 32 (the last one ends the encoder).
        imagenet_url: torchvision's URL of the ImageNet file (only its name is used: the file is read
            from torchvision's local cache).
        remap: torchvision state-dict key -> key in ``features``'s parent module, or None to drop it.
        scalable: whether ``width_mult`` other than 1.0 is allowed.
    """

    build: Callable[[float], tuple[nn.Sequential, tuple[int, ...]]]
    imagenet_url: str
    remap: Callable[[str], str | None]
    scalable: bool = False

    @property
    def imagenet_file(self) -> str:
        return Path(self.imagenet_url).name

    @property
    def sha256_prefix(self) -> str:
        return url_sha256_prefix(self.imagenet_url)


def _features_upto(last: int) -> Callable[[str], str | None]:
    """Keep ``features.<i>.*`` for ``i <= last`` (MobileNet-V2 and EfficientNet keep torchvision's keys)."""

    def remap(key: str) -> str | None:
        match = re.match(r"features\.(\d+)\.", key)
        return key if match and int(match.group(1)) <= last else None

    return remap


def _mobilenet_v2(width_mult: float) -> tuple[nn.Sequential, tuple[int, ...]]:
    from torchvision.models import mobilenet_v2

    # Block 18 is the 1x1 expansion to 1280 channels for classification: not needed for segmentation.
    features = mobilenet_v2(weights=None, width_mult=width_mult).features[:18]
    return features, (1, 3, 6, 13, 17)


def _efficientnet_b3(width_mult: float) -> tuple[nn.Sequential, tuple[int, ...]]:
    from torchvision.models import efficientnet_b3

    return efficientnet_b3(weights=None).features[:8], (1, 2, 3, 5, 7)


def _resnet34(width_mult: float) -> tuple[nn.Sequential, tuple[int, ...]]:
    from torchvision.models import resnet34

    r = resnet34(weights=None)
    features = nn.Sequential(
        nn.Sequential(r.conv1, r.bn1, r.relu),
        nn.Sequential(r.maxpool, r.layer1),
        r.layer2,
        r.layer3,
        r.layer4,
    )
    return features, (0, 1, 2, 3, 4)


def _resnet_remap(key: str) -> str | None:
    for old, new in (("conv1.", "features.0.0."), ("bn1.", "features.0.1."), ("layer1.", "features.1.1.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    match = re.match(r"layer([234])\.(.*)", key)
    return f"features.{match.group(1)}.{match.group(2)}" if match else None


ENCODERS: dict[str, EncoderSpec] = {
    "mobilenet_v2": EncoderSpec(
        _mobilenet_v2,
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        _features_upto(17),
        True,
    ),
    "efficientnet_b3": EncoderSpec(
        _efficientnet_b3,
        "https://download.pytorch.org/models/efficientnet_b3_rwightman-b3899882.pth",
        _features_upto(7),
    ),
    "resnet34": EncoderSpec(
        _resnet34, "https://download.pytorch.org/models/resnet34-b627a593.pth", _resnet_remap
    ),
}


class Encoder(nn.Module):
    """A torchvision feature extractor that returns the maps at strides 2, 4, 8, 16 and 32."""

    def __init__(self, name: str = "mobilenet_v2", width_mult: float = 1.0) -> None:
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
        spec = ENCODERS[name]
        if width_mult != 1.0 and not spec.scalable:
            raise ValueError(f"width_mult applies to mobilenet_v2 only; {name} needs 1.0, got {width_mult}")
        self.features, self.taps = spec.build(width_mult)
        self.name = name
        self.channels = self._probe_channels()

    def _probe_channels(self) -> tuple[int, ...]:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            maps = self(torch.zeros(1, 3, 64, 64))
        self.train(was_training)
        strides = [64 // m.shape[-1] for m in maps]
        if strides != [2, 4, 8, 16, 32]:
            raise ValueError(f"encoder {self.name} taps strides {strides}, expected [2, 4, 8, 16, 32]")
        return tuple(int(m.shape[1]) for m in maps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps: list[torch.Tensor] = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in self.taps:
                maps.append(x)
        return maps


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): parallel 1x1, dilated 3x3 and image-pooling branches."""

    def __init__(self, c_in: int, c_out: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(c_in, c_out, kernel=1)] + [_conv_bn_relu(c_in, c_out, 3, r) for r in rates]
        )
        # No BatchNorm after pooling: a (B, C, 1, 1) map has one value per channel at batch size 1.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            _conv_bn_relu((len(rates) + 2) * c_out, c_out, kernel=1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        out: torch.Tensor = self.project(torch.cat(outs, dim=1))
        return out


class DualAttentionGate(nn.Module):
    """Channel and spatial attention on a skip connection, both conditioned on the decoder signal.

    Args:
        skip_channels: channels of the skip ``x``.
        gate_channels: channels of the gating signal ``g`` (the upsampled decoder feature).
        inter_channels: channels of the additive attention's hidden layer.
        reduction: squeeze-excitation bottleneck ratio.
    """

    def __init__(
        self, skip_channels: int, gate_channels: int, inter_channels: int, reduction: int = 4
    ) -> None:
        super().__init__()
        self.theta_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels)
        )
        self.phi_g = nn.Sequential(
            nn.Conv2d(gate_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels)
        )
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.BatchNorm2d(1))
        hidden = max(4, (skip_channels + gate_channels) // reduction)
        self.channel = nn.Sequential(
            nn.Linear(skip_channels + gate_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, skip_channels),
        )

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The channel weights ``(B, C, 1, 1)`` and the spatial weights ``(B, 1, H, W)``, in (0, 1)."""
        spatial = torch.sigmoid(self.psi(F.relu(self.theta_x(x) + self.phi_g(g))))
        squeezed = torch.cat([x.mean(dim=(2, 3)), g.mean(dim=(2, 3))], dim=1)
        channel = torch.sigmoid(self.channel(squeezed))[:, :, None, None]
        return channel, spatial

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        channel, spatial = self.attention(x, g)
        return x * channel * spatial


class DecoderStage(nn.Module):
    """Upsample to the skip's size, gate the skip, concatenate, two 3x3 conv-BN-ReLU."""

    def __init__(self, c_in: int, skip_channels: int, c_out: int) -> None:
        super().__init__()
        self.gate = DualAttentionGate(skip_channels, c_in, max(8, skip_channels // 2))
        self.convs = nn.Sequential(_conv_bn_relu(c_in + skip_channels, c_out), _conv_bn_relu(c_out, c_out))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's output and the spatial attention map on its skip."""
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        channel, spatial = self.gate.attention(skip, up)
        out: torch.Tensor = self.convs(torch.cat([up, skip * channel * spatial], dim=1))
        return out, spatial


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------


class SegNet(nn.Module):
    """U-Net with dual attention gates on the skips and an ASPP bottleneck (see the module docstring).

    Args:
        encoder: encoder name, one of :data:`ENCODERS` (``mobilenet_v2``, ``efficientnet_b3``, ``resnet34``).
        width_mult: MobileNet-V2 width multiplier (1.0 for ImageNet weights; smaller for tests).
        input_size: the side images are trained at; sets the ASPP rates when ``aspp_rates`` is None.
        aspp_rates: dilation rates of the three 3x3 ASPP branches (default :func:`aspp_rates_for`).
        aspp_channels: channels of every ASPP branch and of its projection.
        decoder_channels: output channels of the decoder stages at strides 16, 8, 4 and 2.
        mean: per-channel normalisation mean applied inside ``forward``.
        std: per-channel normalisation std applied inside ``forward``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        encoder: str = "mobilenet_v2",
        width_mult: float = 1.0,
        input_size: int = DEFAULT_INPUT_SIZE,
        aspp_rates: Sequence[int] | None = None,
        aspp_channels: int = 128,
        decoder_channels: Sequence[int] = (96, 64, 32, 24),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 4:
            raise ValueError(
                f"decoder_channels needs four values (strides 16, 8, 4, 2), got {decoder_channels}"
            )
        rates = tuple(aspp_rates) if aspp_rates is not None else aspp_rates_for(input_size)
        if len(rates) != 3 or min(rates) < 1:
            raise ValueError(f"aspp_rates needs three rates of at least 1, got {rates}")
        self.encoder = Encoder(encoder, width_mult)
        skips = self.encoder.channels[:4]
        self.aspp = ASPP(self.encoder.channels[4], aspp_channels, rates)
        stages: list[DecoderStage] = []
        c_in = aspp_channels
        for skip, c_out in zip(reversed(skips), decoder_channels, strict=True):
            stages.append(DecoderStage(c_in, skip, c_out))
            c_in = c_out
        self.decoder = nn.ModuleList(stages)
        self.head = nn.Conv2d(c_in, 1, 1)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.encoder_name = encoder
        self.width_mult = width_mult
        self.input_size = input_size
        self.aspp_rates = rates
        self.aspp_channels = aspp_channels
        self.decoder_channels = tuple(decoder_channels)

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this architecture (stored in checkpoints)."""
        return {
            "encoder": self.encoder_name,
            "width_mult": self.width_mult,
            "input_size": self.input_size,
            "aspp_rates": list(self.aspp_rates),
            "aspp_channels": self.aspp_channels,
            "decoder_channels": list(self.decoder_channels),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> Any:
        """Logits ``(B, 1, H, W)`` for images ``(B, 3, H, W)`` in [0, 1].

        With ``return_attention``, ``(logits, maps)``: the spatial attention maps of the skips at
        strides 16, 8, 4 and 2 (``(B, 1, h, w)`` each, in (0, 1)).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        *skips, bottom = self.encoder((x - self.mean) / self.std)
        y = self.aspp(bottom)
        maps: list[torch.Tensor] = []
        for stage, skip in zip(self.decoder, reversed(skips), strict=True):
            y, spatial = stage(y, skip)
            maps.append(spatial)
        logits = F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, maps) if return_attention else logits


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ARCH_PREFIX",
    "ASPP",
    "DEFAULT_INPUT_SIZE",
    "ENCODERS",
    "DualAttentionGate",
    "Encoder",
    "EncoderSpec",
    "SegNet",
    "aspp_rates_for",
    "count_parameters",
]
