"""Pre-annotation jobs (``preannotation_jobs``): at most one active per project, progress, how each ended.

Every write is one conditional statement (or an insert the database may refuse), so any number of
processes can start, claim, advance and end jobs at once on SQLite and PostgreSQL: the partial unique
index ``uq_preannotation_jobs_one_active`` lets one active (queued or running) job per project exist,
and every transition names the status it leaves, so it happens once. Like the rest of the repository,
nothing here commits: the caller owns the transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from consensus.models import JobStatus, PreannotationJob, PreannotationMode, utcnow

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def add_preannotation(
    session: Session,
    project: int,
    mode: PreannotationMode,
    trigger: str,
    batch_size: int,
    resumed_from: PreannotationJob | None = None,
) -> PreannotationJob | None:
    """Queue a job for ``project``; None when the project has an active job already (any process's).

    The insert runs in a savepoint, so a refusal leaves the caller's transaction usable.
    """
    job = PreannotationJob(
        project=project,
        mode=mode,
        status=JobStatus.QUEUED,
        trigger=trigger,
        batch_size=batch_size,
        done=0,
        failed=0,
        cursor=resumed_from.cursor if resumed_from is not None else 0,
        resumed_from=resumed_from.id if resumed_from is not None else None,
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        return None
    return job


def active_preannotation(session: Session, project: int) -> PreannotationJob | None:
    """The project's queued or running job, if any."""
    query = select(PreannotationJob).where(
        PreannotationJob.project == project, PreannotationJob.status.in_(ACTIVE)
    )
    return session.scalars(query).first()


def interrupted_preannotation(session: Session, project: int) -> PreannotationJob | None:
    """The project's latest job if it failed part-way (it handled some tasks), else None."""
    latest = session.scalars(
        select(PreannotationJob)
        .where(PreannotationJob.project == project, PreannotationJob.status.not_in(ACTIVE))
        .order_by(PreannotationJob.id.desc())
        .limit(1)
    ).first()
    if latest is None or latest.status is not JobStatus.FAILED or latest.cursor <= 0:
        return None
    return latest


def claim_preannotation(session: Session, job_id: int, pid: int, host: str) -> bool:
    """queued -> running, by process ``pid`` on ``host``; False if the job is not queued any more."""
    now = utcnow()
    result = session.execute(
        update(PreannotationJob)
        .where(PreannotationJob.id == job_id, PreannotationJob.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, pid=pid, host=host, started_at=now, heartbeat_at=now)
    )
    return bool(getattr(result, "rowcount", 0))


def record_preannotation_progress(
    session: Session,
    job_id: int,
    *,
    done: int,
    failed: int,
    cursor: int,
    total: int | None = None,
    version: str | None = None,
) -> bool:
    """A running job's progress (and its heartbeat); False if the job is no longer running (it was
    ended by someone else, e.g. found stale), which tells its process to stop."""
    values: dict[str, object] = {"done": done, "failed": failed, "cursor": cursor, "heartbeat_at": utcnow()}
    if total is not None:
        values["total"] = total
    if version is not None:
        values["version"] = version
    result = session.execute(
        update(PreannotationJob)
        .where(PreannotationJob.id == job_id, PreannotationJob.status == JobStatus.RUNNING)
        .values(**values)
    )
    return bool(getattr(result, "rowcount", 0))


def end_preannotation(
    session: Session,
    job_id: int,
    status: JobStatus,
    error: str | None = None,
    *,
    only: tuple[JobStatus, ...] = ACTIVE,
    heartbeat_before: datetime | None = None,
) -> bool:
    """Record how an active job ended; False if it had ended already (or left ``only``, or beat its
    heart since ``heartbeat_before``: a job judged stale that has moved on since is left alone)."""
    query = (
        update(PreannotationJob)
        .where(PreannotationJob.id == job_id, PreannotationJob.status.in_(only))
        .values(status=status, error=error, finished_at=utcnow())
    )
    if heartbeat_before is not None:
        query = query.where(
            (PreannotationJob.heartbeat_at.is_(None)) | (PreannotationJob.heartbeat_at <= heartbeat_before)
        )
    return bool(getattr(session.execute(query), "rowcount", 0))


def recent_preannotations(session: Session, limit: int = 50) -> list[PreannotationJob]:
    """The latest pre-annotation jobs, newest first."""
    query = select(PreannotationJob).order_by(PreannotationJob.id.desc()).limit(limit)
    return list(session.scalars(query).all())
