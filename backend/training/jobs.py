"""Retraining jobs: queued by a policy, run one at a time in a separate process, promoted only if not worse.

The life of a job (``training_jobs``):

1. :func:`request_training` queues it. The database allows one queued job (a partial unique index),
   so triggers that arrive while one is queued, from any process, coalesce into it (``triggers`` counts
   them). A trigger that arrives while a job runs queues the next one.
2. A runner claims it (``queued`` -> ``running``; a second partial unique index allows one running job)
   and runs :func:`run_job` in a child process (``python -m backend.training.jobs JOB_ID``): the in-process
   :class:`JobRunner` thread of ``dermassist serve`` by default, or an RQ worker (``dermassist worker``)
   when ``REDIS_URL`` is set. Either way the supervisor marks the job failed when the child dies.
3. The child re-runs the consensus, builds a training set of the items with consensus and an image,
   keeps a fixed validation split apart (items whose id hashes into the last fifth: the same items
   for every job, whatever was added since), trains on the consensus posteriors as soft targets from
   the promoted model, scores the candidate and the promoted model on the validation split, and
   promotes the candidate only if its validation loss (binary cross-entropy against the consensus
   posteriors, the proper scoring rule that is defined on any split) is not worse. Either way the
   version is recorded in ``model_versions``.
4. Nothing before the final commit touches the served model: a job that fails or is killed leaves it
   and the store as they were, and the next trigger works.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from backend.collection.spool import pid_alive
from backend.settings import Settings
from consensus.models import Annotation, Item, JobStatus, ModelStatus, TrainingJob, utcnow
from consensus.repository import consensus_table
from consensus.service import run_consensus
from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS, TARGETS
from model.common.data import IMAGE_SUFFIXES, is_synthetic
from model.common.provenance import Provenance

logger = logging.getLogger(__name__)

VALIDATION_BUCKETS = 5  # one item in five, by a hash of its id, validates every job


def is_validation(external_id: str) -> bool:
    """Whether an item belongs to the fixed validation split (stable across jobs and machines)."""
    digest = hashlib.sha256(external_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % VALIDATION_BUCKETS == 0


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
    child = subprocess.Popen(
        [sys.executable, "-m", "backend.training.jobs", str(job_id)], env=env, start_new_session=True
    )
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

    def submit(self) -> None:
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


# --------------------------------------------------------------------------------------------- work
@dataclass
class TrainingSet:
    """Items with consensus and an image, split into training and the fixed validation part."""

    table: pd.DataFrame  # model.common.data.load_table's columns
    targets: pd.DataFrame  # soft targets (posterior of 1), index image_id
    validation: pd.DataFrame
    validation_targets: pd.DataFrame


def _local_image(folder: Path, external_id: str) -> Path | None:
    for sub in (folder / "images", folder):
        for suffix in IMAGE_SUFFIXES:
            path = sub / f"{external_id}{suffix}"
            if path.is_file():
                return path
    return None


class ImageSource:
    """Where a job finds an item's image: a study folder (the CLI's ``--images``), else Label Studio
    through the same guarded fetcher as ``/predict``, kept under ``MODEL_DIR/cache/images`` by content
    hash. Call it with an item: the image's path, or None with the reason in ``last_error``."""

    def __init__(self, settings: Settings, images: Path | None) -> None:
        from backend.images import ImageFetcher

        self.images = images
        self.cache = Path(settings.model_dir) / "cache" / "images"
        self.fetcher = ImageFetcher(settings) if images is None else None
        self.last_error = ""

    def __call__(self, item: Item) -> Path | None:
        from backend.images import ImageError

        self.last_error = "no image"
        if self.images is not None:
            return _local_image(self.images, item.external_id)
        if not item.image or self.fetcher is None:
            return None
        # Fetched again for every job and kept under its content hash: a file replaced behind the
        # same URL is never trained on stale.
        try:
            loaded = self.fetcher.fetch(item.image)
        except ImageError as exc:
            self.last_error = str(exc)
            return None
        path = self.cache / f"{loaded.sha256}.png"
        if not path.is_file():
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            loaded.image.save(tmp, format="PNG")
            tmp.replace(path)
        return path


def build_training_set(
    session: Session, run_id: int, settings: Settings, images: Path | None, log: list[str]
) -> TrainingSet:
    """Consensus posteriors + images -> the tables :func:`model.multitask.train.train` reads.

    Images come from ``images`` (a study folder, the CLI's ``--images``) when given, else from Label
    Studio through the same guarded fetcher as ``/predict``, kept under ``MODEL_DIR/cache/images``
    by content hash.
    """
    from consensus.models import ConsensusRun

    run = session.get(ConsensusRun, run_id)
    if run is None:
        raise ValueError(f"consensus run {run_id} not found")
    long = consensus_table(session, run)
    long["p1"] = np.where(long["value"] == "1", long["posterior"], 1.0 - long["posterior"])
    wide = long.pivot_table(index="task", columns="label_key", values="p1", aggfunc="first")
    if DIAGNOSIS_KEY not in wide.columns:
        raise ValueError("the consensus has no diagnosis: no rater answered BCC / non-BCC yet")
    wide = wide[wide[DIAGNOSIS_KEY].notna()]
    items = {
        i.external_id: i for i in session.scalars(select(Item).where(Item.external_id.in_(list(wide.index))))
    }
    source = ImageSource(settings, images)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for external_id, probs in wide.iterrows():
        item = items.get(str(external_id))
        path = source(item) if item is not None else None
        if path is None:
            skipped.append(f"{external_id}: {source.last_error if item is not None else 'no image'}")
            continue
        row: dict[str, Any] = {
            "image_id": str(external_id),
            "lesion_id": str(external_id),
            "image_path": str(path),
            "mask_path": None,
            DIAGNOSIS_KEY: int(probs[DIAGNOSIS_KEY] >= 0.5),
        }
        known = [k for k in PATTERN_KEYS if k in probs.index and not math.isnan(probs[k])]
        row["has_patterns"] = len(known) == len(PATTERN_KEYS)
        for key in PATTERN_KEYS:
            row[key] = int(probs[key] >= 0.5) if key in known else np.nan
        rows.append(row)
    if skipped:
        log.append(f"{len(skipped)} item(s) without a usable image: {skipped[:5]}")
    if not rows:
        raise ValueError("no consensus item has a usable image")
    table = pd.DataFrame(rows)
    targets = wide.reindex(columns=[k for k in TARGETS if k in wide.columns]).loc[table["image_id"]]
    targets.index.name = "image_id"
    val = table["image_id"].map(is_validation).to_numpy()
    return TrainingSet(
        table=table[~val].reset_index(drop=True),
        targets=targets[~val],
        validation=table[val].reset_index(drop=True),
        validation_targets=targets[val],
    )


def project_provenance(
    data: TrainingSet, probs: NDArray[np.float64], synthetic: bool, run_id: int
) -> dict[str, dict[str, Any]]:
    """Each output's provenance for a model trained on a project's consensus, judged on the project's
    fixed validation split (``model.common.provenance``: validated with at least 20 positives and AUROC
    0.80)."""
    from model.common.provenance import assess

    train = data.targets.reindex(index=data.table["image_id"], columns=list(TARGETS)).to_numpy(dtype=float)
    known = ~np.isnan(train)
    val = data.validation_targets.reindex(columns=list(TARGETS)).to_numpy(dtype=float)
    return assess(
        TARGETS,
        known.sum(0).astype(float),
        ((np.nan_to_num(train) >= 0.5) & known).sum(0).astype(float),
        np.nan_to_num(val),
        (~np.isnan(val)).astype(float),
        probs,
        synthetic,
        f"this project's consensus (run {run_id}): fixed validation split of {len(data.validation)} items",
    )


def lost_outputs(current: dict[str, dict[str, Any]], candidate: dict[str, dict[str, Any]]) -> list[str]:
    """Outputs validated for the served model that the candidate would no longer have validated: a
    candidate that loses one is worse, whatever its loss (the output would vanish from the project)."""
    return [
        key
        for key, entry in current.items()
        if entry.get("status") == Provenance.VALIDATED
        and candidate.get(key, {}).get("status") != Provenance.VALIDATED
    ]


def stamp_provenance(checkpoint: Path, provenance: dict[str, dict[str, Any]]) -> None:
    """Write the provenance into the checkpoint's metadata (same weights, same version), atomically."""
    import io

    import torch

    from model.common.checkpoint import atomic_write_bytes, read_checkpoint

    raw = read_checkpoint(checkpoint)
    raw["meta"]["provenance"] = provenance
    buffer = io.BytesIO()
    torch.save(raw, buffer)
    atomic_write_bytes(checkpoint, buffer.getvalue())


def _why(provenance: dict[str, dict[str, Any]], keys: list[str]) -> str:
    return "; ".join(
        f"{k} has {provenance.get(k, {}).get('n_positive', 0)} positives "
        f"({provenance.get(k, {}).get('note') or provenance.get(k, {}).get('status')})"
        for k in keys
    )


def should_retrain(changed_items: int, every_n: int) -> bool:
    """The retraining policy: a job once ``every_n`` items gained or changed annotations since the last
    job (``START_TRAINING_EACH_N_UPDATES``; 0 turns it off)."""
    return every_n > 0 and changed_items >= every_n


def validation_probs(checkpoint: str | Path, table: pd.DataFrame) -> NDArray[np.float64]:
    """A model's calibrated probabilities ``(N, K)`` on the rows' images, in ``TARGETS`` order."""
    from PIL import Image

    from backend.serving.multitask import load_served, run_batch

    served = load_served(checkpoint)
    probs: list[list[float]] = []
    for start in range(0, len(table), 32):
        images = []
        for path in table["image_path"].iloc[start : start + 32]:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        probs.extend([o.probs[k] for k in TARGETS] for o in run_batch(served, images, maps=False))
    return np.asarray(probs, dtype=float).reshape(len(table), len(TARGETS))


def validation_loss(
    checkpoint: str | Path,
    table: pd.DataFrame,
    targets: pd.DataFrame,
    probs: NDArray[np.float64] | None = None,
) -> dict[str, float]:
    """Mean binary cross-entropy of a model's calibrated probabilities against the consensus
    posteriors (over every known target), and the BCC AUROC where both classes occur."""
    from sklearn.metrics import roc_auc_score

    found = validation_probs(checkpoint, table) if probs is None else probs
    p = np.clip(found, 1e-6, 1 - 1e-6)
    t = targets.reindex(columns=list(TARGETS)).to_numpy(dtype=float)
    known = ~np.isnan(t)
    bce = -(np.nan_to_num(t) * np.log(p) + (1 - np.nan_to_num(t)) * np.log(1 - p))
    metrics = {"val_loss": float(bce[known].mean()), "n_validation": len(table)}
    y = t[:, 0] >= 0.5
    if 0 < y.sum() < len(y):
        metrics["bcc_auroc"] = float(roc_auc_score(y, p[:, 0]))
    return metrics


def _has_lesion_answers(session: Session) -> bool:
    """Whether any live annotation holds a HAM10000 diagnosis (a ``lesion.xml`` project's)."""
    from backend.training.lesion import ham_code

    found = session.scalars(
        select(Annotation.diagnosis).where(Annotation.deleted.is_(False)).distinct()
    ).all()
    return any(ham_code(value) is not None for value in found)


def train_dermnet(
    job_id: int,
    settings: Settings,
    sessions: sessionmaker[Session],
    params: dict[str, Any],
    note: Callable[[str], None],
) -> tuple[str, bool]:
    """The BCC model's part of a job: consensus, training set, fine-tune, validate, register / promote.

    Returns:
        The new version and whether it was promoted.
    """
    from backend.serving import registry
    from model.multitask.train import TrainConfig, train

    with sessions() as session:
        run = run_consensus(session)
        session.commit()
        run_id = run.id
        note(f"consensus run {run_id}: {run.n_items} items, {run.n_raters} raters")
        current = registry.promoted(session)
        parent_path = current.path if current is not None else None
        current_provenance = registry.provenance(current) if current is not None else {}
        images = Path(params["images"]) if params.get("images") else None
        log: list[str] = []
        data = build_training_set(session, run_id, settings, images, log)
        for line in log:
            note(line)
    note(f"{len(data.table)} training and {len(data.validation)} validation items")
    if len(data.table) < 4:
        raise ValueError(
            f"only {len(data.table)} training items with consensus and an image: too few to train"
        )
    out = Path(settings.model_dir) / "jobs" / str(job_id)
    config = TrainConfig(
        out=str(out),
        weights=parent_path or params.get("weights"),
        epochs=int(params.get("epochs", settings.train_epochs)),
        batch_size=int(params.get("batch_size", 16)),
        image_size=int(params.get("image_size", 224)),
        max_steps_per_epoch=params.get("max_steps_per_epoch"),
        patience=int(params.get("patience", 3)),
        threads=settings.threads,
        progress=False,
        amp=True,
    )
    if parent_path is not None:
        from model.common.checkpoint import read_checkpoint

        parent_meta = read_checkpoint(parent_path)["meta"]
        config.image_size = int(parent_meta.get("input_size", config.image_size))
        config.output_stride = int(parent_meta.get("output_stride", 32))
        config.width_mult = float(parent_meta.get("width_mult", 1.0))
    result = train(config, data.table, data.targets)
    note(f"trained {result.meta.version} ({len(result.history)} epochs)")
    synthetic = images is not None and is_synthetic(images)
    if len(data.validation):
        probs = validation_probs(result.best, data.validation)
        candidate = validation_loss(result.best, data.validation, data.validation_targets, probs)
        baseline = (
            validation_loss(parent_path, data.validation, data.validation_targets) if parent_path else None
        )
    else:
        probs = np.zeros((0, len(TARGETS)))
        candidate, baseline = {"val_loss": float("nan")}, None
    provenance = project_provenance(data, probs, synthetic, run_id)
    stamp_provenance(result.best, provenance)
    better = baseline is None or (
        not math.isnan(candidate["val_loss"]) and candidate["val_loss"] <= baseline["val_loss"]
    )
    before = baseline["val_loss"] if baseline else None
    note(f"validation loss {candidate['val_loss']:.4f} vs promoted {before}")
    shown = [k for k, v in provenance.items() if v["status"] == Provenance.VALIDATED]
    note(f"validated on this project's consensus: {', '.join(shown) or 'no output'}")
    if current_provenance:
        lost = lost_outputs(current_provenance, provenance)
        if lost:
            better = False
            note(
                f"not promoted: the served model's {', '.join(lost)} would no longer be validated; "
                f"this project's validation split: {_why(provenance, lost)}"
            )
    with sessions() as session:
        version = registry.register(
            session,
            result.best,
            Path(settings.model_dir),
            metrics={"candidate": candidate, "promoted_before": baseline},
            job_id=job_id,
            consensus_run_id=run_id,
        )
        if better:
            registry.promote(session, version)
        else:
            version.status = ModelStatus.REJECTED
        session.commit()
        return version.version, better


def run_job(job_id: int, settings: Settings) -> None:
    """The work of one claimed job (runs in the child process).

    The lesion pair (:func:`backend.training.lesion.retrain_lesion`) is retrained when it is promoted
    and the store holds HAM10000 diagnoses; the BCC model (DermNet) when one is promoted, when the job
    names starting weights, or when the lesion pair is not retrained. The job succeeds when every part
    it ran succeeded.
    """
    import torch

    from backend.serving import registry
    from backend.serving.lesion import LesionHolder
    from consensus.db import init_db

    torch.set_num_threads(settings.threads)
    _, sessions = init_db(settings.database_url)
    log: list[str] = []

    def note(message: str) -> None:
        logger.info("job %d: %s", job_id, message)
        log.append(message)

    with sessions() as session:
        job = session.get(TrainingJob, job_id)
        if job is None or job.status is not JobStatus.RUNNING:
            raise RuntimeError(f"job {job_id} is not running (claim it first)")
        params = dict(job.params)
        job.pid = os.getpid()
        session.commit()
    try:
        with sessions() as session:
            lesion_wanted = LesionHolder(Path(settings.model_dir)).available() and _has_lesion_answers(
                session
            )
            dermnet_wanted = (
                not lesion_wanted or registry.promoted(session) is not None or bool(params.get("weights"))
            )
        version: str | None = None
        promoted = False
        if dermnet_wanted:
            version, promoted = train_dermnet(job_id, settings, sessions, params, note)
        if lesion_wanted:
            from backend.training.lesion import retrain_lesion

            images = Path(params["images"]) if params.get("images") else None
            with sessions() as session:
                outcome = retrain_lesion(
                    session,
                    Path(settings.model_dir),
                    Path(settings.model_dir) / "jobs" / str(job_id) / "lesion",
                    ImageSource(settings, images),
                    is_validation,
                    params,
                    settings.threads,
                    note,
                )
            if not dermnet_wanted:
                version, promoted = outcome.get("version"), bool(outcome.get("version"))
        with sessions() as session:
            job = session.get(TrainingJob, job_id)
            assert job is not None
            job.status = JobStatus.SUCCEEDED
            job.finished_at = utcnow()
            job.version = version
            job.promoted = promoted
            job.log = "\n".join(log)
            session.commit()
        logger.info("job %d: %s %s", job_id, version, "promoted" if promoted else "not promoted")
    except Exception as exc:
        note(traceback.format_exc(limit=5))
        finish(sessions, job_id, JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}", log="\n".join(log))
        raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m backend.training.jobs JOB_ID", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_job(int(args[0]), settings)
    except Exception as exc:
        print(f"training job {args[0]} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
