"""The work of a retraining job (run in its child process, :mod:`backend.training.jobs`).

The child re-runs the consensus, builds a training set of the items with consensus and an image
(:mod:`backend.training.training_set`, the fixed validation split kept apart), trains on the consensus
posteriors as soft targets from the promoted model, scores the candidate and the promoted model on the
validation split (probabilities only: no Grad-CAM), and promotes the candidate only if its validation
loss (binary cross-entropy against the consensus posteriors, the proper scoring rule that is defined on
any split) is not worse and it loses no validated output. Either way the version is recorded in
``model_versions``. The lesion pair is retrained by :mod:`backend.training.lesion` in the same job.

Every trigger (Label Studio's Train button, the update policy, ``dermassist train --from-db``) queues
the same job with the same defaults (:data:`DEFAULTS`; ``epochs``: ``TRAIN_EPOCHS``); a job's ``params``
override them, every other figure comes from :class:`backend.settings.Settings`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from backend.label_studio.brush import decode_region
from backend.settings import Settings
from backend.training.jobs import finish
from backend.training.training_set import ImageSource, TrainingSet, build_training_set, is_validation
from consensus.models import Annotation, JobStatus, ModelStatus, TrainingJob, utcnow
from consensus.service import run_consensus
from labeling_config import TARGETS
from model.common.data import is_synthetic
from model.common.provenance import Provenance

logger = logging.getLogger(__name__)

#: The BCC model's training defaults for every job, whatever queued it; a job's ``params`` override them.
DEFAULTS: dict[str, Any] = {"batch_size": 16, "image_size": 224, "patience": 3, "max_steps_per_epoch": None}


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
    from model.common.checkpoint import update_meta

    update_meta(checkpoint, provenance=provenance)


def _why(provenance: dict[str, dict[str, Any]], keys: list[str]) -> str:
    return "; ".join(
        f"{k} has {provenance.get(k, {}).get('n_positive', 0)} positives "
        f"({provenance.get(k, {}).get('note') or provenance.get(k, {}).get('status')})"
        for k in keys
    )


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
        run = run_consensus(session, decode=decode_region)
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
    job = {**DEFAULTS, **params}
    config = TrainConfig(
        out=str(out),
        weights=parent_path or params.get("weights"),
        epochs=int(params.get("epochs", settings.train_epochs)),
        batch_size=int(job["batch_size"]),
        image_size=int(job["image_size"]),
        max_steps_per_epoch=job["max_steps_per_epoch"],
        patience=int(job["patience"]),
        threads=settings.threads,
        progress=False,
        amp=True,
    )
    if parent_path is not None:
        from model.common.checkpoint import read_meta
        from model.multitask.network import DermNetMeta

        parent_meta = read_meta(parent_path, DermNetMeta)
        config.image_size = parent_meta.input_size
        config.output_stride = parent_meta.output_stride
        config.width_mult = parent_meta.width_mult
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
            lesion_wanted = registry.promoted(session, registry.LESION) is not None and _has_lesion_answers(
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
        print("usage: python -m backend.training.retrain JOB_ID", file=sys.stderr)
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
    raise SystemExit(main())
