"""Training DermNet: train_one_epoch -> evaluate -> scheduler -> atomic checkpoint (pytorch/examples style).

- Targets are probabilities, so dermatologist-consensus posteriors train as soft labels; a per-target
  mask leaves out what an image has no label for (HAM10000 has no pattern labels: only the BCC head
  learns from it).
- Loss: binary cross-entropy per output, each output's positives weighted by its negative/positive
  ratio on the training split (capped), averaged over known targets.
- AdamW, linear warm-up then cosine decay per step; early stopping on the validation metric.
- ``best.pt`` holds the best weights with temperatures and thresholds fitted on validation;
  ``last.pt`` holds everything needed to resume (optimizer, scheduler, RNG states, patience).
  Both are written atomically, so killing training at any moment leaves them readable.
- Seeded and reproducible on the CPU; AMP and channels_last on CUDA; under ``torchrun`` it runs DDP
  (gloo on the CPU, nccl on GPUs) without code changes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from numpy.typing import NDArray
from torch.utils.data import DataLoader, DistributedSampler

from labeling_config import TARGETS
from model.common.checkpoint import CheckpointMeta, read_checkpoint, save_checkpoint
from model.common.data import DermDataset, load_tables, split_sources, table_hash
from model.common.provenance import assess
from model.common.training import seed_everything, transforms
from model.multitask.calibrate import calibrate
from model.multitask.network import DermNet, build_model

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float32]
BEST = "best.pt"
LAST = "last.pt"


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoint's ``extra``).

    Attributes:
        data: dataset folder (derm-dev layout).
        out: run folder for ``best.pt``, ``last.pt`` and ``history.csv``.
        weights: ``None``, ``"imagenet"`` or a checkpoint to start from.
        epochs: maximum epochs.
        batch_size: images per step (per process under DDP).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        image_size: square side images are resized to.
        val_fraction: share of lesions for validation.
        split_seed: seed of the lesion-grouped split (keep it fixed across retrainings).
        seed: seed of initialisation, shuffling and augmentation.
        patience: epochs without improvement before stopping.
        threads: ``torch.set_num_threads`` (one is fastest on a busy small machine).
        workers: DataLoader worker processes.
        dropout: dropout before the heads.
        width_mult: MobileNet-V2 width multiplier.
        output_stride: 32 (as published) or 16 (Grad-CAM maps at twice the resolution).
        max_pos_weight: cap of the per-output positive weight.
        cam_loss: weight of the localisation loss (0: off, the published model). For each positive
            target with a reference region (the lesion mask for the diagnosis, the pattern's mask for a
            pattern), it adds one minus the share of that target's Grad-CAM inside the region.
        select: which epoch is ``best.pt``: ``"auroc"`` (mean validation AUROC), ``"objective"`` (the
            validation loss plus the localisation loss) or ``"auto"`` (the objective when ``cam_loss``
            is on, else AUROC).
        target_sensitivity: choose thresholds for this sensitivity instead of Youden's J.
        max_steps_per_epoch: stop each epoch early (smoke tests).
        amp: mixed precision on CUDA.
        progress: show progress bars.
        resume: continue from this ``last.pt``.
    """

    data: str | list[str] | None = None
    out: str = "runs/train"
    weights: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    image_size: int = 224
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    patience: int = 4
    threads: int = 1  # the CLI passes THREADS from the settings
    workers: int = 0
    dropout: float = 0.2
    width_mult: float = 1.0
    output_stride: int = 32
    max_pos_weight: float = 20.0
    cam_loss: float = 0.0
    select: str = "auto"
    target_sensitivity: float | None = None
    max_steps_per_epoch: int | None = None
    amp: bool = True
    progress: bool = True
    resume: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 32 and 1024, got {self.image_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.select not in ("auto", "auroc", "objective"):
            raise ValueError(f"select must be 'auto', 'auroc' or 'objective', got {self.select!r}")


@dataclass
class TrainResult:
    """What a run produced."""

    best: Path
    last: Path
    meta: CheckpointMeta
    history: list[dict[str, float]]
    stopped_early: bool


def masked_bce(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor
) -> torch.Tensor:
    """Mean binary cross-entropy over the known targets, positives weighted per output."""
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def localisation_loss(
    features: torch.Tensor,
    head_weights: torch.Tensor,
    regions: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Mean over valid (image, target) pairs of 1 - (share of the target's Grad-CAM inside its region).

    The map is the closed-form Grad-CAM of a pooled linear head, ``ReLU(W_k . A)`` (see
    :mod:`model.common.explain`), so the loss is differentiable and costs one contraction.

    Args:
        features: ``(B, C, h, w)`` last feature map.
        head_weights: ``(K, C)`` stacked head weights.
        regions: ``(B, K, H, W)`` reference regions in [0, 1] at input size.
        valid: ``(B, K)``; 1 where the pair counts (positive target with a non-empty region).
    """
    cam = torch.relu(torch.einsum("kc,bchw->bkhw", head_weights, features))
    cell = (int(cam.shape[-2]), int(cam.shape[-1]))
    cover = F.adaptive_avg_pool2d(regions, cell)  # share of each feature cell inside the region
    share = (cam * cover).sum(dim=(2, 3)) / (cam.sum(dim=(2, 3)) + 1e-6)
    return ((1.0 - share) * valid).sum() / valid.sum().clamp_min(1.0)


def positive_weights(dataset: DermDataset, cap: float) -> torch.Tensor:
    """Per-output negative / positive ratio of the training targets, between 1 and ``cap``."""
    known = dataset.target_mask
    pos = (dataset.targets * known).sum(0)
    neg = ((1 - dataset.targets) * known).sum(0)
    return (neg / pos.clamp_min(1.0)).clamp(1.0, cap)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed() -> Iterator[_Dist]:
    """DDP process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield _Dist()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield _Dist(
            rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0))
        )
    finally:
        dist.destroy_process_group()


def _device(ctx: _Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def _valid_regions(batch: dict[str, Any], target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(image, target) pairs the localisation loss counts: positive, known, with a non-empty region."""
    regions = batch["regions"]
    known = batch["region_known"].to(target.device) * (regions.flatten(2).amax(dim=2) > 0).to(target.device)
    valid: torch.Tensor = (target >= 0.5) * mask * known
    return valid


@torch.no_grad()
def predict_logits(
    model: DermNet, loader: DataLoader[Any], device: torch.device
) -> tuple[FloatArray, FloatArray, FloatArray, list[str], float | None]:
    """Logits, targets, masks and ids over a loader, in eval mode, and the mean localisation loss
    when the loader's dataset returns regions (else None)."""
    model.eval()
    logits, targets, masks, ids = [], [], [], []
    loc_sum, loc_count = 0.0, 0.0
    for batch in loader:
        images = batch["image"].to(device)
        if device.type == "cuda":
            images = images.to(memory_format=torch.channels_last)
        out, features = model(images, return_features=True)
        if "regions" in batch:
            valid = _valid_regions(batch, batch["target"].to(device), batch["target_mask"].to(device))
            count = float(valid.sum())
            if count:
                loss = localisation_loss(
                    features.float(), model.head_weights(), batch["regions"].to(device), valid
                )
                loc_sum += float(loss) * count
                loc_count += count
        logits.append(out.float().cpu())
        targets.append(batch["target"])
        masks.append(batch["target_mask"])
        ids.extend(batch["image_id"])
    localisation = loc_sum / loc_count if loc_count else None
    return torch.cat(logits).numpy(), torch.cat(targets).numpy(), torch.cat(masks).numpy(), ids, localisation


def validation_metrics(logits: FloatArray, targets: FloatArray, masks: FloatArray) -> dict[str, float]:
    """Per-output AUROC (where both classes occur), their mean, and the masked BCE."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float] = {}
    aurocs = []
    for k, name in enumerate(TARGETS):
        rows = masks[:, k] > 0
        y = targets[rows, k] >= 0.5
        if rows.sum() and 0 < y.sum() < rows.sum():
            auc = float(roc_auc_score(y, logits[rows, k]))
            out[f"auroc_{name}"] = auc
            aurocs.append(auc)
    out["auroc_mean"] = float(np.mean(aurocs)) if aurocs else float("nan")
    t = torch.from_numpy
    loss = masked_bce(t(logits), t(targets), t(masks), torch.ones(logits.shape[1]))
    out["val_loss"] = float(loss)
    return out


def train(
    config: TrainConfig,
    table: pd.DataFrame | None = None,
    targets: pd.DataFrame | None = None,
) -> TrainResult:
    """Train, validate, calibrate and checkpoint.

    Args:
        config: the run's settings.
        table: rows from :func:`model.common.data.load_table` (default: read ``config.data``).
        targets: soft targets (index ``image_id``, columns in ``TARGETS``) overriding the table's,
            e.g. the consensus posteriors.

    Returns:
        Paths of ``best.pt`` and ``last.pt``, the best checkpoint's metadata and the history.
    """
    torch.set_num_threads(config.threads)
    if table is None:
        if config.data is None:
            raise ValueError("give a dataset folder (config.data) or a table")
        table = load_tables([config.data] if isinstance(config.data, str) else config.data)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    with distributed() as ctx:
        return _train(config, table, targets, out, ctx)


def _train(
    config: TrainConfig, table: pd.DataFrame, targets: pd.DataFrame | None, out: Path, ctx: _Dist
) -> TrainResult:
    from tqdm import tqdm

    device = _device(ctx)
    generator = seed_everything(config.seed + ctx.rank)
    train_idx, val_idx = split_sources(table, config.val_fraction, seed=config.split_seed)
    train_ds = DermDataset(
        table.iloc[train_idx], transforms(config.image_size, True), targets, with_regions=config.cam_loss > 0
    )
    val_ds = DermDataset(
        table.iloc[val_idx], transforms(config.image_size, False), targets, with_regions=config.cam_loss > 0
    )
    sampler: DistributedSampler[dict[str, Any]] | None = None
    if ctx.world > 1:
        sampler = DistributedSampler(train_ds, ctx.world, ctx.rank, seed=config.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.workers,
        generator=generator,
        drop_last=len(train_ds) > config.batch_size,
    )
    val_loader = DataLoader(val_ds, batch_size=config.batch_size, num_workers=config.workers)

    resume = read_checkpoint(config.resume) if config.resume else None
    parent = None
    if resume is not None:  # the checkpoint's weights replace any initialisation
        model = DermNet(
            dropout=config.dropout, width_mult=config.width_mult, output_stride=config.output_stride
        )
        model.load_state_dict(resume["state_dict"])
        parent = resume["meta"].get("parent")
    else:
        model = build_model(config.weights, config.dropout, config.width_mult, config.output_stride)
        if config.weights not in (None, "imagenet"):
            parent = read_checkpoint(str(config.weights))["meta"]["version"]
    model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None)

    steps_per_epoch = (
        len(train_loader)
        if config.max_steps_per_epoch is None
        else min(len(train_loader), config.max_steps_per_epoch)
    )
    total_steps = max(1, steps_per_epoch * config.epochs)
    warmup = min(config.warmup_steps, total_steps // 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and config.amp)
    pos_weight = positive_weights(train_ds, config.max_pos_weight).to(device)

    start_epoch, best_metric, bad_epochs = 0, -math.inf, 0
    history: list[dict[str, float]] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state = resume.get("state", {})
        start_epoch = int(state.get("epoch", 0))
        best_metric = float(state.get("best_metric", -math.inf))
        bad_epochs = int(state.get("bad_epochs", 0))
        history = list(state.get("history", []))
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        logger.info("resuming %s at epoch %d (best %.4f)", config.resume, start_epoch + 1, best_metric)

    data_hash = table_hash(table)
    known = train_ds.target_mask.numpy()
    train_known = known.sum(0)
    train_positive = ((train_ds.targets.numpy() >= 0.5) * known).sum(0)
    synthetic = bool(table["synthetic"].all()) if "synthetic" in table else False
    sources = sorted(table["source"].unique().tolist()) if "source" in table else []
    val_description = (
        f"lesion-grouped validation split of {' + '.join(sources) or 'the training table'} "
        f"({len(val_ds)} images, split seed {config.split_seed})"
    )
    base_meta = CheckpointMeta(
        input_size=config.image_size,
        width_mult=config.width_mult,
        output_stride=config.output_stride,
        dropout=config.dropout,
        data_hash=data_hash,
        parent=parent,
        extra={
            "train_config": dataclasses.asdict(config),
            "n_train": len(train_ds),
            "n_val": len(val_ds),
            "sources": sources,
        },
    )
    best_meta = (
        CheckpointMeta.from_dict(read_checkpoint(out / BEST)["meta"])
        if (out / BEST).exists() and resume
        else base_meta
    )
    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        started, running, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(
            train_loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
            disable=not (config.progress and ctx.main), leave=False,
        )  # fmt: skip
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            images = batch["image"].to(device, non_blocking=True)
            if cuda:
                images = images.to(memory_format=torch.channels_last)
            target = batch["target"].to(device)
            mask = batch["target_mask"].to(device)
            with torch.autocast(device_type=device.type, enabled=cuda and config.amp):
                logits, features = net(images, return_features=True)
            loss = masked_bce(logits.float(), target, mask, pos_weight)
            if config.cam_loss > 0:
                valid = _valid_regions(batch, target, mask)
                loss = loss + config.cam_loss * localisation_loss(
                    features.float(), model.head_weights(), batch["regions"].to(device), valid
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running += loss.item() * len(images)
            seen += len(images)
            bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()

        if ctx.world > 1:
            dist.barrier()
        if ctx.main:
            logits_v, targets_v, masks_v, _, localisation = predict_logits(model, val_loader, device)
            metrics = validation_metrics(logits_v, targets_v, masks_v)
            if localisation is not None:
                metrics["val_localisation"] = localisation
                metrics["val_objective"] = metrics["val_loss"] + config.cam_loss * localisation
            metrics.update(
                epoch=epoch + 1, train_loss=running / max(1, seen), seconds=time.perf_counter() - started
            )
            history.append(metrics)
            # Select on what is trained: with the localisation loss on, the whole validation objective
            # (AUROC alone kept epochs whose maps were still far from the regions).
            if "val_objective" in metrics and config.select != "auroc":
                monitor = -metrics["val_objective"]
            elif config.select == "objective" or math.isnan(metrics["auroc_mean"]):
                monitor = -metrics["val_loss"]
            else:
                monitor = metrics["auroc_mean"]
            improved = monitor > best_metric + 1e-4
            localised = f", map outside region {localisation:.3f}" if localisation is not None else ""
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, mean AUROC %.4f%s%s (%.0f s)",
                epoch + 1, config.epochs, metrics["train_loss"], metrics["val_loss"], metrics["auroc_mean"],
                localised, " (best)" if improved else "", metrics["seconds"],
            )  # fmt: skip
            if improved:
                best_metric, bad_epochs = monitor, 0
                temps, thresholds = calibrate(
                    logits_v, targets_v, masks_v, list(TARGETS), config.target_sensitivity
                )
                rule = (
                    "youden"
                    if config.target_sensitivity is None
                    else f"sensitivity>={config.target_sensitivity}"
                )
                best_meta = dataclasses.replace(
                    base_meta, temperatures=temps, thresholds=thresholds, threshold_rule=rule,
                    metrics=dict(metrics), epoch=epoch + 1,
                    provenance=assess(
                        TARGETS, train_known, train_positive, targets_v, masks_v, logits_v,
                        synthetic=synthetic, data=val_description,
                    ),
                )  # fmt: skip
                best_meta = save_checkpoint(out / BEST, model, best_meta)
            else:
                bad_epochs += 1
            state = {
                "epoch": epoch + 1,
                "best_metric": best_metric,
                "bad_epochs": bad_epochs,
                "history": history,
                "torch_rng": torch.get_rng_state(),
                "loader_rng": generator.get_state(),
            }
            save_checkpoint(
                out / LAST,
                model,
                dataclasses.replace(base_meta, epoch=epoch + 1),
                optimizer,
                scheduler,
                state,
            )
            pd.DataFrame(history).to_csv(out / "history.csv", index=False)
        stop = torch.tensor([int(ctx.main and bad_epochs >= config.patience)])
        if ctx.world > 1:
            dist.broadcast(stop, src=0)
        if bool(stop.item()):
            logger.info("early stopping: no improvement for %d epochs", config.patience)
            stopped_early = True
            break

    return TrainResult(
        best=out / BEST, last=out / LAST, meta=best_meta, history=history, stopped_early=stopped_early
    )
