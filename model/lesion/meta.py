"""What the lesion pair's checkpoints mean (:class:`SegMeta`, :class:`DualMeta`): plain data, no PyTorch,
so a process serving their ONNX graphs (:mod:`model.lesion.export`) reads them without importing PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from model.common.imagenet import IMAGENET_MEAN, IMAGENET_STD
from model.common.meta import ModelMeta

ARCH_PREFIX = "segnet-"
DEFAULT_INPUT_SIZE = 192
DUAL_ARCH = "dual-encoder"
# DeepLabV3's rates and the map side they were chosen for (513 px at output stride 16).
_DEEPLAB_RATES = (6, 12, 18)
_DEEPLAB_SIDE = 33
# A pixel is lesion where the U-Net's probability at the image's own size is at least THRESHOLD.
THRESHOLD = 0.5
THRESHOLD_RULE = (
    "logits are upsampled bilinearly to the image's own size; a pixel is lesion where sigmoid(logit) >= 0.5"
)


def aspp_rates_for(input_size: int, output_stride: int = 32) -> tuple[int, int, int]:
    """DeepLabV3's ASPP rates (6, 12, 18 on a 33-pixel map) scaled to the bottleneck's side.

    Returns strictly increasing rates, at least 1: (1, 2, 3) at 192 px, (3, 6, 9) at 512 px.
    """
    side = max(1.0, input_size / output_stride)
    rates: list[int] = []
    for r in _DEEPLAB_RATES:
        rate = max(1, round(r * side / _DEEPLAB_SIDE))
        rates.append(max(rate, rates[-1] + 1) if rates else rate)
    return rates[0], rates[1], rates[2]


@dataclass
class SegMeta(ModelMeta):
    """What a segmentation checkpoint's weights mean: :class:`~model.common.checkpoint.ModelMeta` with
    the U-Net's part (these fields are stored under ``config``).

    Attributes:
        encoder: encoder name.
        input_size: square side the network is fed.
        width_mult: MobileNet-V2 width multiplier.
        aspp_rates: ASPP dilation rates.
        aspp_channels: ASPP channels.
        decoder_channels: decoder channels at strides 16, 8, 4, 2.
        mean: normalisation mean (applied inside the network).
        std: normalisation std.
        threshold: probability at and above which a pixel is lesion.

    ``arch`` is ``segnet-<encoder>`` and ``version`` ``segnet-<hash>``; the ``extra`` of a trained one
    holds the training config, the split sizes and whether the data were synthetic.
    """

    SYSTEM: ClassVar[str] = "lesion-segmentation"
    VERSION_PREFIX: ClassVar[str] = "segnet"
    DESCRIPTION: ClassVar[str] = "lesion segmentation (U-Net)"

    system: str = SYSTEM
    arch: str = f"{ARCH_PREFIX}mobilenet_v2"
    encoder: str = "mobilenet_v2"
    input_size: int = DEFAULT_INPUT_SIZE
    width_mult: float = 1.0
    aspp_rates: list[int] = field(default_factory=lambda: list(aspp_rates_for(DEFAULT_INPUT_SIZE)))
    aspp_channels: int = 128
    decoder_channels: list[int] = field(default_factory=lambda: [96, 64, 32, 24])
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    threshold: float = 0.5


@dataclass
class DualMeta(ModelMeta):
    """What a dual-encoder checkpoint's weights mean: :class:`~model.common.checkpoint.ModelMeta` with
    the classifier's part (these fields are stored under ``config``).

    Attributes:
        backbone, width_mult, dim, heads, use_lesion, use_metadata, dropout: the :class:`DualNet`
            arguments.
        image_size: side of the whole-image input.
        lesion_size: side of the lesion crop.

    ``version`` is ``dual-<hash>``; the ``extra`` of a trained one holds the training config
    (``train_config``), the validation split's size (``n_val``) and whether the data were synthetic.
    """

    SYSTEM: ClassVar[str] = "lesion-dual"
    VERSION_PREFIX: ClassVar[str] = "dual"
    DESCRIPTION: ClassVar[str] = "dual-encoder"

    system: str = SYSTEM
    arch: str = DUAL_ARCH
    backbone: str = "mobilenet_v2"
    width_mult: float = 1.0
    dim: int = 128
    heads: int = 4
    use_lesion: bool = True
    use_metadata: bool = True
    dropout: float = 0.2
    image_size: int = 160
    lesion_size: int = 128
