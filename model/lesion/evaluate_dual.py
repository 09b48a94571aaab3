"""Evaluation of a dual-encoder checkpoint (:mod:`model.lesion.train_dual`): diagnosis metrics and Grad-CAM.

On the checkpoint's own lesion-grouped validation split (or every row):

- the seven-class diagnosis: balanced accuracy, macro AUROC and per-class AUROC (one vs rest), BCC
  AUROC, each with a 95% interval from a bootstrap over lesions (an image's siblings move together;
  over patients where the data name them, over images where they name neither:
  :func:`model.common.metrics.resampling`, recorded in ``metrics.json`` and the report);
- where does the image encoder look: the Grad-CAM map of the predicted diagnosis, from the one
  forward pass (:func:`model.common.explain.explain` through :class:`model.lesion.dual.ImageBranch`),
  resized to the image's own size; the share of its energy inside the reference lesion mask, beside the mask's
  area share (what a uniform map scores) and the pointing game (the map's peak inside the lesion).

The lesion crop comes from the reference mask (as in training) or, with ``segnet``, from a
segmentation checkpoint's mask, as the backend serves it. The report (``report.html``,
:mod:`model.common.report` on ``templates/dual_evaluation.html``) holds the tables, the confusion matrix
and a gallery of maps.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from PIL import Image
from torch.utils.data import DataLoader

from labeling_config import HAM_CLASSES
from model.common.data import load_table, read_binary_mask, table_hash
from model.common.explain import explain
from model.common.files import write_json
from model.common.metrics import UNITS, bootstrap, map_agreement, resampling
from model.common.report import confusion_png, figure_png, overlay, pyplot, write_report
from model.lesion.dual import ImageBranch, load_dual_checkpoint
from model.lesion.train_dual import DualDataset, collate, metrics, validation_rows

logger = logging.getLogger(__name__)

Array = NDArray[Any]


def _predicted_masks(segnet_path: str | Path, rows: pd.DataFrame, out: Path) -> tuple[pd.Series, Array]:
    """The segmentation network's mask of every row, written as PNGs; their paths, and each mask's
    Dice against the reference mask (NaN where there is none)."""
    from model.lesion.evaluate_seg import predict_row_masks
    from model.lesion.masks import dice
    from model.lesion.segmentation import load_segnet

    segnet, seg_meta = load_segnet(segnet_path)
    folder = out / "predicted-masks"
    folder.mkdir(parents=True, exist_ok=True)
    paths, dices = [], []
    for row, mask in zip(rows.to_dict("records"), predict_row_masks(segnet, seg_meta, rows), strict=True):
        path = folder / f"{row['image_id']}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        paths.append(str(path))
        reference = row.get("mask_path")
        if isinstance(reference, str) and Path(reference).is_file():
            dices.append(dice(mask, read_binary_mask(Path(reference))))
        else:
            dices.append(np.nan)
    return pd.Series(paths, index=rows.index), np.asarray(dices, dtype=float)


def _gallery_png(rows: pd.DataFrame, raw: Array, predicted: Array, n: int, seed: int) -> str | None:
    if len(rows) == 0 or n <= 0:
        return None
    picked = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    fig, axes = pyplot().subplots(1, len(picked), figsize=(2.6 * len(picked), 2.6), squeeze=False)
    for ax, i in zip(axes[0], picked, strict=True):
        row = rows.iloc[i]
        ax.imshow(overlay(row["image_path"], raw[i, predicted[i]], row["mask_path"]))
        ax.set_title(f"{row['dx']} -> {HAM_CLASSES[predicted[i]]}", fontsize=9)
        ax.axis("off")
    return figure_png(fig)


def evaluate_dual(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "val",
    segnet: str | Path | None = None,
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
    gallery_size: int = 8,
    table: pd.DataFrame | None = None,
    unit: str = "auto",
) -> dict[str, Any]:
    """Evaluate a dual-encoder checkpoint; writes ``metrics.json``, ``per_image.csv`` and ``report.html``.

    Args:
        checkpoint: a ``best.pt`` of :func:`model.lesion.train_dual.train_dual`.
        data: dataset folder (derm-dev layout).
        out: report folder.
        split: ``"val"`` (the checkpoint's own validation rows) or ``"all"``.
        segnet: a segmentation checkpoint whose masks make the lesion crops (default: reference masks).
        batch_size, n_boot, seed, gallery_size: as named.
        table: the :func:`model.common.data.load_table` table to use instead of reading ``data``.
        unit: what the bootstrap resamples (:func:`model.common.metrics.resampling`): ``"auto"``
            (patients, else lesions, else images), ``"patient"``, ``"lesion"`` or ``"image"``.

    Returns:
        The content of ``metrics.json``.

    Raises:
        ValueError: an unknown ``split`` or ``unit``, or a table without diagnoses.
    """
    if split not in ("val", "all"):
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    if unit not in ("auto", *UNITS):
        raise ValueError(f"unit must be 'auto', 'patient', 'lesion' or 'image', got {unit!r}")
    model, meta = load_dual_checkpoint(checkpoint)
    config = {**meta.extra.get("train_config", {}), **meta.config_part()}
    table = load_table(data) if table is None else table
    if "dx" not in table.columns:
        raise ValueError(f"{data} has no dx column: the diagnosis evaluation needs HAM10000 diagnoses")
    if meta.data_hash and meta.data_hash != table_hash(table):
        logger.warning(
            "the data differ from those %s was trained on: the validation split may differ", checkpoint
        )
    rows = table.iloc[validation_rows(table, config)] if split == "val" else table
    rows = rows.reset_index(drop=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    crops, mask_dice = rows, None
    if segnet is not None:
        predicted_paths, mask_dice = _predicted_masks(segnet, rows, out)
        crops = rows.assign(mask_path=predicted_paths)
    loader = DataLoader(
        DualDataset(crops, int(config["image_size"]), int(config["lesion_size"])),
        batch_size=batch_size,
        collate_fn=collate,
    )
    logits, raws = [], []
    for batch in loader:
        branch = ImageBranch(
            model,
            batch["lesion"] if model.use_lesion else None,
            batch["meta"] if model.use_metadata else None,
        )
        found = explain(branch, batch["image"], method="autograd")
        logits.append(found.logits)
        raws.append(found.raw)
    logit = torch.cat(logits)
    raw = torch.cat(raws).numpy()
    probs = logit[:, : len(HAM_CLASSES)].softmax(1).numpy()
    bcc = torch.sigmoid(logit[:, len(HAM_CLASSES)]).numpy()
    dx = np.array([HAM_CLASSES.index(d) if d in HAM_CLASSES else -1 for d in rows["dx"]])
    predicted = probs.argmax(1)
    ids = rows["image_id"].to_numpy()
    pred: dict[str, Any] = {"probs": probs, "bcc": bcc, "dx": dx, "y_bcc": rows["bcc"].to_numpy(float)}
    pred["image_id"] = list(ids)
    point = metrics(pred)

    def scalar_metrics(index: Array) -> dict[str, float]:
        sub = {k: v[index] for k, v in pred.items() if k != "image_id"} | {"image_id": list(ids[index])}
        found = metrics(sub)
        return {k: float(found.get(k, np.nan)) for k in ("balanced_accuracy", "auroc_macro", "auroc_bcc")}

    resample = resampling(rows, unit)
    intervals = bootstrap(scalar_metrics, resample.groups, n_boot, seed, n=len(rows))

    # Grad-CAM of the predicted diagnosis against the reference lesion mask, at the image's size.
    agreement: list[dict[str, float]] = []
    with_mask = []
    for i, row in enumerate(rows.to_dict("records")):
        path = row.get("mask_path")
        if isinstance(path, str) and Path(path).is_file():
            agreement.append(map_agreement(raw[i, predicted[i]], read_binary_mask(Path(path))))
            with_mask.append(i)
    cam: dict[str, Any] = {"n": len(agreement)}
    if agreement:
        frame = pd.DataFrame(agreement)
        cam_rows = resample.subset(np.asarray(with_mask, dtype=int))

        def cam_means(index: Array) -> dict[str, float]:
            with warnings.catch_warnings():  # a resample of maps without energy has no mean
                warnings.simplefilter("ignore", RuntimeWarning)
                return {
                    c: float(np.nanmean(frame[c].to_numpy()[index]))
                    for c in ("energy_inside", "area", "pointing")
                }

        cam.update(bootstrap(cam_means, cam_rows.groups, n_boot, seed, n=cam_rows.n_images))
        cam["share_above_half"] = float((frame["energy_inside"] > 0.5).mean())
        cam["maps_without_energy"] = int(frame["energy_inside"].isna().sum())  # all zero after the ReLU
    result = {
        "checkpoint": str(checkpoint),
        "split": split,
        "lesion_masks": "reference" if segnet is None else f"predicted by {segnet}",
        "model": {
            k: config[k] for k in ("backbone", "use_lesion", "use_metadata", "image_size", "lesion_size")
        },
        "epoch": meta.epoch,
        "n": len(rows),
        "bootstrap": {"replicates": n_boot, "seed": seed, "interval": "95% percentile", **resample.as_dict()},
        **{k: v for k, v in point.items() if k in ("auroc_per_class",)},
        **intervals,
        "gradcam_predicted_class": cam,
    }
    if mask_dice is not None and not np.isnan(mask_dice).all():
        result["predicted_mask_dice"] = bootstrap(
            lambda index: {"dice": float(np.nanmean(mask_dice[index]))},
            resample.groups,
            n_boot,
            seed,
            n=len(rows),
        )["dice"]
    write_json(out / "metrics.json", result)
    per_image = rows[["image_id", "lesion_id", "dx"]].assign(
        predicted=[HAM_CLASSES[k] for k in predicted], bcc_probability=bcc,
        **{f"p_{name}": probs[:, k] for k, name in enumerate(HAM_CLASSES)},
    )  # fmt: skip
    if agreement:
        per_image.loc[with_mask, "cam_energy_inside"] = frame["energy_inside"].to_numpy()
    per_image.to_csv(out / "per_image.csv", index=False)
    _write_report(
        out / "report.html", result, dx, predicted, _gallery_png(rows, raw, predicted, gallery_size, seed)
    )
    return result


def _write_report(
    path: Path, result: dict[str, Any], dx: Array, predicted: Array, gallery: str | None
) -> None:
    """``templates/dual_evaluation.html``: the figures with their intervals, the confusion matrix and the
    Grad-CAM gallery."""
    known = dx >= 0
    k = len(HAM_CLASSES)
    counts = np.zeros((k, k), int)
    np.add.at(counts, (dx[known], predicted[known]), 1)
    write_report(
        path,
        "model.lesion",
        "dual_evaluation.html",
        result=result,
        model=json.dumps(result["model"]),
        cam=result["gradcam_predicted_class"],
        confusion=confusion_png(counts, HAM_CLASSES, "diagnosis (row-normalised colour, counts)"),
        gallery=gallery,
    )
