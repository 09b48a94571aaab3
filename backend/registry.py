"""Model versions: where checkpoints live, which one is served, how one is promoted.

Checkpoints are copied into ``MODEL_DIR/versions/<version>.pt`` (atomically) and registered in
``model_versions``. Exactly one version at most has status ``promoted`` (a partial unique index says
so in the database); every backend process serves that one, checking the table at most once a
second, so a promotion reaches every worker process without a restart. Promotion is one
transaction: a job killed before it commits leaves the served model as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from consensus.models import ModelStatus, ModelVersion, utcnow
from model.checkpoint import CheckpointMeta, read_checkpoint


def versions_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "versions"


def promoted(session: Session) -> ModelVersion | None:
    """The served model version, if any."""
    return session.scalars(select(ModelVersion).where(ModelVersion.status == ModelStatus.PROMOTED)).first()


def _copy_atomic(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        with source.open("rb") as src:
            shutil.copyfileobj(src, tmp)
        tmp.flush()
    Path(tmp.name).replace(target)


def register(
    session: Session,
    checkpoint: str | Path,
    model_dir: Path,
    status: ModelStatus = ModelStatus.CANDIDATE,
    metrics: dict[str, Any] | None = None,
    job_id: int | None = None,
    consensus_run_id: int | None = None,
) -> ModelVersion:
    """Copy a checkpoint into the model folder and record it (idempotent per version).

    Raises:
        FileNotFoundError, ValueError: the file is missing or not a dermassist checkpoint.
    """
    meta = CheckpointMeta.from_dict(read_checkpoint(checkpoint)["meta"])
    existing = session.scalars(select(ModelVersion).where(ModelVersion.version == meta.version)).first()
    if existing is not None:
        if metrics:
            existing.metrics = dict(metrics)
        return existing
    target = versions_dir(model_dir) / f"{meta.version}.pt"
    if not target.exists():
        _copy_atomic(Path(checkpoint), target)
    version = ModelVersion(
        version=meta.version,
        path=str(target),
        parent=meta.parent,
        status=status,
        metrics=dict(metrics or {}),
        job_id=job_id,
        consensus_run_id=consensus_run_id,
    )
    session.add(version)
    session.flush()
    return version


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
