"""Training SegNet, the lesion segmenter of Atiq & Fattah (arXiv:2510.17773).

Training runs on the shared skeleton (:class:`model.common.training.EpochLoop`), as DermNet's does: the
same lesion-grouped split (``split_by_lesion`` with ``split_seed``, on the rows that have a lesion mask),
the same joint image-and-mask augmentation (:func:`model.common.training.transforms`: mild crop, flips,
90-degree turns, colour jitter on the image only), AdamW with linear warm-up then cosine decay per step,
early stopping, and ``best.pt`` / ``last.pt`` written atomically plus ``history.csv``. The loss is
:func:`model.lesion.masks.dice_bce_loss`; epochs are selected by the mean validation Dice at the
training size (threshold 0.5). Evaluation at each image's own size is :mod:`model.lesion.evaluate_seg`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from model.common.checkpoint import read_meta
from model.common.data import DataError, DermDataset, load_table, split_by_lesion, table_hash
from model.common.training import (
    EpochLoop,
    LoopSettings,
    TrainResult,
    choose_device,
    run_record,
    seed_everything,
    transforms,
)
from model.lesion.masks import dice, dice_bce_loss, iou
from model.lesion.segmentation import THRESHOLD_RULE, SegMeta, build_segnet, save_segnet
from model.lesion.unet import SegNet

logger = logging.getLogger(__name__)


@dataclass
class SegTrainConfig:
    """Everything a segmentation run depends on (stored in the checkpoint's ``extra``).

    Attributes:
        data: dataset folder (derm-dev layout); rows without a lesion mask are skipped.
        out: run folder for ``best.pt``, ``last.pt`` and ``history.csv``.
        weights: ``None``, ``"imagenet"`` (encoder only) or a segmentation checkpoint to start from.
        encoder: encoder name (``mobilenet_v2``, ``efficientnet_b3``, ``resnet34``).
        width_mult: MobileNet-V2 width multiplier.
        epochs: maximum epochs.
        batch_size: images per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        image_size: square side images and masks are resized to.
        val_fraction: share of lesions for validation.
        split_seed: seed of the lesion-grouped split (as ``TrainConfig.split_seed``).
        stratify: the column the split keeps the proportions of: ``"bcc"`` (as DermNet's split) or
            ``"dx"`` (the dual-encoder's, so that a U-Net and a classifier validate on the same images).
        seed: seed of initialisation, shuffling and augmentation.
        patience: epochs without a better validation Dice before stopping.
        threads: ``torch.set_num_threads``.
        workers: DataLoader worker processes.
        max_steps_per_epoch: stop each epoch early (smoke tests).
        amp: mixed precision on CUDA.
        progress: show progress bars.
    """

    data: str | None = None
    out: str = "runs/segment"
    weights: str | None = None
    encoder: str = "mobilenet_v2"
    width_mult: float = 1.0
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    image_size: int = 192
    val_fraction: float = 0.2
    split_seed: int = 0
    stratify: str = "bcc"
    seed: int = 0
    patience: int = 6
    threads: int = 1  # the CLI passes THREADS from the settings
    workers: int = 0
    max_steps_per_epoch: int | None = None
    amp: bool = True
    progress: bool = True

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
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")


SegTrainResult = TrainResult  # what a run produced (the name callers know)


def rows_with_masks(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that have a lesion mask, logging how many were skipped.

    Raises:
        DataError: fewer than two rows have a mask.
    """
    has_mask = table["mask_path"].notna()
    skipped = table.loc[~has_mask, "image_id"].tolist()
    if skipped:
        logger.info(
            "skipping %d of %d rows without a lesion mask (e.g. %s)", len(skipped), len(table), skipped[:3]
        )
    kept = table.loc[has_mask].reset_index(drop=True)
    if len(kept) < 2:
        raise DataError(f"only {len(kept)} row(s) have a lesion mask; segmentation needs at least two")
    return kept


@torch.no_grad()
def validate(model: SegNet, loader: DataLoader[Any], device: torch.device) -> dict[str, float]:
    """Mean loss, Dice and IoU (threshold 0.5) over a loader at the size it yields, in eval mode."""
    model.eval()
    losses, dices, ious = [], [], []
    for batch in loader:
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        logits = model(images).float()
        losses.append(float(dice_bce_loss(logits, masks)) * len(images))
        pred = (logits >= 0).cpu().numpy()
        ref = masks.cpu().numpy()
        for p, t in zip(pred, ref, strict=True):
            dices.append(dice(p, t))
            ious.append(iou(p, t))
    n = max(1, len(dices))
    return {"val_loss": sum(losses) / n, "val_dice": float(np.mean(dices)), "val_iou": float(np.mean(ious))}


def train_seg(config: SegTrainConfig, table: pd.DataFrame | None = None) -> SegTrainResult:
    """Train SegNet, validate each epoch, keep the best by validation Dice.

    Args:
        config: the run's settings.
        table: rows from :func:`model.common.data.load_table` (default: read ``config.data``).

    Returns:
        Paths of ``best.pt`` and ``last.pt``, the best checkpoint's metadata and the history.

    Raises:
        ValueError: neither ``config.data`` nor a table, or too few lesions to split.
        DataError: fewer than two rows with a lesion mask.
    """
    torch.set_num_threads(config.threads)
    if table is None:
        if config.data is None:
            raise ValueError("give a dataset folder (config.data) or a table")
        table = load_table(config.data)
    table = rows_with_masks(table)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run = SegTraining(config, table, out)
    return run.fit(run.base_meta)


class SegTraining(EpochLoop):
    """One SegNet run on :class:`~model.common.training.EpochLoop`: Dice + BCE loss, best epoch by the
    mean validation Dice."""

    label = "seg epoch"
    logger = logger
    monitored = "validation Dice"

    def __init__(self, config: SegTrainConfig, table: pd.DataFrame, out: Path) -> None:
        device = choose_device()
        generator = seed_everything(config.seed)
        train_idx, val_idx = split_by_lesion(
            table, config.val_fraction, seed=config.split_seed, stratify=config.stratify
        )
        train_ds = DermDataset(table.iloc[train_idx], transforms(config.image_size, True), with_mask=True)
        val_ds = DermDataset(table.iloc[val_idx], transforms(config.image_size, False), with_mask=True)
        train_loader = DataLoader(
            train_ds,
            batch_size=config.batch_size,
            shuffle=True,
            num_workers=config.workers,
            generator=generator,
            drop_last=len(train_ds) > config.batch_size,
        )
        self.val_loader = DataLoader(val_ds, batch_size=config.batch_size, num_workers=config.workers)
        model = build_segnet(config.weights, config.width_mult, config.encoder, config.image_size)
        parent = None
        if config.weights not in (None, "imagenet"):
            parent = read_meta(str(config.weights), SegMeta).version
        model.to(device)
        settings = LoopSettings.of(config)
        super().__init__(model, train_loader, out, settings, device, generator)
        self.segnet = model
        self.base_meta = SegMeta(
            data_hash=table_hash(table),
            parent=parent,
            extra=run_record(
                config,
                len(train_ds),
                len(val_ds),
                threshold_rule=THRESHOLD_RULE,
                synthetic=bool(table["synthetic"].all()) if "synthetic" in table else False,
            ),
        )

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        images = batch["image"].to(self.device, non_blocking=True)
        masks = batch["mask"].to(self.device)
        with self.autocast():
            logits = self.segnet(images)
        return dice_bce_loss(logits.float(), masks), len(images)

    def validate(self) -> dict[str, float]:
        return validate(self.segnet, self.val_loader, self.device)

    def monitor(self, row: dict[str, float]) -> float:
        return row["val_dice"]

    def describe(self, row: dict[str, float]) -> str:
        return f"val loss {row['val_loss']:.4f}, val Dice {row['val_dice']:.4f}, IoU {row['val_iou']:.4f}"

    def save(self, path: Path, row: dict[str, float], best: bool) -> SegMeta:
        meta = dataclasses.replace(self.base_meta, metrics=dict(row), epoch=self.epoch)
        if best:
            return save_segnet(path, self.segnet, meta)
        return save_segnet(path, self.segnet, meta, self.optimizer, self.scheduler, self.resume_state())


__all__ = ["SegTrainConfig", "SegTrainResult", "SegTraining", "rows_with_masks", "train_seg", "validate"]
