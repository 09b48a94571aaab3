"""What a checkpoint's weights are and mean (:class:`ModelMeta`): plain data, no PyTorch.

Kept apart from :mod:`model.common.checkpoint` (which reads and writes the files with PyTorch) so that a
process serving ONNX graphs can read the metadata stored in them without importing PyTorch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

#: Where an ONNX graph of one of our networks keeps its checkpoint's metadata (``metadata_props``, JSON).
ONNX_META_KEY = "dermassist.meta"


@dataclass
class ModelMeta:
    """What a checkpoint's weights are and mean. Stored as a plain dict inside the checkpoint.

    Each system subclasses it, giving its ``config`` part typed fields (with their defaults) and its
    ``SYSTEM`` name and ``VERSION_PREFIX``. A plain ``ModelMeta`` (what :func:`read_checkpoint` gives
    without a system's class) keeps the ``config`` part as a dict.

    Attributes:
        system: which system the weights belong to (``multitask``, ``lesion-segmentation``,
            ``lesion-dual``; see :mod:`model.systems`).
        arch: the architecture's name.
        version: identifier of these weights (``<prefix>-<hash>``); set when the checkpoint is written.
        data_hash: hash of the training table (``model.common.data.table_hash``).
        metrics: validation metrics.
        epoch: epochs completed.
        parent: version this one was trained from, if any.
        provenance: per output key, where it comes from (:mod:`model.common.provenance`: validated on
            real images with the figure and its data, unvalidated, synthetic or untrained).
        extra: anything else worth keeping (training configuration, split sizes, ...).
        config: the system's own part, for a class without typed fields for it (a subclass's typed
            fields replace it: there it stays empty).
    """

    SYSTEM: ClassVar[str] = ""
    VERSION_PREFIX: ClassVar[str] = ""  # a plain ModelMeta keeps the prefix of the version it has
    DESCRIPTION: ClassVar[str] = "dermassist"  # what its loader reads, for errors

    system: str = ""
    arch: str = ""
    version: str = ""
    data_hash: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    parent: str | None = None
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def version_prefix(self) -> str:
        """What versions of this system begin with (``dermnet``, ``segnet``, ``dual``, ...)."""
        if self.VERSION_PREFIX:
            return self.VERSION_PREFIX
        return self.version.split("-", 1)[0] if "-" in self.version else "model"

    @classmethod
    def config_fields(cls) -> tuple[str, ...]:
        """The names of this class's typed ``config`` fields (none for a plain ``ModelMeta``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _COMMON)

    def config_part(self) -> dict[str, Any]:
        """The ``config`` part as stored: the typed fields (and any untyped ones)."""
        return {**self.config, **{name: getattr(self, name) for name in self.config_fields()}}

    def to_dict(self) -> dict[str, Any]:
        """The stored form: the common fields, and the system's part under ``config``."""
        common = {name: getattr(self, name) for name in _COMMON if name != "config"}
        stored: dict[str, Any] = _plain({**common, "config": self.config_part()})
        return stored

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a stored dict (``config`` nested, or flat as format 1 stored it), ignoring keys
        this version does not know."""
        flat = {**data.get("config", {}), **{k: v for k, v in data.items() if k != "config"}}
        typed = cls.config_fields()
        known = {k: v for k, v in flat.items() if k in typed or (k in _COMMON and k != "config")}
        if not typed:  # a plain ModelMeta keeps the system's part as a dict
            known["config"] = {k: v for k, v in flat.items() if k not in _COMMON}
        if not known.get("system"):
            known.pop("system", None)  # a subclass's own default
        return cls(**known)

    @classmethod
    def from_meta(cls, meta: ModelMeta, source: str | Path = "the checkpoint") -> Self:
        """This system's typed view of ``meta``.

        Raises:
            ValueError: ``meta`` belongs to another system.
        """
        if cls.SYSTEM and meta.system != cls.SYSTEM:
            raise ValueError(
                f"{source} holds a {meta.arch or meta.system!r} model ({meta.system or 'no'} system); "
                f"this loader reads {cls.DESCRIPTION} checkpoints ({cls.SYSTEM})"
            )
        return cls.from_dict(meta.to_dict())


_COMMON = tuple(f.name for f in dataclasses.fields(ModelMeta))


def _plain(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays turned into Python numbers and lists (tensors kept), so
    the checkpoint loads with ``weights_only=True``."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value
