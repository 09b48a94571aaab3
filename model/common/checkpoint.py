"""Checkpoints: one format for every system, read through one function, written atomically.

A checkpoint is one ``torch.save`` dict of plain types and tensors (so it loads with
``weights_only=True``)::

    {"format": 2,
     "meta": {"system": "multitask", "arch": "dermnet-mobilenet_v2", "version": "dermnet-<hash>",
              "data_hash": ..., "metrics": {...}, "epoch": int, "parent": ..., "provenance": {...},
              "extra": {...}, "config": {...}},
     "state_dict": {...},
     "optimizer": ..., "scheduler": ..., "state": ...}      # last.pt only: what resuming needs

``meta`` (a :class:`ModelMeta`) says what the weights are and mean. Its common part is the same for
every system: which system and architecture, a version derived from the weights, the training data
hash, the validation metrics, the epoch, the parent version, each output's provenance
(:mod:`model.common.provenance`) and anything else worth keeping (``extra``: the training config,
split sizes, ...). Its ``config`` part is the system's own: what rebuilds the network and reads its
outputs (input size, normalisation, thresholds, ...). Each system declares that part as a subclass
of :class:`ModelMeta` with typed fields (``model.multitask.network.DermNetMeta``,
``model.lesion.segmentation.SegMeta``, ``model.lesion.dual.DualMeta``); :mod:`model.systems` maps the
``system`` names to them.

:func:`read_checkpoint` is the one reader. It also reads the layouts written before this format
(DermNet's and the U-Net's format 1 with a flat ``meta``, the dual-encoder's unversioned dict), the
released weights in ``models/`` among them, and converts them on read; only the new format is
written (:func:`save_checkpoint`, :func:`write_checkpoint`, through
:func:`model.common.files.atomic_write_bytes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import torch
from torch import nn

from model.common.files import atomic_copy, atomic_write_bytes
from model.common.meta import _COMMON, ModelMeta, _plain

FORMAT = 2
# What this module knows of the layouts written before FORMAT 2, to convert them on read.
_FORMAT_1 = 1  # DermNet and U-Net: {"format": 1, "meta": {flat fields}, "state_dict", ...}
_SEGNET_ARCH_PREFIX = "segnet-"
_DUAL_ARCH = "dual-encoder"  # the dual-encoder's dict: {"arch", "config", "state_dict", "epoch", ...}
_DUAL_CONFIG = ("backbone", "width_mult", "use_lesion", "use_metadata", "image_size", "lesion_size")
_SYSTEM_OF_LEGACY = {"dermnet": "multitask", "segnet": "lesion-segmentation", "dual": "lesion-dual"}


M = TypeVar("M", bound=ModelMeta)
N = TypeVar("N", bound=nn.Module)


@dataclass
class Checkpoint(Generic[M]):
    """A checkpoint as :func:`read_checkpoint` gives it.

    Attributes:
        meta: the metadata (the system's class when the reader was given one).
        state_dict: the weights (on the CPU).
        optimizer: optimizer state, in a ``last.pt``.
        scheduler: scheduler state, in a ``last.pt``.
        state: the training loop's progress (``model.common.training.EpochLoop.resume_state``), in a
            ``last.pt``.
    """

    meta: M
    state_dict: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    state: dict[str, Any] | None = None


def weights_version(state_dict: dict[str, torch.Tensor], prefix: str = "dermnet") -> str:
    """A version id derived from the weights: the same weights always get the same id."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(
            tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes()
        )
    return f"{prefix}-{digest.hexdigest()[:12]}"


def write_checkpoint(
    path: str | Path,
    meta: M,
    state_dict: dict[str, torch.Tensor],
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> M:
    """Write weights and metadata in the one format, atomically; the metadata as stored (``version``
    set from the weights)."""
    meta = dataclasses.replace(meta, version=weights_version(state_dict, meta.version_prefix()))
    payload: dict[str, Any] = {"format": FORMAT, "meta": meta.to_dict(), "state_dict": state_dict}
    if optimizer is not None:
        payload["optimizer"] = optimizer
    if scheduler is not None:
        payload["scheduler"] = scheduler
    if state is not None:
        payload["state"] = _plain(state)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return meta


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: M,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any] | None = None,
) -> M:
    """Save a network's weights, its metadata and (for resuming) optimizer and scheduler state, atomically.

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
    module: nn.Module = getattr(model, "module", model)
    state_dict = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return write_checkpoint(
        path,
        meta,
        state_dict,
        optimizer.state_dict() if optimizer is not None else None,
        scheduler.state_dict() if scheduler is not None else None,
        state,
    )


@overload
def read_checkpoint(path: str | Path) -> Checkpoint[ModelMeta]: ...
@overload
def read_checkpoint(path: str | Path, kind: type[M]) -> Checkpoint[M]: ...
def read_checkpoint(path: str | Path, kind: type[ModelMeta] = ModelMeta) -> Checkpoint[Any]:
    """The one reader: a checkpoint of any system, in any layout this project wrote, on the CPU.

    Args:
        path: the file.
        kind: the system's metadata class, to get its typed view (and refuse other systems' files);
            a plain :class:`ModelMeta` by default.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a dermassist checkpoint, or (with ``kind``) another system's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    stored = _current_layout(raw, path)
    meta = ModelMeta.from_dict(stored["meta"])
    return Checkpoint(
        meta=kind.from_meta(meta, path) if kind is not ModelMeta else meta,
        state_dict=stored["state_dict"],
        optimizer=stored.get("optimizer"),
        scheduler=stored.get("scheduler"),
        state=stored.get("state"),
    )


def load_network(path: str | Path, kind: type[M], build: Callable[[M], N]) -> tuple[N, M]:
    """A checkpoint's network, rebuilt by ``build`` from its metadata, with its weights, in eval mode.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a dermassist checkpoint, another system's, or one ``build`` refuses.
    """
    checkpoint = read_checkpoint(path, kind)
    model = build(checkpoint.meta)
    model.load_state_dict(checkpoint.state_dict)
    model.eval()
    return model, checkpoint.meta


def read_meta(path: str | Path, kind: type[M]) -> M:
    """The metadata of a checkpoint as ``kind`` (see :func:`read_checkpoint`)."""
    return read_checkpoint(path, kind).meta


def update_meta(path: str | Path, **changes: Any) -> ModelMeta:
    """Rewrite a checkpoint with some metadata fields replaced (same weights, so the same version),
    in the current format, atomically; the metadata written."""
    checkpoint = read_checkpoint(path)
    meta = dataclasses.replace(checkpoint.meta, **changes)
    return write_checkpoint(
        path, meta, checkpoint.state_dict, checkpoint.optimizer, checkpoint.scheduler, checkpoint.state
    )


def _current_layout(raw: Any, path: Path) -> dict[str, Any]:
    """``raw`` in the current layout: format 2 as it is, the earlier layouts converted."""
    if isinstance(raw, dict) and raw.get("format") == FORMAT and isinstance(raw.get("meta"), dict):
        return raw
    if isinstance(raw, dict) and raw.get("format") == _FORMAT_1 and isinstance(raw.get("meta"), dict):
        flat = dict(raw["meta"])
        legacy = "segnet" if str(flat.get("arch", "")).startswith(_SEGNET_ARCH_PREFIX) else "dermnet"
        meta = {k: v for k, v in flat.items() if k in _COMMON}
        meta["config"] = {k: v for k, v in flat.items() if k not in _COMMON}
        meta["system"] = _SYSTEM_OF_LEGACY[legacy]
        return _with_provenance({**raw, "format": FORMAT, "meta": meta}, raw)
    if isinstance(raw, dict) and raw.get("arch") == _DUAL_ARCH and "state_dict" in raw:
        config = dict(raw.get("config", {}))
        extra: dict[str, Any] = {"train_config": config}
        extra.update({k: raw[k] for k in ("n_val", "synthetic") if k in raw})
        meta = {
            "system": _SYSTEM_OF_LEGACY["dual"],
            "arch": _DUAL_ARCH,
            "version": weights_version(raw["state_dict"], "dual"),
            "data_hash": raw.get("data_hash", ""),
            "metrics": raw.get("metrics", {}),
            "epoch": int(raw.get("epoch", 0)),
            "extra": extra,
            "config": {k: config[k] for k in _DUAL_CONFIG if k in config},
        }
        return _with_provenance({"format": FORMAT, "meta": meta, "state_dict": raw["state_dict"]}, raw)
    raise ValueError(f"{path} is not a dermassist checkpoint (format {FORMAT} or an earlier layout)")


def _with_provenance(stored: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """The release tool wrote provenance beside ``meta`` in the earlier layouts: it moves into ``meta``."""
    if raw.get("provenance") and not stored["meta"].get("provenance"):
        stored["meta"]["provenance"] = raw["provenance"]
    return stored


__all__ = [
    "FORMAT",
    "Checkpoint",
    "ModelMeta",
    "atomic_copy",
    "atomic_write_bytes",
    "load_network",
    "read_checkpoint",
    "read_meta",
    "save_checkpoint",
    "update_meta",
    "weights_version",
    "write_checkpoint",
]
