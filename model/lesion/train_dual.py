"""Training and evaluation of the dual-encoder classifier (:mod:`model.lesion.dual`) on the derm-dev layout.

Targets: the seven HAM10000 diagnoses (cross-entropy, class-weighted by inverse frequency, capped;
rows whose ``dx`` is not one of the seven, e.g. synthetic studies, train only the BCC head) and BCC
(binary cross-entropy). The lesion encoder sees the image cropped to the lesion mask (the reference
mask in training; the segmentation network's mask at inference); rows without a mask show it the
whole image. The split is :func:`model.common.data.split_by_lesion` stratified by diagnosis, so the three
ablation runs (image only, + lesion, + metadata) see the same images.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from labeling_config import HAM_CLASSES
from model.common.checkpoint import save_checkpoint
from model.common.data import load_table, read_binary_mask, split_by_lesion, table_hash
from model.common.files import write_json
from model.common.training import BEST, EpochLoop, LoopSettings, choose_device, seed_everything
from model.lesion.dual import (
    DualNet,
    build_dual,
    encode_metadata,
    lesion_crop,
    load_dual_checkpoint,
)
from model.lesion.meta import DualMeta

logger = logging.getLogger(__name__)

# What a fine-tuned model takes from its parent checkpoint.
INHERITED = ("backbone", "width_mult", "use_lesion", "use_metadata", "image_size", "lesion_size")
IGNORE = -100


@dataclass
class DualConfig:
    """A dual-encoder training run (stored in its checkpoints).

    Attributes:
        data: dataset folder (derm-dev layout).
        out: run folder (``best.pt``, ``last.pt``, ``history.csv``, ``metrics.json``).
        weights: ``None``, ``"imagenet"`` (both MobileNet-V2 encoders) or a dual-encoder checkpoint to
            fine-tune (its architecture and input sizes replace this config's).
        backbone: ``mobilenet_v2`` or ``densenet201``.
        use_lesion: the lesion encoder (ablation switch).
        use_metadata: the metadata transformer (ablation switch).
        image_size: side of the whole-image input; ``lesion_size`` of the lesion crop.
        epochs, batch_size, lr, weight_decay, patience, seed, split_seed, val_fraction, threads: as
            in :class:`model.multitask.train.TrainConfig`.
        max_class_weight: cap of the inverse-frequency class weights.
        max_steps_per_epoch: stop each epoch early (smoke tests).
    """

    data: str
    out: str = "runs/dual"
    weights: str | None = None
    backbone: str = "mobilenet_v2"
    width_mult: float = 1.0
    use_lesion: bool = True
    use_metadata: bool = True
    image_size: int = 160
    lesion_size: int = 128
    epochs: int = 8
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    patience: int = 3
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.2
    threads: int = 1
    max_class_weight: float = 10.0
    max_steps_per_epoch: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _dx_index(dx: Any) -> int:
    return HAM_CLASSES.index(dx) if isinstance(dx, str) and dx in HAM_CLASSES else IGNORE


def _read_rgb(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _read_mask(path: Any, shape: tuple[int, int]) -> NDArray[np.bool_] | None:
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    return read_binary_mask(path, shape)


class DualDataset(Dataset[dict[str, Any]]):
    """Image, lesion crop, metadata row and targets per row of a
    :func:`model.common.data.load_table` table."""

    def __init__(self, df: pd.DataFrame, image_size: int, lesion_size: int, train: bool = False) -> None:
        self.df = df.reset_index(drop=True)
        self.image_size, self.lesion_size, self.train = image_size, lesion_size, train

    def __len__(self) -> int:
        return len(self.df)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.df.iloc[index]
        image = _read_rgb(row["image_path"])
        mask = _read_mask(row.get("mask_path"), (image.shape[1], image.shape[2]))
        if self.train:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
                mask = mask[:, ::-1] if mask is not None else None
            if torch.rand(()) < 0.5:
                image = image.flip(-2)
                mask = mask[::-1] if mask is not None else None
        lesion = lesion_crop(
            image, mask if mask is not None else np.ones(image.shape[1:], bool), self.lesion_size
        )
        whole = F.interpolate(image[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True)[0]
        return {
            "image": whole,
            "lesion": lesion,
            "meta": {k: row.get(k) for k in ("age", "sex", "localization")},
            "dx": _dx_index(row.get("dx")),
            "bcc": float(row["bcc"]),
            "image_id": row["image_id"],
        }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "lesion": torch.stack([i["lesion"] for i in items]),
        "meta": encode_metadata([i["meta"] for i in items]),
        "dx": torch.tensor([i["dx"] for i in items], dtype=torch.long),
        "bcc": torch.tensor([i["bcc"] for i in items], dtype=torch.float32),
        "image_id": [i["image_id"] for i in items],
    }


def class_weights(dx: NDArray[Any], cap: float) -> torch.Tensor:
    """Inverse-frequency weights of the seven classes (mean 1 over present classes), capped."""
    counts = np.bincount(dx[dx >= 0], minlength=len(HAM_CLASSES)).astype(float)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
    return torch.tensor(np.minimum(weights, cap), dtype=torch.float32)


def _forward(model: DualNet, batch: dict[str, Any]) -> torch.Tensor:
    """The model's ``(B, 8)`` logits for a :func:`collate` batch, moved to the model's device."""
    device = next(model.parameters()).device
    logits: torch.Tensor = model(
        batch["image"].to(device),
        batch["lesion"].to(device) if model.use_lesion else None,
        batch["meta"].to(device) if model.use_metadata else None,
    )
    return logits


@torch.no_grad()
def predict(model: DualNet, loader: DataLoader[Any]) -> dict[str, Any]:
    """Diagnosis probabilities, BCC probabilities and targets over a loader (eval mode)."""
    model.eval()
    probs, bcc, dx, y, ids = [], [], [], [], []
    for batch in loader:
        logits = _forward(model, batch).float().cpu()
        probs.append(logits[:, : len(HAM_CLASSES)].softmax(1))
        bcc.append(torch.sigmoid(logits[:, len(HAM_CLASSES)]))
        dx.append(batch["dx"])
        y.append(batch["bcc"])
        ids += batch["image_id"]
    return {
        "probs": torch.cat(probs).numpy(),
        "bcc": torch.cat(bcc).numpy(),
        "dx": torch.cat(dx).numpy(),
        "y_bcc": torch.cat(y).numpy(),
        "image_id": ids,
    }


def metrics(pred: dict[str, Any]) -> dict[str, Any]:
    """Balanced accuracy, macro and per-class AUROC (one vs rest) of the diagnosis; BCC AUROC."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    out: dict[str, Any] = {"n": len(pred["image_id"])}
    known = pred["dx"] >= 0
    if len(np.unique(pred["dx"][known])) >= 2:  # a diagnosis metric needs two classes at least
        dx, probs = pred["dx"][known], pred["probs"][known]
        with warnings.catch_warnings():  # recall is averaged over the classes present, as it should be
            warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
            out["balanced_accuracy"] = float(balanced_accuracy_score(dx, probs.argmax(1)))
        per = {}
        for k, name in enumerate(HAM_CLASSES):
            positive = dx == k
            if 0 < positive.sum() < len(dx):
                per[name] = float(roc_auc_score(positive, probs[:, k]))
        out["auroc_per_class"] = per
        out["auroc_macro"] = float(np.mean(list(per.values()))) if per else math.nan
    y = pred["y_bcc"] >= 0.5
    out["auroc_bcc"] = float(roc_auc_score(y, pred["bcc"])) if 0 < y.sum() < len(y) else math.nan
    return out


def save_dual(
    path: str | Path,
    model: DualNet,
    config: DualConfig,
    meta: DualMeta | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any] | None = None,
) -> DualMeta:
    """:func:`~model.common.checkpoint.save_checkpoint` of a dual-encoder model: the architecture from
    ``model`` (so it cannot disagree with the weights), the input sizes and ``extra["train_config"]``
    from ``config``, the rest from ``meta`` (default: none).

    Returns:
        The metadata as stored (with its version).
    """
    base = meta if meta is not None else DualMeta()
    meta = replace(
        base, **model.hparams(), image_size=config.image_size, lesion_size=config.lesion_size,
        extra={**base.extra, "train_config": asdict(config)},
    )  # fmt: skip
    return save_checkpoint(path, model, meta, optimizer, scheduler, state)


def load_dual(path: str | Path) -> tuple[DualNet, dict[str, Any]]:
    """A trained dual-encoder model (eval mode) and its checkpoint's metadata as a dict of the layout this
    loader returned before checkpoints had one format (``arch``, ``config``: the training config with the
    architecture, ``epoch``, ``metrics``, ``data_hash``, ``provenance``, ``n_val``, ``synthetic``, and now
    ``version``). New code: :func:`model.lesion.dual.load_dual_checkpoint` or :func:`model.systems.load`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a dermassist checkpoint, or another system's.
    """
    model, meta = load_dual_checkpoint(path)
    described = {
        "arch": meta.arch,
        "version": meta.version,
        "config": {**meta.extra.get("train_config", {}), **meta.config_part()},
        "epoch": meta.epoch,
        "metrics": meta.metrics,
        "data_hash": meta.data_hash,
        "provenance": meta.provenance,
    }
    described.update({k: meta.extra[k] for k in ("n_val", "synthetic") if k in meta.extra})
    return model, described


def split_rows(df: pd.DataFrame, config: DualConfig | dict[str, Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """The run's training and validation row positions: lesion-grouped, stratified by diagnosis
    (by BCC where the table has no ``dx``), from the config's ``val_fraction`` and ``split_seed``."""
    cfg = asdict(config) if isinstance(config, DualConfig) else config
    stratify = "dx" if "dx" in df.columns else "bcc"
    return split_by_lesion(df, float(cfg["val_fraction"]), int(cfg["split_seed"]), stratify=stratify)


def validation_rows(df: pd.DataFrame, config: DualConfig | dict[str, Any]) -> NDArray[Any]:
    """The validation row positions of :func:`split_rows`."""
    return split_rows(df, config)[1]


def train_dual(config: DualConfig, table: pd.DataFrame | None = None) -> dict[str, Any]:
    """Train, keep the best epoch by validation macro AUROC (BCC AUROC where no diagnosis is known).

    Returns:
        ``{"best": path, "metrics": validation metrics of the best epoch, "history": [...], "seconds": s}``.
    """
    torch.set_num_threads(config.threads)
    started = time.monotonic()
    run = DualTraining(config, load_table(config.data) if table is None else table)
    result = run.fit(None)
    seconds = time.monotonic() - started
    out = Path(run.config.out)
    write_json(out / "metrics.json", {"validation": run.best_found, "seconds": seconds})
    return {"best": out / BEST, "metrics": run.best_found, "history": result.history, "seconds": seconds}


class DualTraining(EpochLoop):
    """One dual-encoder run on :class:`~model.common.training.EpochLoop`: BCE of BCC plus the
    class-weighted cross-entropy of the seven diagnoses, cosine decay without warm-up, fp32."""

    logger = logger
    monitored = "the validation macro AUROC"

    def __init__(self, config: DualConfig, df: pd.DataFrame) -> None:
        generator = seed_everything(config.seed)
        if config.weights not in (None, "imagenet"):  # fine-tuning: the parent's architecture and input sizes
            model, parent = load_dual_checkpoint(config.weights)
            model.train()
            config = replace(config, **{k: getattr(parent, k) for k in INHERITED})
            self.parent: str | None = parent.version
        else:
            model = build_dual(
                config.weights,
                backbone=config.backbone,
                width_mult=config.width_mult,
                use_lesion=config.use_lesion,
                use_metadata=config.use_metadata,
            )
            self.parent = None
        self.config, self.df = config, df
        train_idx, val_idx = split_rows(df, config)
        train_df, self.val_df = df.iloc[train_idx], df.iloc[val_idx]
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        train_loader = DataLoader(
            DualDataset(train_df, config.image_size, config.lesion_size, train=True),
            batch_size=config.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=generator,
        )
        self.val_loader = DataLoader(
            DualDataset(self.val_df, config.image_size, config.lesion_size),
            batch_size=config.batch_size,
            collate_fn=collate,
        )
        device = choose_device()
        model.to(device)
        dx_train = np.array([_dx_index(d) for d in train_df.get("dx", pd.Series([None] * len(train_df)))])
        self.weights = class_weights(dx_train, config.max_class_weight).to(device)
        self.has_dx = bool((dx_train >= 0).any())
        settings = LoopSettings.of(config, amp=False, min_delta=0.0)
        super().__init__(model, train_loader, out, settings, device, generator)
        self.dual = model
        self.data_hash = table_hash(df)
        self.found: dict[str, Any] = {}
        self.best_found: dict[str, Any] = {}

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        logits = _forward(self.dual, batch)
        bcc, dx = batch["bcc"].to(self.device), batch["dx"].to(self.device)
        loss = F.binary_cross_entropy_with_logits(logits[:, len(HAM_CLASSES)], bcc)
        if self.has_dx and (dx >= 0).any():
            loss = loss + F.cross_entropy(
                logits[:, : len(HAM_CLASSES)], dx, weight=self.weights, ignore_index=IGNORE
            )
        return loss, len(bcc)

    def validate(self) -> dict[str, float]:
        self.found = metrics(predict(self.dual, self.val_loader))
        score = self.found.get("auroc_macro", math.nan)
        if not math.isfinite(score):
            bcc = self.found["auroc_bcc"]
            score = bcc if math.isfinite(bcc) else -self.train_loss
        return {**{k: v for k, v in self.found.items() if not isinstance(v, dict)}, "score": score}

    def monitor(self, row: dict[str, float]) -> float:
        return row["score"]

    def describe(self, row: dict[str, float]) -> str:
        return "validation " + ", ".join(
            f"{k} {v:.4f}" for k, v in self.found.items() if isinstance(v, float)
        )

    def save(self, path: Path, row: dict[str, float], best: bool) -> DualMeta:
        synthetic = bool(self.df["synthetic"].all()) if "synthetic" in self.df else False
        meta = DualMeta(
            data_hash=self.data_hash, metrics=self.found, epoch=self.epoch, parent=self.parent,
            extra={"n_val": len(self.val_df), "synthetic": synthetic},
        )  # fmt: skip
        if best:
            self.best_found = self.found
            return save_dual(path, self.dual, self.config, meta)
        return save_dual(
            path, self.dual, self.config, meta, self.optimizer, self.scheduler, self.resume_state()
        )
