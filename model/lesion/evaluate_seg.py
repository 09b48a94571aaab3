"""Evaluating a SegNet checkpoint (:mod:`model.lesion.train_seg`) at each image's own resolution.

The logits are upsampled bilinearly to the image's size and a pixel is lesion where the probability is
at least the checkpoint's threshold (:data:`model.lesion.segmentation.THRESHOLD_RULE`).
:func:`evaluate_seg` writes ``metrics.json`` (Dice, IoU and boundary F, each the mean over images with
a 95% bootstrap interval over lesions: patients where the data name them, images where they name
neither, :func:`model.common.metrics.resampling`), ``per_image.csv`` and ``gallery.png`` (best and worst
cases by Dice, predicted contour over the reference contour). :func:`predict_masks` is the same prediction
for any images (the dual-encoder's evaluation and the backend's retraining use it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from model.common.data import DataError, load_table, split_by_lesion, table_hash
from model.common.files import write_json
from model.common.metrics import UNITS, bootstrap_means, resampling
from model.common.training import transforms
from model.lesion.masks import boundary_f_score, dice, iou
from model.lesion.segmentation import THRESHOLD, THRESHOLD_RULE, SegMeta, load_segnet
from model.lesion.train_seg import rows_with_masks
from model.lesion.unet import SegNet

logger = logging.getLogger(__name__)

Array = NDArray[Any]


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
    unit: str = "auto",
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
        unit: what the bootstrap resamples (:func:`model.common.metrics.resampling`): ``"auto"``
            (patients, else lesions, else images), ``"patient"``, ``"lesion"`` or ``"image"``.

    Returns:
        The content of ``metrics.json``.

    Raises:
        ValueError: an unknown ``split`` or ``unit``.
    """
    if split not in ("val", "all"):
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    if unit not in ("auto", *UNITS):
        raise ValueError(f"unit must be 'auto', 'patient', 'lesion' or 'image', got {unit!r}")
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
    resample = resampling(table, unit)
    intervals = bootstrap_means({k: frame[k].to_numpy() for k in names}, resample.groups, n_boot, seed)
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
        "bootstrap": {"replicates": n_boot, "seed": seed, "interval": "95% percentile", **resample.as_dict()},
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
        "segmentation (%s, %d images): Dice %.3f [%.3f, %.3f] (%s), IoU %.3f, boundary F %.3f",
        split, len(frame), result["dice"]["mean"], result["dice"]["low"], result["dice"]["high"],
        resample.describe(),
        result["iou"]["mean"], result["boundary_f"]["mean"],
    )  # fmt: skip
    return result


__all__ = ["evaluate_seg", "predict_masks", "predict_row_masks"]
