"""What a DermNet checkpoint's weights mean (:class:`DermNetMeta`): plain data, no PyTorch, so a process
serving the ONNX graph reads it without importing PyTorch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from labeling_config import TARGET_NAMES, TARGETS
from model.common.imagenet import IMAGENET_MEAN, IMAGENET_STD
from model.common.meta import ModelMeta

#: The ONNX graph's input and outputs (:mod:`model.multitask.export`); a graph without the last two
#: (written before the acquisition strategies) is served by PyTorch instead.
INPUT, LOGITS, CAMS, EMBEDDING, MC_LOGITS = "images", "logits", "cams", "embedding", "mc_logits"
GRAPH_OUTPUTS = (LOGITS, CAMS, EMBEDDING, MC_LOGITS)

ARCH = "dermnet-mobilenet_v2"


@dataclass
class DermNetMeta(ModelMeta):
    """What a DermNet checkpoint's weights mean: :class:`~model.common.checkpoint.ModelMeta` with the
    multitask system's part (these fields are stored under ``config``).

    Attributes:
        targets: output keys in head order.
        target_names: display names of the outputs.
        input_size: square side the network is fed.
        mean: normalisation mean (applied inside the network).
        std: normalisation std.
        width_mult: MobileNet-V2 width multiplier.
        output_stride: 32 or 16 (see :class:`DermNet`).
        dropout: dropout before the heads.
        thresholds: per-output decision threshold on the calibrated probability.
        temperatures: per-output temperature (logit / T before the sigmoid).
        threshold_rule: how thresholds were chosen (``youden`` or ``sensitivity>=x``).
    """

    SYSTEM: ClassVar[str] = "multitask"
    VERSION_PREFIX: ClassVar[str] = "dermnet"
    DESCRIPTION: ClassVar[str] = "DermNet"

    system: str = SYSTEM
    arch: str = ARCH
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    target_names: dict[str, str] = field(default_factory=lambda: dict(TARGET_NAMES))
    input_size: int = 224
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    width_mult: float = 1.0
    output_stride: int = 32
    dropout: float = 0.2
    thresholds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0.5))
    temperatures: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TARGETS, 1.0))
    threshold_rule: str = "default"


CheckpointMeta = DermNetMeta  # the name callers have used
