"""The served systems, by the ``system`` name their checkpoints carry: one entry per system.

Every checkpoint says which system its weights belong to (:class:`model.common.checkpoint.ModelMeta`);
this table maps that name to the system's metadata class and to the function that builds its network
from the metadata, so any checkpoint loads through :func:`load` without the caller knowing its kind::

    network, meta = load("models/lesion-unet.pt")    # a SegNet and its SegMeta
    meta = read_meta("models/dermnet-bcc.pt")        # a DermNetMeta

A new model is a new module that subclasses ``ModelMeta`` and can build its network from it, plus one
entry in :data:`SYSTEMS`. This module imports both published systems; nothing in ``model.common``,
``model.multitask`` or ``model.lesion`` imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from model.common.checkpoint import ModelMeta, load_network, read_checkpoint
from model.lesion.dual import dual_from_meta
from model.lesion.meta import DualMeta
from model.lesion.segmentation import SegMeta, segnet_from_meta
from model.multitask.network import DermNetMeta, dermnet_from_meta


@dataclass(frozen=True)
class System:
    """A served system as its checkpoints name it.

    Attributes:
        meta: its metadata class (``meta.SYSTEM`` is the name checkpoints carry).
        build: an untrained network with the architecture a metadata describes.
        summary: what it is, in a few words.
    """

    meta: type[ModelMeta]
    build: Callable[[Any], nn.Module]
    summary: str

    @property
    def name(self) -> str:
        return self.meta.SYSTEM


SYSTEMS: dict[str, System] = {
    system.name: system
    for system in (
        System(DermNetMeta, dermnet_from_meta, "Matas et al.: MobileNet-V2, BCC + seven patterns, Grad-CAM"),
        System(SegMeta, segnet_from_meta, "Atiq & Fattah: lesion U-Net (dual attention gates, ASPP)"),
        System(DualMeta, dual_from_meta, "Atiq & Fattah: dual-encoder + metadata classifier (HAM10000)"),
    )
}


def system_of(meta: ModelMeta, source: str | Path = "the checkpoint") -> System:
    """The system a metadata belongs to.

    Raises:
        ValueError: a system this version does not know.
    """
    if meta.system not in SYSTEMS:
        raise ValueError(
            f"{source} belongs to the system {meta.system!r}, which this version does not know "
            f"(it knows {sorted(SYSTEMS)})"
        )
    return SYSTEMS[meta.system]


def read_meta(path: str | Path) -> ModelMeta:
    """A checkpoint's metadata as its system's class (a ``DermNetMeta``, ``SegMeta`` or ``DualMeta``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a dermassist checkpoint, or one of a system this version does not know.
    """
    meta = read_checkpoint(path).meta
    return system_of(meta, path).meta.from_meta(meta, path)


def load(path: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Any served system's checkpoint: its network (eval mode, on the CPU) and its metadata, by the
    system the metadata names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a dermassist checkpoint, one of a system this version does not know, or one
            its system refuses (e.g. DermNet targets that differ from the schema).
    """
    system = system_of(read_checkpoint(path).meta, path)
    return load_network(path, system.meta, system.build)


__all__ = ["SYSTEMS", "System", "load", "read_meta", "system_of"]
