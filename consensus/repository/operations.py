"""What the backend's routes and its retraining policy read: counts, model versions, jobs."""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from consensus.models import (
    Annotation,
    AnnotationEvent,
    ModelVersion,
    TrainingJob,
)

logger = logging.getLogger(__name__)


def items_changed_since_last_job(session: Session) -> int:
    """Items with a live annotation created or changed since the latest training job (all, if none)."""
    since = session.scalar(select(func.max(TrainingJob.created_at)))
    query = select(func.count(func.distinct(Annotation.item_id))).where(Annotation.deleted.is_(False))
    if since is not None:
        query = query.where(Annotation.updated_at > since)
    return int(session.scalar(query) or 0)


def model_versions(session: Session) -> list[ModelVersion]:
    """Every registered model version, oldest first, with its outputs loaded."""
    query = select(ModelVersion).order_by(ModelVersion.id).options(selectinload(ModelVersion.outputs))
    return list(session.scalars(query).all())


def recent_jobs(session: Session, limit: int = 50) -> list[TrainingJob]:
    """The latest training jobs, newest first."""
    return list(session.scalars(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(limit)).all())


def store_counts(session: Session) -> dict[str, int]:
    """Raw events kept and live annotations (for /metrics)."""
    events = session.scalar(select(func.count()).select_from(AnnotationEvent)) or 0
    live = session.scalar(select(func.count()).select_from(Annotation).where(Annotation.deleted.is_(False)))
    return {"events": int(events), "annotations": int(live or 0)}
