"""Model versions of every served system: where their files live, which one is served, promotion.

One registry for both systems: a version is a row of ``model_versions`` with the system it belongs to
(``multitask``: the BCC model, one checkpoint; ``lesion``: the U-Net and the dual classifier, served as
one pair) and each output's provenance (``model_outputs``). Its files are copied into
``MODEL_DIR/versions/`` atomically: ``<version>.pt`` for one file, ``<version>/`` for several. At most
one version per system has status ``promoted`` (a partial unique index says so in the database); every
backend process serves that one (:mod:`backend.serving.holder`), so a promotion reaches every worker
without a restart. Promotion is one transaction: a job killed before it commits leaves the served model
as it was. Each system says what a version of it is (:class:`Candidate`): :func:`checkpoint_candidate`
for the BCC model, :func:`backend.serving.lesion.pair_candidate` for the pair.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from consensus.models import ModelOutput, ModelStatus, ModelVersion, utcnow
from model.common.files import atomic_copy
from model.common.provenance import Provenance, record, status_of

logger = logging.getLogger(__name__)

MULTITASK, LESION = "multitask", "lesion"  # the served systems


@dataclass(frozen=True)
class Candidate:
    """What a system says a version of it is, before it is registered.

    Attributes:
        files: the version's files by their name in its folder; a single file is kept as
            ``<version>.pt``.
        outputs: the outputs it fills, each recorded with its provenance (none: untrained).
        graphs: writes the version's ONNX graphs (for ONNX Runtime) once its files are registered,
            given where they are (``<version>.pt`` or the folder); none: served by PyTorch.
    """

    system: str
    version: str
    files: dict[str, Path]
    outputs: tuple[str, ...]
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent: str | None = None
    graphs: Callable[[Path], None] | None = None


def checkpoint_candidate(checkpoint: str | Path) -> Candidate:
    """A BCC model checkpoint as a version of the ``multitask`` system.

    Raises:
        FileNotFoundError, ValueError: the file is missing or not a dermassist checkpoint.
    """
    from model.common.checkpoint import read_checkpoint
    from model.multitask.meta import CheckpointMeta

    meta = read_checkpoint(checkpoint, CheckpointMeta).meta
    return Candidate(
        system=MULTITASK,
        version=meta.version,
        files={f"{meta.version}.pt": Path(checkpoint)},
        outputs=tuple(meta.targets),
        provenance=dict(meta.provenance),
        parent=meta.parent,
        graphs=lambda target: write_graph(target, Path(checkpoint), meta.version),
    )


def versions_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "versions"


def promoted(session: Session, system: str = MULTITASK) -> ModelVersion | None:
    """The served version of ``system``, if any."""
    return session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.PROMOTED, ModelVersion.system == system)
    ).first()


def register(
    session: Session,
    checkpoint: str | Path | Candidate,
    model_dir: Path,
    status: ModelStatus = ModelStatus.CANDIDATE,
    metrics: dict[str, Any] | None = None,
    job_id: int | None = None,
    consensus_run_id: int | None = None,
    release: str | None = None,
    provenance: dict[str, dict[str, Any]] | None = None,
) -> ModelVersion:
    """Copy a version's files into the model folder and record it with each output's provenance
    (idempotent per version).

    Args:
        checkpoint: a BCC model checkpoint, or any system's :class:`Candidate`.
        provenance: per output, where it comes from (default: what the candidate records; an output
            it says nothing about is recorded as untrained).
        release: the name of a released model.

    Raises:
        FileNotFoundError, ValueError: the file is missing or not a dermassist checkpoint.
    """
    candidate = checkpoint if isinstance(checkpoint, Candidate) else checkpoint_candidate(checkpoint)
    existing = session.scalars(select(ModelVersion).where(ModelVersion.version == candidate.version)).first()
    if existing is not None:
        if metrics:
            existing.metrics = _json_safe(metrics)
        return existing
    recorded = provenance if provenance is not None else candidate.provenance
    folder = versions_dir(model_dir)
    if len(candidate.files) == 1:
        ((name, source),) = candidate.files.items()
        target = folder / name
        copies = {target: source}
    else:
        target = folder / candidate.version
        copies = {target / name: source for name, source in candidate.files.items()}
    for copy, source in copies.items():
        if not copy.exists():
            atomic_copy(source, copy)
    if candidate.graphs is not None:
        candidate.graphs(target)
    version = ModelVersion(
        version=candidate.version,
        system=candidate.system,
        path=str(target),
        parent=candidate.parent,
        status=status,
        metrics=_json_safe(metrics or {}),
        job_id=job_id,
        consensus_run_id=consensus_run_id,
        release=release,
        outputs=[output_row(key, recorded.get(key)) for key in candidate.outputs],
    )
    session.add(version)
    session.flush()
    return version


def write_graph(checkpoint: Path, source: Path, version: str) -> None:
    """A BCC model checkpoint's ONNX graph beside it, for ONNX Runtime to serve: copied from beside the source
    when one of the same version is there, else exported (kept if already there). A graph that cannot
    be written is logged: the version is then served by PyTorch."""
    from backend.serving.multitask import export_served, graph_version, onnx_path

    target = onnx_path(checkpoint)
    if target.is_file():
        return
    try:
        given = onnx_path(source)
        if given.is_file() and graph_version(given) == version:
            atomic_copy(given, target)
        else:
            export_served(checkpoint)
    except Exception:
        logger.exception("no ONNX graph for %s: it is served with PyTorch", checkpoint.name)


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (PostgreSQL's JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def output_row(key: str, entry: dict[str, Any] | None) -> ModelOutput:
    """A ``model_outputs`` row from a :mod:`model.common.provenance` record (none: untrained)."""
    entry = entry or record(Provenance.UNTRAINED)
    return ModelOutput(
        output=key,
        status=status_of({key: entry}, key).value,
        metric=entry.get("metric"),
        value=entry.get("value"),
        n_images=entry.get("n_images"),
        n_positive=entry.get("n_positive"),
        data=entry.get("data"),
    )


def provenance(version: ModelVersion) -> dict[str, dict[str, Any]]:
    """A stored version's provenance per output, as :mod:`model.common.provenance` records."""
    return {row.output: row.as_dict() for row in version.outputs}


def find(session: Session, name: str) -> ModelVersion | None:
    """A registered version by its version id, or the latest one of a release by the release's name."""
    found = session.scalars(select(ModelVersion).where(ModelVersion.version == name)).first()
    if found is None:
        found = session.scalars(
            select(ModelVersion).where(ModelVersion.release == name).order_by(ModelVersion.id.desc())
        ).first()
    return found


def promote(session: Session, version: ModelVersion) -> None:
    """Serve ``version`` from now on; its system's previously promoted one is retired (caller commits)."""
    session.execute(
        update(ModelVersion)
        .where(
            ModelVersion.status == ModelStatus.PROMOTED,
            ModelVersion.system == version.system,
            ModelVersion.id != version.id,
        )
        .values(status=ModelStatus.RETIRED)
    )
    session.flush()
    version.status = ModelStatus.PROMOTED
    version.promoted_at = utcnow()
    session.flush()
