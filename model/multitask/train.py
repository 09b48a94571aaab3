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
from model.common.checkpoint import Checkpoint, read_checkpoint, read_meta, save_checkpoint
from model.common.data import DermDataset, load_tables, split_sources, table_hash
from model.common.provenance import assess
from model.common.training import (
    BEST,
    EpochLoop,
    LoopSettings,
    Rank,
    TrainResult,
    choose_device,
    run_record,
    seed_everything,
    transforms,
)
from model.multitask.calibrate import calibrate
from model.multitask.network import DermNet, DermNetMeta, build_model

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float32]


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


@contextmanager
def distributed() -> Iterator[Rank]:
    """DDP process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Rank()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield Rank(
            rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0))
        )
    finally:
        dist.destroy_process_group()


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

    with distributed() as rank:
        run = MultitaskTraining(config, table, targets, out, rank)
        return run.fit(run.resumed_best or run.base_meta)


def _loaders(
    config: TrainConfig, train_ds: DermDataset, val_ds: DermDataset, rank: Rank, generator: torch.Generator
) -> tuple[DataLoader[Any], DataLoader[Any], DistributedSampler[Any] | None]:
    """The training loader (sharded by a DistributedSampler under DDP), the validation loader, the sampler."""
    sampler: DistributedSampler[Any] | None = None
    if rank.world > 1:
        sampler = DistributedSampler(train_ds, rank.world, rank.rank, seed=config.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.workers,
        generator=generator,
        drop_last=len(train_ds) > config.batch_size,
    )
    return train_loader, DataLoader(val_ds, batch_size=config.batch_size, num_workers=config.workers), sampler


def _initial_model(config: TrainConfig, resume: Checkpoint[DermNetMeta] | None) -> tuple[DermNet, str | None]:
    """The network to start from (a resumed run's weights replace any initialisation) and its parent."""
    if resume is not None:
        model = DermNet(
            dropout=config.dropout, width_mult=config.width_mult, output_stride=config.output_stride
        )
        model.load_state_dict(resume.state_dict)
        return model, resume.meta.parent
    model = build_model(config.weights, config.dropout, config.width_mult, config.output_stride)
    parent = None
    if config.weights not in (None, "imagenet"):
        parent = read_meta(str(config.weights), DermNetMeta).version
    return model, parent


class MultitaskTraining(EpochLoop):
    """One DermNet run on :class:`~model.common.training.EpochLoop`: masked, positive-weighted BCE (plus
    the localisation loss when ``cam_loss`` is on), validation AUROC per output, calibration of the
    best epoch."""

    logger = logger

    def __init__(
        self, config: TrainConfig, table: pd.DataFrame, targets: pd.DataFrame | None, out: Path, rank: Rank
    ) -> None:
        self.config = config
        device = choose_device(rank)
        generator = seed_everything(config.seed + rank.rank)
        train_idx, val_idx = split_sources(table, config.val_fraction, seed=config.split_seed)
        regions = config.cam_loss > 0
        train_ds = DermDataset(
            table.iloc[train_idx], transforms(config.image_size, True), targets, with_regions=regions
        )
        val_ds = DermDataset(
            table.iloc[val_idx], transforms(config.image_size, False), targets, with_regions=regions
        )
        train_loader, self.val_loader, sampler = _loaders(config, train_ds, val_ds, rank, generator)

        resume = read_checkpoint(config.resume, DermNetMeta) if config.resume else None
        model, parent = _initial_model(config, resume)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        net: torch.nn.Module = model
        if rank.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[rank.local_rank] if device.type == "cuda" else None
            )
        settings = LoopSettings.of(config)
        super().__init__(model, train_loader, out, settings, device, generator, rank, net, sampler)
        self.dermnet = model
        self.pos_weight = positive_weights(train_ds, config.max_pos_weight).to(device)
        self.monitored = (
            "the validation objective"
            if config.select == "objective" or (config.select == "auto" and config.cam_loss > 0)
            else "the validation mean AUROC"
        )
        known = train_ds.target_mask.numpy()
        self.train_known = known.sum(0)
        self.train_positive = ((train_ds.targets.numpy() >= 0.5) * known).sum(0)
        self.synthetic = bool(table["synthetic"].all()) if "synthetic" in table else False
        sources = sorted(table["source"].unique().tolist()) if "source" in table else []
        self.val_description = (
            f"lesion-grouped validation split of {' + '.join(sources) or 'the training table'} "
            f"({len(val_ds)} images, split seed {config.split_seed})"
        )
        self.base_meta = DermNetMeta(
            input_size=config.image_size,
            width_mult=config.width_mult,
            output_stride=config.output_stride,
            dropout=config.dropout,
            data_hash=table_hash(table),
            parent=parent,
            extra=run_record(config, len(train_ds), len(val_ds), sources=sources),
        )
        self.resumed_best: DermNetMeta | None = None
        if resume is not None:
            if resume.optimizer is None or resume.scheduler is None:
                raise ValueError(f"{config.resume} holds no optimizer state: resume from a last.pt")
            self.restore(resume.optimizer, resume.scheduler, resume.state or {})
            logger.info("resuming %s at epoch %d (best %.4f)", config.resume, self.epoch + 1, self.best)
            if (out / BEST).exists():
                self.resumed_best = read_meta(out / BEST, DermNetMeta)
        self._validation: tuple[FloatArray, FloatArray, FloatArray] | None = None

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        images = batch["image"].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.to(memory_format=torch.channels_last)
        target = batch["target"].to(self.device)
        mask = batch["target_mask"].to(self.device)
        with self.autocast():
            logits, features = self.net(images, return_features=True)
        loss = masked_bce(logits.float(), target, mask, self.pos_weight)
        if self.config.cam_loss > 0:
            valid = _valid_regions(batch, target, mask)
            loss = loss + self.config.cam_loss * localisation_loss(
                features.float(), self.dermnet.head_weights(), batch["regions"].to(self.device), valid
            )
        return loss, len(images)

    def validate(self) -> dict[str, float]:
        logits, targets, masks, _, localisation = predict_logits(self.dermnet, self.val_loader, self.device)
        self._validation = (logits, targets, masks)
        metrics = validation_metrics(logits, targets, masks)
        if localisation is not None:
            metrics["val_localisation"] = localisation
            metrics["val_objective"] = metrics["val_loss"] + self.config.cam_loss * localisation
        return metrics

    def monitor(self, row: dict[str, float]) -> float:
        # Select on what is trained: with the localisation loss on, the whole validation objective
        # (AUROC alone kept epochs whose maps were still far from the regions).
        if "val_objective" in row and self.config.select != "auroc":
            return -row["val_objective"]
        if self.config.select == "objective" or math.isnan(row["auroc_mean"]):
            return -row["val_loss"]
        return row["auroc_mean"]

    def describe(self, row: dict[str, float]) -> str:
        localised = f", map outside region {row['val_localisation']:.3f}" if "val_localisation" in row else ""
        return f"val loss {row['val_loss']:.4f}, mean AUROC {row['auroc_mean']:.4f}{localised}"

    def save(self, path: Path, row: dict[str, float], best: bool) -> DermNetMeta:
        if not best:
            meta = dataclasses.replace(self.base_meta, epoch=self.epoch)
            return save_checkpoint(
                path, self.dermnet, meta, self.optimizer, self.scheduler, self.resume_state()
            )
        if self._validation is None:
            raise RuntimeError("best.pt is written after validate(), which keeps the validation logits")
        logits, targets, masks = self._validation
        sensitivity = self.config.target_sensitivity
        temps, thresholds = calibrate(logits, targets, masks, list(TARGETS), sensitivity)
        meta = dataclasses.replace(
            self.base_meta, temperatures=temps, thresholds=thresholds,
            threshold_rule="youden" if sensitivity is None else f"sensitivity>={sensitivity}",
            metrics=dict(row), epoch=self.epoch,
            provenance=assess(
                TARGETS, self.train_known, self.train_positive, targets, masks, logits,
                synthetic=self.synthetic, data=self.val_description,
            ),
        )  # fmt: skip
        return save_checkpoint(path, self.dermnet, meta)
