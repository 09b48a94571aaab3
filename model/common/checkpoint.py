"""Checkpoints that carry their metadata, written atomically.

A checkpoint is one ``torch.save`` dict::

    {"format": 1, "meta": {...}, "state_dict": ..., "optimizer": ..., "scheduler": ..., "epoch": int}

``meta`` (a :class:`CheckpointMeta` as a plain dict) says what the weights mean: the targets in head
order with their display names, input size, normalisation, per-output decision thresholds and
temperatures, the training data hash, the metrics and a version id. Writing goes to a temporary file
in the same folder, is flushed to disk, then renamed over the target, so a killed process leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from labeling_config import TARGET_NAMES, TARGETS
from model.common.files import atomic_copy, atomic_write_bytes

FORMAT = 1
ARCH = "dermnet-mobilenet_v2"


@dataclass
class CheckpointMeta:
    """What a checkpoint's weights mean. Stored as a plain dict inside the checkpoint.

    Attributes:
        version: identifier of these weights (``dermnet-<hash>``); set by :func:`save_checkpoint`.
        arch: architecture name.
        targets: output keys in head order.
        target_names: display names of the outputs.
        input_size: square side the network is fed.
        mean: normalisation mean (applied inside the network).
        std: normalisation std.
        width_mult: MobileNet-V2 width multiplier.
        output_stride: 32 or 16 (see ``model.multitask.network.DermNet``).
        dropout: dropout before the heads.
        thresholds: per-output decision threshold on the calibrated probability.
        temperatures: per-output temperature (logit / T before the sigmoid).
        threshold_rule: how thresholds were chosen (``youden`` or ``sensitivity>=x``).
        data_hash: hash of the training table (ids + targets).
        metrics: validation metrics.
        epoch: epochs completed.
        parent: version this one was trained from, if any.
        provenance: per output key, where it comes from (:mod:`model.common.provenance`: validated on real
            images with the figure and its data, unvalidated, synthetic or untrained).
        extra: anything else worth keeping (training configuration, ...).
    """

    version: str = ""
    arch: str = ARCH
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    target_names: dict[str, str] = field(default_factory=lambda: dict(TARGET_NAMES))
    input_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    width_mult: float = 1.0
    output_stride: int = 32
    dropout: float = 0.2
    thresholds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0.5))
    temperatures: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TARGETS, 1.0))
    threshold_rule: str = "default"
    data_hash: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    parent: str | None = None
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        """Build from a stored dict, ignoring keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weights_version(state_dict: dict[str, torch.Tensor]) -> str:
    """A version id derived from the weights: the same weights always get the same id."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(
            tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes()
        )
    return f"dermnet-{digest.hexdigest()[:12]}"


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    meta: CheckpointMeta,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any] | None = None,
) -> CheckpointMeta:
    """Save weights, metadata and (for resuming) optimizer and scheduler state, atomically.

    Args:
        path: file to write.
        model: the network (a DDP wrapper is unwrapped).
        meta: its metadata; ``version`` is set from the weights.
        optimizer: saved for resuming, if given.
        scheduler: saved for resuming, if given.
        state: other training state for resuming (best metric, patience counter, RNG states, ...).

    Returns:
        The metadata as stored (with its version).
    """
    module: torch.nn.Module = getattr(model, "module", model)
    state_dict = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    meta = dataclasses.replace(meta, version=weights_version(state_dict))
    payload: dict[str, Any] = {"format": FORMAT, "meta": meta.to_dict(), "state_dict": state_dict}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    if state is not None:
        payload["state"] = state
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return meta


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (weights, meta, optimizer, ...), loaded on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a dermassist checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        # weights_only=False: optimizer and scheduler states hold plain Python objects. Only load
        # checkpoints you (or your training job) wrote.
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "meta" not in raw:
        raise ValueError(f"{path} is not a dermassist checkpoint (format {FORMAT})")
    return raw


__all__ = [
    "CheckpointMeta",
    "atomic_copy",
    "atomic_write_bytes",
    "read_checkpoint",
    "save_checkpoint",
    "weights_version",
]
