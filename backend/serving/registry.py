"""Model versions: where checkpoints live, which one is served, how one is promoted.

Checkpoints are copied into ``MODEL_DIR/versions/<version>.pt`` (atomically) and registered in
``model_versions``. Exactly one version at most has status ``promoted`` (a partial unique index says
so in the database); every backend process serves that one, checking the table at most once a
second, so a promotion reaches every worker process without a restart. Promotion is one
transaction: a job killed before it commits leaves the served model as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from consensus.models import ModelOutput, ModelStatus, ModelVersion, utcnow
from model.common.checkpoint import CheckpointMeta, atomic_copy, read_checkpoint
from model.common.provenance import Provenance, record, status_of


def versions_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "versions"


def promoted(session: Session) -> ModelVersion | None:
    """The served model version, if any."""
    return session.scalars(select(ModelVersion).where(ModelVersion.status == ModelStatus.PROMOTED)).first()


def register(
    session: Session,
    checkpoint: str | Path,
    model_dir: Path,
    status: ModelStatus = ModelStatus.CANDIDATE,
    metrics: dict[str, Any] | None = None,
    job_id: int | None = None,
    consensus_run_id: int | None = None,
    release: str | None = None,
    provenance: dict[str, dict[str, Any]] | None = None,
) -> ModelVersion:
    """Copy a checkpoint into the model folder and record it with each output's provenance (idempotent
    per version).

    Args:
        provenance: per output, where it comes from (default: what the checkpoint records; an output
            it says nothing about is recorded as untrained).
        release: the name of a released model.

    Raises:
        FileNotFoundError, ValueError: the file is missing or not a dermassist checkpoint.
    """
    meta = CheckpointMeta.from_dict(read_checkpoint(checkpoint)["meta"])
    existing = session.scalars(select(ModelVersion).where(ModelVersion.version == meta.version)).first()
    if existing is not None:
        if metrics:
            existing.metrics = dict(metrics)
        return existing
    recorded = provenance if provenance is not None else meta.provenance
    target = versions_dir(model_dir) / f"{meta.version}.pt"
    if not target.exists():
        atomic_copy(checkpoint, target)
    version = ModelVersion(
        version=meta.version,
        path=str(target),
        parent=meta.parent,
        status=status,
        metrics=dict(metrics or {}),
        job_id=job_id,
        consensus_run_id=consensus_run_id,
        release=release,
        outputs=[output_row(key, recorded.get(key)) for key in meta.targets],
    )
    session.add(version)
    session.flush()
    return version


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
    """Serve ``version`` from now on; the previously promoted one is retired (caller commits)."""
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == ModelStatus.PROMOTED, ModelVersion.id != version.id)
        .values(status=ModelStatus.RETIRED)
    )
    session.flush()
    version.status = ModelStatus.PROMOTED
    version.promoted_at = utcnow()
    session.flush()
