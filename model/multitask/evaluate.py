"""Evaluation with the paper's metrics, explanation agreement, and a self-contained HTML report.

Metrics (Matas et al., arXiv:2407.00104) with 95% intervals from a bootstrap over *lesions* (images of
one lesion are resampled together, as they are not independent), over patients where the data name them
(a ``patient_id`` column), over images where they name neither (:func:`model.common.metrics.resampling`;
``metrics.json`` and the report say which, and how many):

- BCC: accuracy, precision, recall (sensitivity), specificity, F1, balanced accuracy at the
  checkpoint's threshold; AUROC and AUPRC.
- Each pattern, where labels exist: AUROC, average precision, F1 at its threshold.
- The paper's two criteria: the share of BCC images in which at least one of the six BCC patterns is
  detected (paper: 99%), and the share of non-BCC images in which pigment network is detected, so
  the exclusion criterion holds (paper: 95%).
- Explanation agreement where reference masks exist: the share of a map's energy inside the mask,
  the IoU of the thresholded map (:func:`model.common.explain.cam_to_mask`) with the mask, and the pointing
  game (is the map's maximum inside the mask?); per pattern against its mask, and for the diagnosis
  map against the lesion mask (the second paper's claim that decisions rest on the lesion). The
  mask's own area share is reported beside the energy share: it is what a uniform map would score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from labeling_config import BCC_PATTERNS, DIAGNOSIS_KEY, EXCLUSION_PATTERN, PATTERN_KEYS, PATTERNS, TARGETS
from model.common.data import DermDataset, load_table, read_binary_mask, split_sources, table_hash
from model.common.explain import LIBRARY_METHODS, explain, library_cams
from model.common.files import write_json
from model.common.metrics import UNITS, Resampling, bootstrap, map_agreement, resampling
from model.common.report import confusion_png, figure_png, overlay, pyplot
from model.common.report import write_report as write_report_page
from model.common.training import transforms
from model.multitask.network import DermNetMeta, load_checkpoint

logger = logging.getLogger(__name__)

Array = NDArray[Any]
Metric = Callable[[Array, Array], float]


@dataclass
class Predictions:
    """Model outputs over a table: calibrated probabilities, labels, and feature-resolution maps."""

    table: pd.DataFrame
    probs: Array  # (N, K)
    raw_cams: Array  # (N, K, h, w)
    meta: DermNetMeta


def predict(
    model: Any, meta: DermNetMeta, table: pd.DataFrame, batch_size: int = 32, cam_method: str = "gradcam"
) -> Predictions:
    """Probabilities and Grad-CAM maps of every row, from one pass per batch.

    ``cam_method`` other than ``"gradcam"`` takes the maps from pytorch-grad-cam (one call per output,
    see :data:`model.common.explain.LIBRARY_METHODS`); they are kept at a quarter of the input size.
    """
    if cam_method != "gradcam" and cam_method not in LIBRARY_METHODS:
        raise ValueError(f"unknown CAM method {cam_method!r}; choose one of {list(LIBRARY_METHODS)}")
    ds = DermDataset(table, transforms(meta.input_size, train=False))
    loader = DataLoader(ds, batch_size=batch_size)
    temps = [meta.temperatures.get(t, 1.0) for t in TARGETS]
    probs, raws = [], []
    model.eval()
    for batch in loader:
        e = explain(model, batch["image"], temperatures=temps)
        probs.append(e.probs.numpy())
        if cam_method == "gradcam":
            raws.append(e.raw.numpy())
        else:
            maps = torch.from_numpy(library_cams(model, batch["image"], model.features[-1], cam_method))
            raws.append(F.interpolate(maps, scale_factor=0.25, mode="area").numpy())
    return Predictions(table.reset_index(drop=True), np.concatenate(probs), np.concatenate(raws), meta)


# ------------------------------------------------------------------------------------------------
# Metrics with bootstrap intervals
# ------------------------------------------------------------------------------------------------


def _safe(metric: Metric) -> Metric:
    def wrapped(y: Array, s: Array) -> float:
        if y.size == 0 or y.min() == y.max():
            return float("nan")
        return float(metric(y, s))

    return wrapped


def _rate(num: Array, den: Array) -> float:
    return float(num.sum() / den.sum()) if den.sum() else float("nan")


def threshold_metrics(y: Array, pred: Array) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1, balanced accuracy of 0/1 predictions."""
    y, pred = y.astype(bool), pred.astype(bool)
    recall = _rate(pred & y, y)
    specificity = _rate(~pred & ~y, ~y)
    precision = _rate(pred & y, pred)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    return {
        "accuracy": float((pred == y).mean()) if y.size else float("nan"),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": f1,
        "balanced_accuracy": (recall + specificity) / 2,
    }


def classification_metrics(
    pred: Predictions, n_boot: int = 1000, seed: int = 0, resample: Resampling | None = None
) -> dict[str, Any]:
    """BCC and per-pattern metrics with intervals, and the paper's two criteria.

    ``resample`` says what the bootstrap resamples (default: :func:`model.common.metrics.resampling`
    of the table: patients, else lesions, else images).
    """
    table, probs, meta = pred.table, pred.probs, pred.meta
    resample = resampling(table) if resample is None else resample
    thresholds = np.array([meta.thresholds.get(t, 0.5) for t in TARGETS])
    detected = probs >= thresholds
    y_bcc = table[DIAGNOSIS_KEY].to_numpy().astype(int)
    auroc, auprc = _safe(roc_auc_score), _safe(average_precision_score)

    def bcc_stat(rows: Array) -> dict[str, float]:
        y, s = y_bcc[rows], probs[rows, 0]
        return {**threshold_metrics(y, detected[rows, 0]), "auroc": auroc(y, s), "auprc": auprc(y, s)}

    result: dict[str, Any] = {"n_images": len(table), "n_bcc": int(y_bcc.sum())}
    result["bcc"] = bootstrap(bcc_stat, resample.groups, n_boot, seed, n=len(table))
    result["bcc"]["threshold"] = float(thresholds[0])

    patterns: dict[str, Any] = {}
    for k, key in enumerate(TARGETS[1:], start=1):
        labelled = table[key].notna().to_numpy()
        if labelled.any():
            sub = resample.subset(labelled)
            y = table.loc[labelled, key].to_numpy().astype(int)
            s, d = probs[labelled, k], detected[labelled, k]

            def stat(rows: Array, y: Array = y, s: Array = s, d: Array = d) -> dict[str, float]:
                m = threshold_metrics(y[rows], d[rows])
                return {"auroc": auroc(y[rows], s[rows]), "ap": auprc(y[rows], s[rows]), "f1": m["f1"]}

            patterns[key] = bootstrap(stat, sub.groups, n_boot, seed, n=sub.n_images)
            patterns[key]["prevalence"] = float(y.mean())
            patterns[key]["threshold"] = float(thresholds[k])
    result["patterns"] = patterns

    bcc_idx = [TARGETS.index(k) for k in BCC_PATTERNS]
    pn_idx = TARGETS.index(EXCLUSION_PATTERN)
    is_bcc = y_bcc == 1
    criteria = {
        "bcc_with_a_bcc_pattern_detected": _rate(detected[:, bcc_idx].any(axis=1) & is_bcc, is_bcc),
        "non_bcc_with_pigment_network_detected": _rate(detected[:, pn_idx] & ~is_bcc, ~is_bcc),
        "paper": {"bcc_with_a_bcc_pattern_detected": 0.99, "non_bcc_with_pigment_network_detected": 0.95},
    }
    if labelled.any():
        truth = table.loc[labelled, list(PATTERN_KEYS)].to_numpy().astype(bool)
        yb = is_bcc[labelled]
        criteria["reference_labels"] = {
            "bcc_with_a_bcc_pattern": _rate(
                truth[:, [PATTERN_KEYS.index(k) for k in BCC_PATTERNS]].any(1) & yb, yb
            ),
            "non_bcc_with_pigment_network": _rate(truth[:, PATTERN_KEYS.index(EXCLUSION_PATTERN)] & ~yb, ~yb),
        }
    result["criteria"] = criteria
    return result


# ------------------------------------------------------------------------------------------------
# Explanation agreement
# ------------------------------------------------------------------------------------------------


def explanation_metrics(pred: Predictions, threshold: float = 0.5) -> dict[str, Any]:
    """Agreement of each pattern's map with its mask, and of the diagnosis map with the lesion mask."""
    table = pred.table
    rows: dict[str, list[dict[str, float]]] = {key: [] for key in TARGETS}
    for i, row in enumerate(table.to_dict("records")):
        folder = Path(row["mask_path"]).parent if row["mask_path"] else None
        if folder is not None and row["bcc"] == 1:
            rows[DIAGNOSIS_KEY].append(
                map_agreement(pred.raw_cams[i, 0], read_binary_mask(Path(row["mask_path"])), threshold)
            )
        if folder is None:
            continue
        for k, key in enumerate(TARGETS[1:], start=1):
            path = folder / f"{row['image_id']}_{key}.png"
            if row[key] == 1 and path.is_file():
                rows[key].append(map_agreement(pred.raw_cams[i, k], read_binary_mask(path), threshold))
    out: dict[str, Any] = {"threshold": threshold, "masks_found": bool(table["mask_path"].notna().any())}
    for key, values in rows.items():
        if values:
            frame = pd.DataFrame(values)
            out[key] = {"n": len(values), **{c: float(frame[c].mean()) for c in frame.columns}}
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _curves(pred: Predictions) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for k, key in enumerate(TARGETS):
        rows = pred.table[key].notna().to_numpy()
        y = pred.table.loc[rows, key].to_numpy().astype(int) if rows.any() else np.array([])
        if y.size == 0 or y.min() == y.max():
            continue
        s = pred.probs[rows, k]
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        style = {"lw": 2.5, "color": "black"} if k == 0 else {"lw": 1.2}
        name = "BCC" if k == 0 else PATTERNS[k - 1].display
        axes[0].plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, s):.3f})", **style)
        axes[1].plot(recall, precision, label=name, **style)
        edges = np.linspace(0, 1, 11)
        bins = np.clip(np.digitize(s, edges) - 1, 0, 9)
        filled = [b for b in range(10) if (bins == b).any()]
        axes[2].plot(
            [s[bins == b].mean() for b in filled], [y[bins == b].mean() for b in filled], "o-", ms=3, **style
        )
    axes[0].plot([0, 1], [0, 1], ":", color="grey")
    axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (AUROC)")
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
    axes[2].plot([0, 1], [0, 1], ":", color="grey")
    axes[2].set(xlabel="predicted probability", ylabel="observed frequency", title="Calibration")
    axes[0].legend(fontsize=7, loc="lower right")
    return figure_png(fig)


def _confusion(pred: Predictions) -> str:
    y = pred.table[DIAGNOSIS_KEY].to_numpy().astype(int)
    d = (pred.probs[:, 0] >= pred.meta.thresholds.get(DIAGNOSIS_KEY, 0.5)).astype(int)
    matrix = np.array([[((y == a) & (d == b)).sum() for b in (1, 0)] for a in (1, 0)])
    return confusion_png(matrix, ["BCC", "non-BCC"], "BCC confusion matrix", size=(3.6, 3.2))


def _gallery(pred: Predictions, per_group: int, seed: int) -> str:
    plt = pyplot()
    y = pred.table[DIAGNOSIS_KEY].to_numpy().astype(bool)
    d = pred.probs[:, 0] >= pred.meta.thresholds.get(DIAGNOSIS_KEY, 0.5)
    groups = {
        "true positive": y & d,
        "false positive": ~y & d,
        "false negative": y & ~d,
        "true negative": ~y & ~d,
    }
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(4, per_group, figsize=(2.4 * per_group, 10.4), squeeze=False)
    for r, (name, selected) in enumerate(groups.items()):
        rows = np.flatnonzero(selected)
        rows = rng.choice(rows, min(per_group, len(rows)), replace=False) if len(rows) else rows
        for c in range(per_group):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(rows):
                i = int(rows[c])
                row = pred.table.iloc[i]
                ax.imshow(overlay(row["image_path"], pred.raw_cams[i, 0], row["mask_path"]))
                ax.set_title(f"{row['image_id']}\np(BCC)={pred.probs[i, 0]:.2f}", fontsize=7)
            if c == 0:
                ax.text(
                    -0.08,
                    0.5,
                    name,
                    transform=ax.transAxes,
                    rotation=90,
                    va="center",
                    ha="right",
                    fontsize=10,
                )
    fig.suptitle("BCC Grad-CAM (white: lesion outline)", fontsize=11)
    return figure_png(fig)


def _pattern_gallery(pred: Predictions, seed: int) -> str | None:
    plt = pyplot()
    known = pred.table[list(PATTERN_KEYS)].notna().to_numpy()
    if not known.any():
        return None
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(2, len(PATTERN_KEYS), figsize=(2.3 * len(PATTERN_KEYS), 5.2), squeeze=False)
    for k, pattern in enumerate(PATTERNS):
        rows = np.flatnonzero(pred.table[pattern.key].to_numpy() == 1)
        rows = rng.choice(rows, min(2, len(rows)), replace=False) if len(rows) else rows
        for r in range(2):
            ax = axes[r, k]
            ax.axis("off")
            if r < len(rows):
                i = int(rows[r])
                row = pred.table.iloc[i]
                mask = (
                    Path(row["image_path"]).parent.parent / "masks" / f"{row['image_id']}_{pattern.key}.png"
                )
                ax.imshow(
                    overlay(row["image_path"], pred.raw_cams[i, k + 1], str(mask) if mask.is_file() else None)
                )
                ax.set_title(f"{pattern.display}\np={pred.probs[i, k + 1]:.2f}", fontsize=7)
    fig.suptitle(
        "Pattern Grad-CAM on images with the pattern (white: the pattern's reference mask)", fontsize=11
    )
    return figure_png(fig)


def write_report(
    pred: Predictions, metrics: dict[str, Any], path: Path, gallery: int = 4, seed: int = 0
) -> None:
    """A self-contained HTML page (``templates/evaluation.html``): tables of metrics and the plots, images
    inlined."""
    cls = metrics["classification"]
    expl = metrics["explanations"]

    def display(key: str) -> str:
        return "BCC map vs lesion" if key == DIAGNOSIS_KEY else PATTERNS[PATTERN_KEYS.index(key)].display

    figures = [_curves(pred), _confusion(pred), _gallery(pred, gallery, seed)]
    pattern_fig = _pattern_gallery(pred, seed)
    if pattern_fig:
        figures.append(pattern_fig)
    write_report_page(
        path,
        "model.multitask",
        "evaluation.html",
        meta=pred.meta,
        data=str(metrics["data"]),
        split=metrics["split"],
        n_bootstrap=metrics["n_bootstrap"],
        resampled=metrics.get("bootstrap", {}).get("text", "bootstrap over lesions"),
        cls=cls,
        bcc=[(k, v) for k, v in cls["bcc"].items() if isinstance(v, dict)],
        patterns=[(display(k), v) for k, v in cls["patterns"].items()],
        criteria=cls["criteria"],
        threshold=expl["threshold"],
        explanations=[(display(k), v) for k, v in expl.items() if isinstance(v, dict)],
        figures=figures,
    )


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    split: str = "auto",
    n_boot: int = 1000,
    gallery: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    cam_method: str = "gradcam",
    unit: str = "auto",
) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset folder; write ``metrics.json`` and ``report.html`` to ``out``.

    Args:
        checkpoint: a ``best.pt``.
        data: a dataset folder (derm-dev layout).
        out: output folder.
        split: ``"all"`` rows, the training run's validation ``"val"`` split, or ``"auto"`` (``val``
            when the checkpoint was trained on this very table, else ``all``).
        n_boot: bootstrap replicates for the intervals.
        gallery: images per row of the Grad-CAM gallery.
        batch_size: images per forward pass.
        seed: seed of the bootstrap and the gallery.
        cam_method: ``"gradcam"`` (ours, all outputs from one pass) or a pytorch-grad-cam method
            for the explanation metrics and galleries.
        unit: what the bootstrap resamples: ``"auto"`` (patients where the table has ``patient_id``,
            else lesions where it has lesion ids, else images), ``"patient"``, ``"lesion"`` or
            ``"image"`` (:func:`model.common.metrics.resampling`).

    Returns:
        The metrics (as written to ``metrics.json``).
    """
    if split not in ("auto", "all", "val"):
        raise ValueError(f"split must be 'auto', 'all' or 'val', got {split!r}")
    if unit not in ("auto", *UNITS):
        raise ValueError(f"unit must be 'auto', 'patient', 'lesion' or 'image', got {unit!r}")
    model, meta = load_checkpoint(checkpoint)
    table = load_table(data)
    if split == "auto":
        trained_on = table_hash(table) == meta.data_hash or table["source"].iat[0] in meta.extra.get(
            "sources", []
        )
        split = "val" if trained_on else "all"
    if split == "val":
        cfg = meta.extra.get("train_config", {})
        _, val = split_sources(table, cfg.get("val_fraction", 0.2), seed=cfg.get("split_seed", 0))
        table = table.iloc[val]
    resample = resampling(table, unit)
    logger.info(
        "evaluating %s on %d images of %s (%s; %s)",
        meta.version,
        len(table),
        data,
        split,
        resample.describe(),
    )
    pred = predict(model, meta, table, batch_size, cam_method)
    metrics: dict[str, Any] = {
        "model_version": meta.version,
        "cam_method": cam_method,
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "n_bootstrap": n_boot,
        "bootstrap": {"replicates": n_boot, "seed": seed, "interval": "95% percentile", **resample.as_dict()},
        "classification": classification_metrics(pred, n_boot, seed, resample),
        "explanations": explanation_metrics(pred),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    pd.DataFrame(
        {"image_id": pred.table["image_id"], **{f"p_{t}": pred.probs[:, k] for k, t in enumerate(TARGETS)}}
    ).to_csv(out / "predictions.csv", index=False)
    write_report(pred, metrics, out / "report.html", gallery, seed)
    return metrics
