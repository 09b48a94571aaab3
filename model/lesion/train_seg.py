"""Training and evaluating SegNet, the lesion segmenter of Atiq & Fattah (arXiv:2510.17773).

Training runs on the shared skeleton (:class:`model.common.training.EpochLoop`), as DermNet's does: the
same lesion-grouped split (``split_by_lesion`` with ``split_seed``, on the rows that have a lesion mask),
the same joint image-and-mask augmentation (:func:`model.common.training.transforms`: mild crop, flips,
90-degree turns, colour jitter on the image only), AdamW with linear warm-up then cosine decay per step,
early stopping, and ``best.pt`` / ``last.pt`` written atomically plus ``history.csv``. The loss is
:func:`model.lesion.segmentation.dice_bce_loss`; epochs are selected by the mean validation Dice at the
training size (threshold 0.5).

:func:`evaluate_seg` measures a checkpoint at each image's own resolution: the logits are upsampled
bilinearly to the image's size and a pixel is lesion where the probability is at least 0.5. It writes
``metrics.json`` (Dice, IoU and boundary F, each the mean over images with a 95% bootstrap interval),
``per_image.csv`` and ``gallery.png`` (best and worst cases by Dice, predicted contour over the
reference contour).
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
import torch.nn.functional as F
from numpy.typing import NDArray
from torch.utils.data import DataLoader

from model.common.checkpoint import read_meta
from model.common.data import DataError, DermDataset, load_table, split_by_lesion, table_hash
from model.common.files import write_json
from model.common.metrics import bootstrap_means
from model.common.training import (
    EpochLoop,
    LoopSettings,
    TrainResult,
    choose_device,
    run_record,
    seed_everything,
    transforms,
)
from model.lesion.segmentation import (
    SegMeta,
    SegNet,
    boundary_f_score,
    build_segnet,
    dice,
    dice_bce_loss,
    iou,
    load_segnet,
    save_segnet,
)

logger = logging.getLogger(__name__)

THRESHOLD = 0.5
THRESHOLD_RULE = (
    "logits are upsampled bilinearly to the image's own size; a pixel is lesion where sigmoid(logit) >= 0.5"
)
Array = NDArray[Any]


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


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def _read(path: str, mode: str) -> Array:
    from PIL import Image

    with Image.open(path) as img:
        array: Array = np.array(img.convert(mode), dtype=np.uint8)
    return array


@torch.no_grad()
def predict_masks(
    model: SegNet, images: list[Array], input_size: int, threshold: float = THRESHOLD
) -> list[Array]:
    """Binary masks at each image's own size: resize to ``input_size``, predict, upsample the logits."""
    model.eval()
    resize = transforms(input_size, train=False)
    device = next(model.parameters()).device
    masks = []
    for array in images:
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        logits = model(resize(image)[None].to(device)).float()
        logits = F.interpolate(logits, size=array.shape[:2], mode="bilinear", align_corners=False)
        masks.append((torch.sigmoid(logits)[0, 0] >= threshold).cpu().numpy())
    return masks


def predict_row_masks(model: SegNet, meta: SegMeta, rows: pd.DataFrame) -> list[Array]:
    """The mask of each table row's image at the image's own size, with the checkpoint's threshold."""
    return [
        predict_masks(model, [_read(path, "RGB")], meta.input_size, meta.threshold)[0]
        for path in rows["image_path"]
    ]


def _gallery(path: Path, cases: list[tuple[str, Array, Array, Array, float]], n: int) -> None:
    """Best and worst cases by Dice: the image with the reference (green) and predicted (magenta) contours."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ranked = sorted(cases, key=lambda c: -c[4])
    rows = [("best", ranked[:n]), ("worst", ranked[::-1][:n])] if len(ranked) > 2 * n else [("", ranked)]
    cols = max(len(r) for _, r in rows)
    fig = Figure(figsize=(2.6 * cols, 2.8 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, row) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            image_id, image, ref, pred, d = row[c]
            ax.imshow(image)
            for mask, colour in ((ref, "#00e000"), (pred, "#ff00ff")):
                if mask.any() and not mask.all():  # contour() warns on a constant mask
                    ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_title(f"{label + ': ' if label else ''}{image_id}\nDice {d:.3f}", fontsize=8)
    fig.legend(
        handles=[
            Line2D([], [], color="#00e000", label="reference"),
            Line2D([], [], color="#ff00ff", label="predicted"),
        ],
        loc="lower center",
        ncol=2,
        fontsize=8,
    )
    fig.savefig(path)


def evaluate_seg(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "val",
    tolerance_px: int = 2,
    n_boot: int = 1000,
    seed: int = 0,
    gallery_size: int = 4,
) -> dict[str, Any]:
    """Evaluate a segmentation checkpoint at each image's own resolution.

    Args:
        checkpoint: a ``best.pt`` of :func:`train_seg`.
        data: dataset folder (derm-dev layout; rows without a mask are skipped).
        out: folder for ``metrics.json``, ``per_image.csv`` and ``gallery.png``.
        split: ``"val"`` (the validation rows of the checkpoint's own split: same mask filter,
            ``val_fraction`` and ``split_seed``) or ``"all"``.
        tolerance_px: boundary F tolerance.
        n_boot: bootstrap replicates.
        seed: bootstrap seed.
        gallery_size: best and worst cases shown.

    Returns:
        The content of ``metrics.json``.

    Raises:
        ValueError: an unknown ``split``.
    """
    if split not in ("val", "all"):
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    model, meta = load_segnet(checkpoint)
    table = rows_with_masks(load_table(data))
    data_hash = table_hash(table)
    if meta.data_hash and data_hash != meta.data_hash:
        logger.warning(
            "the data differ from those %s was trained on: the validation split may differ", checkpoint
        )
    if split == "val":
        cfg = meta.extra.get("train_config", {})
        _, rows = split_by_lesion(
            table,
            float(cfg.get("val_fraction", 0.2)),
            seed=int(cfg.get("split_seed", 0)),
            stratify=str(cfg.get("stratify", "bcc")),
        )
        table = table.iloc[rows].reset_index(drop=True)

    cases: list[tuple[str, Array, Array, Array, float]] = []
    per_image: list[dict[str, Any]] = []
    for row in table.to_dict("records"):
        image = _read(row["image_path"], "RGB")
        ref = _read(row["mask_path"], "L") > 127
        if ref.shape != image.shape[:2]:
            raise DataError(f"mask {row['mask_path']} is {ref.shape[::-1]}, its image {image.shape[1::-1]}")
        (pred,) = predict_masks(model, [image], meta.input_size, meta.threshold)
        scores = {
            "dice": dice(pred, ref),
            "iou": iou(pred, ref),
            "boundary_f": boundary_f_score(pred, ref, tolerance_px),
        }
        per_image.append({"image_id": row["image_id"], "lesion_id": row["lesion_id"], **scores})
        cases.append((str(row["image_id"]), image, ref, pred, scores["dice"]))

    frame = pd.DataFrame(per_image)
    names = ("dice", "iou", "boundary_f")
    intervals = bootstrap_means(
        {k: frame[k].to_numpy() for k in names}, frame["lesion_id"].to_numpy(), n_boot, seed
    )
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "version": meta.version,
        "split": split,
        "n_images": len(frame),
        "n_lesions": int(frame["lesion_id"].nunique()),
        "input_size": meta.input_size,
        "threshold": meta.threshold,
        "threshold_rule": THRESHOLD_RULE,
        "boundary_tolerance_px": tolerance_px,
        "bootstrap": {"replicates": n_boot, "seed": seed, "unit": "lesion", "interval": "95% percentile"},
        "data_hash": data_hash,
        "trained_on_data_hash": meta.data_hash,
        **intervals,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    frame.to_csv(out / "per_image.csv", index=False)
    _gallery(out / "gallery.png", cases, gallery_size)
    logger.info(
        "segmentation (%s, %d images): Dice %.3f [%.3f, %.3f], IoU %.3f, boundary F %.3f",
        split, len(frame), result["dice"]["mean"], result["dice"]["low"], result["dice"]["high"],
        result["iou"]["mean"], result["boundary_f"]["mean"],
    )  # fmt: skip
    return result


__all__ = ["SegTrainConfig", "SegTrainResult", "evaluate_seg", "predict_masks", "train_seg"]
