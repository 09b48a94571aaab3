"""Training and evaluation: ``train`` (a folder, or ``--from-db``: a job on the store's consensus),
``evaluate``, and the second system's ``train-seg`` / ``evaluate-seg`` / ``train-dual`` /
``evaluate-dual``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from backend.cli.common import _given, _settings

logger = logging.getLogger("dermassist")


def _train_from_db(args: argparse.Namespace) -> int:
    from backend.training import jobs
    from consensus.db import init_db

    settings = _settings(args)
    _, sessions = init_db(settings.database_url)
    # Only what was asked for: the rest are the job's own defaults, the same whatever triggers it.
    params: dict[str, object] = dict(_given(args, "epochs", "batch_size", "image_size", "patience"))
    if args.images:
        params["images"] = str(Path(args.images).resolve())
    if args.weights:
        params["weights"] = args.weights
    job, created = jobs.request_training(sessions, "cli", params)
    if not created:
        print(f"a training job is already queued (job {job.id}); this request joined it")
    status = jobs.supervise(settings, job.id, sessions)
    with sessions() as session:
        from consensus.models import TrainingJob

        row = session.get(TrainingJob, job.id)
        assert row is not None
        if status.value != "succeeded":
            print(f"training job {job.id} {status.value}: {row.error}", file=sys.stderr)
            return 1
        outcome = "promoted" if row.promoted else "not promoted (worse than the served model)"
        print(f"training job {job.id}: {row.version} {outcome}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the MobileNet-V2 multitask model (BCC + seven patterns) on a dataset folder, or (--from-db)
    run a retraining job on the store's consensus, promoted only if not worse."""
    from model.multitask.train import TrainConfig, train

    if args.from_db:
        return _train_from_db(args)
    if not args.data:
        raise ValueError("give a dataset folder, or --from-db to train on the store's consensus")
    config = TrainConfig(
        data=args.data[0] if len(args.data) == 1 else list(args.data),
        out=args.out,
        weights=args.weights,
        **{
            k: getattr(args, k)
            for k in ("epochs", "batch_size", "image_size", "patience")
            if getattr(args, k)
        },
        lr=args.lr,
        output_stride=args.output_stride,
        cam_loss=args.cam_loss,
        select=args.select,
        val_fraction=args.val_fraction,
        seed=args.seed,
        threads=args.threads,
        workers=args.workers,
        target_sensitivity=args.target_sensitivity,
        progress=not args.quiet,
        resume=args.resume,
    )
    result = train(config)
    metrics = result.meta.metrics
    mean_auroc, bcc_auroc = metrics.get("auroc_mean", float("nan")), metrics.get("auroc_bcc", float("nan"))
    print(
        f"trained {result.meta.version}: validation mean AUROC {mean_auroc:.4f}, "
        f"BCC AUROC {bcc_auroc:.4f} (epoch {result.meta.epoch}) -> {result.best}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint: metrics.json, predictions.csv and report.html with plots."""
    from model.multitask.evaluate import evaluate

    metrics = evaluate(
        args.checkpoint,
        args.data,
        args.out,
        split=args.split,
        n_boot=args.bootstrap,
        cam_method=args.cam_method,
    )
    bcc = metrics["classification"]["bcc"]
    auroc = bcc["auroc"]
    print(
        f"{metrics['model_version']} on {metrics['classification']['n_images']} images ({metrics['split']}): "
        f"BCC AUROC {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}], "
        f"sensitivity {bcc['recall']['value']:.3f}, specificity {bcc['specificity']['value']:.3f}; "
        f"95% intervals: {metrics['bootstrap']['text']} -> {Path(args.out) / 'report.html'}"
    )
    return 0


def cmd_train_seg(args: argparse.Namespace) -> int:
    """Train the lesion segmentation U-Net (dual attention gates, ASPP) on a folder with lesion masks."""
    from model.lesion.train_seg import SegTrainConfig, train_seg

    result = train_seg(
        SegTrainConfig(
            data=args.data,
            out=args.out,
            weights=args.weights,
            encoder=args.encoder,
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.image_size,
            patience=args.patience,
            threads=args.threads,
            stratify=args.stratify,
            progress=not args.quiet,
        )
    )
    dice = result.meta.metrics.get("val_dice", float("nan"))
    print(f"trained {result.meta.version}: validation Dice {dice:.4f} -> {result.best}")
    return 0


def cmd_evaluate_seg(args: argparse.Namespace) -> int:
    """Dice, IoU and boundary F-score (bootstrap intervals) of a segmentation checkpoint, with a gallery."""
    from model.lesion.evaluate_seg import evaluate_seg

    found = evaluate_seg(args.checkpoint, args.data, args.out, split=args.split)
    parts = [
        f"{k} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
        for k, v in found.items()
        if isinstance(v, dict) and "mean" in v
    ]
    print(f"{'; '.join(parts)} ({found['bootstrap']['text']}) -> {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_train_dual(args: argparse.Namespace) -> int:
    """Train the dual-encoder classifier (image + lesion + metadata; HAM10000 diagnoses and BCC)."""
    from model.lesion.train_dual import DualConfig, train_dual

    result = train_dual(
        DualConfig(
            data=args.data,
            out=args.out,
            weights=args.weights,
            backbone=args.backbone,
            use_lesion=not args.no_lesion,
            use_metadata=not args.no_metadata,
            image_size=args.image_size,
            lesion_size=args.lesion_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            patience=args.patience,
            threads=args.threads,
            progress=not args.quiet,
        )
    )
    found = result["metrics"]
    nan = float("nan")
    balanced, macro = found.get("balanced_accuracy", nan), found.get("auroc_macro", nan)
    print(
        f"trained in {result['seconds'] / 60:.1f} min: validation balanced accuracy {balanced:.4f}, "
        f"macro AUROC {macro:.4f}, BCC AUROC {found['auroc_bcc']:.4f} -> {result['best']}"
    )
    return 0


def cmd_evaluate_dual(args: argparse.Namespace) -> int:
    """Diagnosis metrics (bootstrap intervals) and Grad-CAM energy in the lesion, of a dual-encoder model."""
    import torch

    from model.lesion.evaluate_dual import evaluate_dual

    torch.set_num_threads(args.threads)
    found = evaluate_dual(args.checkpoint, args.data, args.out, split=args.split, segnet=args.segnet)
    cam = found["gradcam_predicted_class"]

    def fmt(entry: Any) -> str:
        return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]" if entry else "n/a"

    print(
        f"{found['n']} images: balanced accuracy {fmt(found.get('balanced_accuracy'))}, macro AUROC "
        f"{fmt(found.get('auroc_macro'))}, BCC AUROC {fmt(found.get('auroc_bcc'))}; Grad-CAM energy inside "
        f"the lesion {fmt(cam.get('energy_inside'))} (lesion area {fmt(cam.get('area'))}); 95% intervals: "
        f"{found['bootstrap']['text']} -> {args.out}"
    )
    return 0
