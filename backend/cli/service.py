"""The service's subcommands: ``serve``, ``worker``, ``sync``, ``predict``, ``models`` (list / promote)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.settings import Settings

from backend.cli.common import _settings

logger = logging.getLogger("dermassist")


def _bcc_xml() -> str:
    from labeling_config import load_config

    return load_config("bcc")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the Label Studio ML backend (waitress; --dev: Flask's development server)."""
    from backend.api.app import create_app
    from consensus.db import init_db

    settings = _settings(args)
    engine, _ = init_db(settings.database_url)  # migrate once, before any worker starts
    engine.dispose()
    if args.dev:
        app = create_app(settings, start_runner=True)
        app.run(host=args.host, port=args.port, threaded=True)
        return 0
    from backend.server import serve

    return serve(settings, args.host, args.port, args.http_threads)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run training jobs from Redis (REDIS_URL) with an RQ worker."""
    from redis import Redis
    from rq import Queue, Worker

    from backend.training.jobs import RQQueue

    settings = _settings(args)
    if not settings.redis_url:
        raise ValueError("set REDIS_URL: the worker takes its jobs from Redis")
    connection = Redis.from_url(settings.redis_url)
    worker = Worker([Queue(RQQueue.name, connection=connection)], connection=connection)
    worker.work(burst=args.burst)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Reconcile the store with a Label Studio project's export (what missed webhooks left out)."""
    from backend.collection.sync import sync_from_label_studio, sync_project
    from backend.label_studio.client import LabelStudioError
    from consensus.db import init_db
    from labeling_config.parse import parse_config

    settings = _settings(args)
    if args.export:
        import json

        tasks = json.loads(Path(args.export).read_text())
        config = parse_config(Path(args.config).read_text()) if args.config else parse_config(_bcc_xml())
        _, sessions = init_db(settings.database_url)
        summary = sync_project(sessions, args.project, tasks, config)
    else:
        _, sessions = init_db(settings.database_url)
        try:
            summary = sync_from_label_studio(settings, sessions, args.project)
        except LabelStudioError as exc:
            raise ValueError(str(exc)) from None
    print(" ".join(f"{k}={v}" for k, v in summary.as_dict().items()))
    return 0 if summary.errors == 0 else 1


def cmd_predict(args: argparse.Namespace) -> int:
    """Pre-annotate a whole Label Studio project: every task without a prediction of the served model
    version (--missing, the default) or every task (--all), in batches, resumable after a kill."""
    import sys

    from tqdm import tqdm

    from backend.serving.preannotate import Progress
    from backend.training import preannotation
    from consensus.db import init_db
    from consensus.models import JobStatus, PreannotationJob, PreannotationMode

    settings = _settings(args)
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise ValueError(
            "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the project's tasks are read from there"
        )
    _, sessions = init_db(settings.database_url)
    mode = PreannotationMode.ALL if args.all else PreannotationMode.MISSING
    job, created = preannotation.request_preannotation(sessions, args.project, mode, "cli", args.batch_size)
    if not created or not preannotation.claim(sessions, job.id):
        where = f" (pid {job.pid} on {job.host})" if job.pid is not None else ""
        raise ValueError(
            f"project {args.project} is being pre-annotated by job {job.id}{where}; its progress is in "
            "the backend's GET /jobs"
        )
    if job.resumed_from is not None:
        logger.info("resuming the interrupted job %d after task %d", job.resumed_from, job.cursor)
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # a line a request
    bars: list[Any] = []  # made at the first report, once the models are loaded and the total known

    def on_progress(progress: Progress) -> None:
        if not bars:
            bars.append(
                tqdm(desc=f"project {args.project}", unit="task", file=sys.stderr, disable=args.quiet)
            )
        bar = bars[0]
        if progress.total is not None and bar.total != progress.total:
            bar.total = progress.total
        bar.set_postfix(predicted=progress.done, failed=progress.failed, refresh=False)
        bar.update(progress.done + progress.failed - bar.n)

    try:
        status = preannotation.run_job(settings, sessions, job.id, on_progress)
    finally:
        for bar in bars:
            bar.close()
    with sessions() as session:
        row = session.get(PreannotationJob, job.id)
        assert row is not None
    summary = (
        f"job={row.id} status={row.status.value} version={row.version} total={row.total} "
        f"predicted={row.done} failed={row.failed}"
    )
    print(summary)
    if status is not JobStatus.SUCCEEDED:
        print(f"dermassist predict: error: {row.error}", file=sys.stderr)
        return 1
    return 0 if row.failed == 0 else 1


def cmd_models(args: argparse.Namespace) -> int:
    """List the model versions, or promote a checkpoint to be served."""
    from backend.serving import registry
    from consensus.db import init_db
    from consensus.models import ModelVersion

    settings = _settings(args)
    _, sessions = init_db(settings.database_url)
    with sessions() as session:
        if args.action == "promote-lesion":
            from backend.serving.lesion import promote_pair

            if not args.checkpoint or not args.dual:
                raise ValueError("dermassist models promote-lesion SEGNET_CHECKPOINT DUAL_CHECKPOINT")
            pair = promote_pair(session, Path(settings.model_dir), args.checkpoint, args.dual)
            session.commit()
            print(f"promoted the lesion pair {pair.version}")
            return 0
        if args.action == "promote":
            if not args.checkpoint:
                raise ValueError("dermassist models promote CHECKPOINT | VERSION | release")
            version = _find_version(session, sessions, settings, args.checkpoint)
            registry.promote(session, version)
            session.commit()
            print(f"promoted {version.version} ({version.release or version.path})")
            return 0
        from sqlalchemy import select

        for row in session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
            shown = [o.output for o in row.outputs if o.status == "validated"]
            print(
                f"{row.version}\t{row.system}\t{row.status.value}\t{row.created_at:%Y-%m-%d %H:%M}\t"
                f"{row.release or row.path}\tvalidated: {', '.join(shown) or 'none'}"
            )
    return 0


def _find_version(session: Any, sessions: Any, settings: Settings, name: str) -> Any:
    """A checkpoint file (registered now), a registered version id, or ``release`` (the released model)."""
    from backend.serving import registry
    from backend.serving.release import install_configured

    if Path(name).is_file():
        return registry.register(session, name, Path(settings.model_dir))
    if name == "release":
        release = install_configured(sessions, settings)  # registered (if it was not), in its own session
        if release is None or "dermnet" not in release.models:
            raise ValueError(f"no released model in RELEASE_DIR ({settings.release_dir})")
        session.expire_all()
        name = release.models["dermnet"].version
    found = registry.find(session, name)
    if found is None:
        raise ValueError(
            f"{name!r} is neither a checkpoint file nor a registered version (dermassist models list)"
        )
    return found
