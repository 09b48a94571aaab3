"""Background pre-annotation jobs: one per project at a time, run in their own process, progress in SQL.

The life of a job (``preannotation_jobs``):

1. :func:`request_preannotation` queues it; the database allows one active (queued or running) job per
   project, so a second start, from any process, gets the job already there. An active job whose
   process is gone (killed, its machine restarted: a dead pid on this host, or no progress for
   :data:`STALE_S`) is marked failed first, so a kill never blocks a project.
2. A process claims it (``queued`` -> ``running``, with its pid and host) and runs
   :func:`run_job`: ``dermassist predict`` in its own process with a progress bar, or a child process
   (``python -m backend.training.preannotation JOB_ID``) that ``POST /projects/<id>/predict`` starts
   (:func:`launch`), whose exit is watched so a crash marks the job failed.
3. After every posted batch the job's progress (done, failed, total, the last task id) is written;
   a job that is no longer running there (another process judged it stale and ended it) stops.

Resuming is starting again: what is still to do is read from Label Studio (tasks without a prediction
of the served version, :mod:`backend.label_studio.project_predictions`), so the work a killed job posted
is not redone. An interrupted ``--all`` run (which replaces predictions, so Label Studio cannot tell
what it did) goes on after the last task id it recorded.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from backend.collection.spool import pid_alive
from backend.images import ImageError, ImageFetcher
from backend.label_studio.client import LabelStudioError, connect, label_studio_errors
from backend.label_studio.project_predictions import MAX_BATCH, ProjectPredictions
from backend.serving.holder import Holder, Serving
from backend.serving.preannotate import Progress, preannotate
from backend.serving.predict import predict_tasks
from backend.serving.registry import MULTITASK
from backend.settings import Settings
from consensus.models import JobStatus, PreannotationJob, PreannotationMode, utcnow
from consensus.repository import (
    active_preannotation,
    add_preannotation,
    claim_preannotation,
    end_preannotation,
    interrupted_preannotation,
    record_preannotation_progress,
)
from labeling_config.parse import ConfigError, parse_config

logger = logging.getLogger(__name__)

#: The module a job's child process runs (``python -m WORK JOB_ID``).
WORK = "backend.training.preannotation"
STALE_S = 600.0
"""A running job that has written no progress for this long is taken as dead (a batch takes seconds)."""
QUEUED_STALE_S = 120.0
"""A queued job no process claimed within this long is taken as dead (its launcher died)."""


class PreannotationError(RuntimeError):
    """A pre-annotation job could not run; the message says why."""


def this_host() -> str:
    return socket.gethostname()


def _age_s(moment: datetime | None, now: datetime) -> float:
    if moment is None:
        return float("inf")
    if moment.tzinfo is None:  # SQLite gives back naive UTC
        moment = moment.replace(tzinfo=UTC)
    return (now - moment).total_seconds()


def is_stale(job: PreannotationJob, now: datetime | None = None) -> bool:
    """Whether an active job's process is gone: a dead pid on this host, no claim, or no progress."""
    now = now or utcnow()
    if job.status is JobStatus.QUEUED:
        return _age_s(job.created_at, now) > QUEUED_STALE_S
    if job.host == this_host() and job.pid is not None and not pid_alive(job.pid):
        return True
    return _age_s(job.heartbeat_at or job.started_at, now) > STALE_S


def request_preannotation(
    sessions: sessionmaker[Session],
    project: int,
    mode: PreannotationMode = PreannotationMode.MISSING,
    trigger: str = "api",
    batch_size: int = 32,
) -> tuple[PreannotationJob, bool]:
    """Queue a job for ``project``, or return the one it has.

    Returns:
        The project's active job and whether this call created it.

    Raises:
        ValueError: a batch size outside 1..:data:`MAX_BATCH`.
    """
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"the batch size must be between 1 and {MAX_BATCH}, got {batch_size}")
    for _ in range(5):
        with sessions() as session:
            active = active_preannotation(session, project)
            if active is not None:
                if not is_stale(active):
                    return active, False
                if end_preannotation(
                    session,
                    active.id,
                    JobStatus.FAILED,
                    "interrupted: its process is gone",
                    only=(active.status,),
                    heartbeat_before=active.heartbeat_at,
                ):
                    logger.info("pre-annotation job %d of project %d was interrupted", active.id, project)
                session.commit()
                continue
            resumed = interrupted_preannotation(session, project) if mode is PreannotationMode.ALL else None
            if resumed is not None and resumed.mode is not PreannotationMode.ALL:
                resumed = None
            job = add_preannotation(session, project, mode, trigger, batch_size, resumed)
            if job is not None:
                session.commit()
                logger.info("pre-annotation job %d queued for project %d (%s)", job.id, project, mode.value)
                return job, True
            session.rollback()
    raise PreannotationError(f"could not queue a pre-annotation of project {project}: it kept changing")


def claim(sessions: sessionmaker[Session], job_id: int) -> bool:
    """Take a queued job for this process."""
    with sessions() as session:
        claimed = claim_preannotation(session, job_id, os.getpid(), this_host())
        session.commit()
        return claimed


def fail(sessions: sessionmaker[Session], job_id: int, error: str) -> bool:
    with sessions() as session:
        ended = end_preannotation(session, job_id, JobStatus.FAILED, error)
        session.commit()
        return ended


def _install_release(settings: Settings, sessions: sessionmaker[Session]) -> None:
    """The released models in the registry, as ``serve`` does at start (a lookup when they are there)."""
    from backend.serving.release import ReleaseError, install_configured

    try:
        install_configured(sessions, settings)
    except ReleaseError as exc:
        raise PreannotationError(str(exc)) from None


def run_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    job_id: int,
    on_progress: Callable[[Progress], None] | None = None,
) -> JobStatus:
    """Run a claimed job to its end and record how it ended.

    Args:
        on_progress: called after each batch (the CLI's progress bar).

    Returns:
        SUCCEEDED, or FAILED (the job's ``error`` says why), or RUNNING if another process ended it
        while it ran (it stopped).
    """
    with sessions() as session:
        job = session.get(PreannotationJob, job_id)
        if job is None or job.status is not JobStatus.RUNNING:
            raise PreannotationError(f"pre-annotation job {job_id} is not running here")
        project, mode, batch_size, cursor = job.project, job.mode, job.batch_size, job.cursor
        resumed = session.get(PreannotationJob, job.resumed_from) if job.resumed_from is not None else None
        resumed_version = resumed.version if resumed is not None else None
    try:
        _install_release(settings, sessions)
        url, key = settings.label_studio_url, settings.label_studio_api_key
        if not url or not key:
            raise PreannotationError(
                "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the tasks are read from there"
            )
        fetcher = ImageFetcher(settings)
        serving = Serving(sessions, Holder(engine=settings.serving_engine, threads=settings.threads))
        with connect(url, key) as ls, label_studio_errors(url):
            config = parse_config(ls.label_config(project))
            served = serving.for_config(config)
            if not served.systems:
                raise PreannotationError(
                    f"project {project}'s labeling config has no control this model fills (a diagnosis, "
                    "patterns, regions or the lesion outline)"
                )
            if MULTITASK in served.systems and served.multitask is None:
                raise PreannotationError("no model is promoted yet: `dermassist models promote CHECKPOINT`")
            if served.version != resumed_version:
                cursor = 0  # another version: an interrupted run's place says nothing about this one
            source = ProjectPredictions(ls, project, served.version)

            def predict(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return predict_tasks(
                    tasks,
                    config,
                    served,
                    fetcher,
                    settings.model_score_threshold,
                    show_all=settings.show_outputs == "all",
                    concurrency=settings.image_fetch_concurrency,
                    acquisition=settings.acquisition,
                )

            def on_batch(progress: Progress) -> bool:
                with sessions() as session:
                    running = record_preannotation_progress(
                        session,
                        job_id,
                        done=progress.done,
                        failed=progress.failed,
                        cursor=progress.cursor,
                        total=progress.total,
                        version=served.version,
                    )
                    session.commit()
                if on_progress is not None:
                    on_progress(progress)
                return running

            logger.info(
                "pre-annotating project %d with %s (%s%s)",
                project,
                served.version,
                mode.value,
                f", after task {cursor}" if cursor else "",
            )
            progress = preannotate(
                source,
                predict,
                replace=mode is PreannotationMode.ALL,
                batch_size=batch_size,
                cursor=cursor,
                on_batch=on_batch,
            )
            if not on_batch(progress):
                logger.warning("pre-annotation job %d was ended by another process; stopped", job_id)
                return JobStatus.RUNNING
    except (PreannotationError, LabelStudioError, ConfigError, ImageError, ValueError) as exc:
        fail(sessions, job_id, str(exc))
        logger.error("pre-annotation job %d failed: %s", job_id, exc)
        return JobStatus.FAILED
    except BaseException as exc:
        fail(sessions, job_id, f"{type(exc).__name__}: {exc}")
        raise
    with sessions() as session:
        end_preannotation(session, job_id, JobStatus.SUCCEEDED)
        session.commit()
    logger.info(
        "pre-annotation job %d: %d predicted, %d failed, %.1f tasks/s",
        job_id,
        progress.done,
        progress.failed,
        progress.rate,
    )
    return JobStatus.SUCCEEDED


def launch(settings: Settings, sessions: sessionmaker[Session], job_id: int) -> subprocess.Popen[bytes]:
    """Run a queued job in a child process (``python -m backend.training.preannotation JOB_ID``); a thread
    waits for it and marks the job failed if it dies."""
    env = {**os.environ, **settings.to_env()}
    child = subprocess.Popen([sys.executable, "-m", WORK, str(job_id)], env=env, start_new_session=True)

    def watch() -> None:
        code = child.wait()
        if code != 0:
            how = (
                f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            )
            if fail(sessions, job_id, f"the pre-annotation process {how}"):
                logger.warning("pre-annotation job %d: its process %s", job_id, how)

    threading.Thread(target=watch, name=f"dermassist-preannotate-{job_id}", daemon=True).start()
    return child


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print(f"usage: python -m {WORK} JOB_ID", file=sys.stderr)
        return 2
    from consensus.db import init_db

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, sessions = init_db(settings.database_url)
    job_id = int(args[0])
    if not claim(sessions, job_id):
        print(f"pre-annotation job {job_id} is not queued (another process took it)", file=sys.stderr)
        return 0
    return 0 if run_job(settings, sessions, job_id) is JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
