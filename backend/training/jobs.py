"""The training-job queue: jobs queued by any trigger, run one at a time in a child process.

The life of a job (``training_jobs``):

1. :func:`request_training` queues it. The database allows one queued job (a partial unique index),
   so triggers that arrive while one is queued, from any process, coalesce into it (``triggers`` counts
   them). A trigger that arrives while a job runs queues the next one.
2. A runner claims it (``queued`` -> ``running``; a second partial unique index allows one running job)
   and runs the work (:func:`backend.training.retrain.run_job`) in a child process
   (``python -m backend.training.retrain JOB_ID``): the in-process :class:`JobRunner` thread of
   ``dermassist serve`` by default, or an RQ worker (``dermassist worker``) when ``REDIS_URL`` is set.
   Both take a job the same way, :meth:`Runner.submit`. Either way :func:`supervise` marks the job
   failed when the child dies.
3. Nothing before the child's final commit touches the served model: a job that fails or is killed
   leaves it and the store as they were, and the next trigger works.

What a job does is :mod:`backend.training.retrain`'s business; when to queue one is
:mod:`backend.training.policy`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from backend.collection.spool import pid_alive
from backend.settings import Settings
from consensus.models import JobStatus, TrainingJob, utcnow

logger = logging.getLogger(__name__)

#: The module a job's child process runs (``python -m WORK JOB_ID``).
WORK = "backend.training.retrain"


class Runner(Protocol):
    """What runs queued jobs: :class:`JobRunner` (in process) or :class:`RQQueue` (RQ workers)."""

    def submit(self, job_id: int) -> None:
        """Take a newly queued job (the runner may run it later, after the one it is running)."""
        ...


# --------------------------------------------------------------------------------------------- queue
def request_training(
    sessions: sessionmaker[Session], trigger: str, params: dict[str, Any] | None = None
) -> tuple[TrainingJob, bool]:
    """Queue a job, or coalesce into the queued one.

    Returns:
        The queued job and whether this call created it.
    """
    for _ in range(5):
        with sessions() as session:
            job = TrainingJob(trigger=trigger, status=JobStatus.QUEUED, triggers=1, params=dict(params or {}))
            session.add(job)
            try:
                session.commit()
                logger.info("training job %d queued (%s)", job.id, trigger)
                return job, True
            except IntegrityError:
                session.rollback()
        with sessions() as session:
            queued = session.scalars(
                select(TrainingJob).where(TrainingJob.status == JobStatus.QUEUED)
            ).first()
            if queued is not None:
                session.execute(
                    update(TrainingJob)
                    .where(TrainingJob.id == queued.id)
                    .values(triggers=TrainingJob.triggers + 1)
                )
                session.commit()
                session.refresh(queued)
                return queued, False
    raise RuntimeError("could not queue a training job: the queue kept changing under this request")


def claim(sessions: sessionmaker[Session], job_id: int, pid: int | None = None) -> bool:
    """Move a queued job to running; False if it is not queued or another job is running."""
    with sessions() as session:
        try:
            result = session.execute(
                update(TrainingJob)
                .where(TrainingJob.id == job_id, TrainingJob.status == JobStatus.QUEUED)
                .values(status=JobStatus.RUNNING, started_at=utcnow(), pid=pid)
            )
            session.commit()
        except IntegrityError:
            session.rollback()
            return False
        return bool(getattr(result, "rowcount", 0))


def next_queued(sessions: sessionmaker[Session]) -> int | None:
    with sessions() as session:
        return session.scalar(select(TrainingJob.id).where(TrainingJob.status == JobStatus.QUEUED))


def finish(
    sessions: sessionmaker[Session],
    job_id: int,
    status: JobStatus,
    error: str | None = None,
    log: str | None = None,
    **values: Any,
) -> None:
    """Record how a running job ended (a job that already ended is left as it is)."""
    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        if job is None or job.status not in (JobStatus.RUNNING, JobStatus.QUEUED):
            return
        job.status = status
        job.finished_at = utcnow()
        job.error = error
        if log:
            job.log = (job.log or "") + log
        for key, value in values.items():
            setattr(job, key, value)
        session.commit()


def _alive(pid: int | None) -> bool:
    return pid is not None and pid_alive(pid)


def recover_interrupted(sessions: sessionmaker[Session]) -> list[int]:
    """Mark failed the running jobs whose process is gone (a backend or worker that was killed)."""
    with sessions() as session:
        running = session.scalars(select(TrainingJob).where(TrainingJob.status == JobStatus.RUNNING)).all()
        dead = [job.id for job in running if not _alive(job.pid)]
    for job_id in dead:
        finish(sessions, job_id, JobStatus.FAILED, error="interrupted: its process is gone")
    return dead


# ------------------------------------------------------------------------------------- supervision
def supervise(settings: Settings, job_id: int, sessions: sessionmaker[Session] | None = None) -> JobStatus:
    """Claim a job and run it in a child process; mark it failed if the child fails or dies."""
    from consensus.db import init_db

    if sessions is None:
        _, sessions = init_db(settings.database_url)
    if not claim(sessions, job_id):
        logger.info("job %d not claimed (not queued, or another job is running)", job_id)
        with sessions() as session:
            job = session.get(TrainingJob, job_id)
            return job.status if job is not None else JobStatus.FAILED
    env = {**os.environ, **settings.to_env()}
    child = subprocess.Popen([sys.executable, "-m", WORK, str(job_id)], env=env, start_new_session=True)
    with sessions() as session:
        session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(pid=child.pid))
        session.commit()
    code = child.wait()
    if code != 0:
        how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        finish(sessions, job_id, JobStatus.FAILED, error=f"the training process {how}")
    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        status = job.status if job is not None else JobStatus.FAILED
    logger.info("training job %d: %s", job_id, status.value)
    return status


def rq_entry(job_id: int) -> str:
    """What an RQ worker runs: the same supervision as the in-process runner."""
    return supervise(Settings.from_env(), job_id).value


class JobRunner:
    """The in-process queue of ``dermassist serve``: one thread that supervises queued jobs in turn."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], poll_s: float = 5.0) -> None:
        self.settings = settings
        self.sessions = sessions
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> JobRunner:
        recover_interrupted(self.sessions)
        self._thread = threading.Thread(target=self._loop, name="dermassist-jobs", daemon=True)
        self._thread.start()
        return self

    def submit(self, job_id: int) -> None:
        """Wake the thread: it runs the queued job (``job_id`` or the one it coalesced into)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            try:
                job_id = next_queued(self.sessions)
                if job_id is not None:
                    supervise(self.settings, job_id, self.sessions)
            except Exception:  # the runner outlives any one job
                logger.exception("the job runner hit an error")


class RQQueue:
    """Jobs for RQ workers on Redis (``REDIS_URL``); ``dermassist worker`` runs them."""

    name = "dermassist"

    def __init__(self, redis_url: str) -> None:
        from redis import Redis
        from rq import Queue

        self.queue = Queue(self.name, connection=Redis.from_url(redis_url))

    def submit(self, job_id: int) -> None:
        self.queue.enqueue(rq_entry, job_id, job_timeout=24 * 3600, job_id=f"dermassist-train-{job_id}")
