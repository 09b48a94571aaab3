"""Retraining the second system (lesion U-Net + dual-encoder classifier) from the raters' consensus.

A training job (:mod:`backend.training.jobs`) calls :func:`retrain_lesion` once the lesion pair is promoted
and
the store holds answers from a ``lesion.xml`` project. The reference standard is built from the store:

- the seven-class diagnosis: Dawid-Skene over every rater's HAM10000 choice (one confusion matrix
  per rater over the seven classes), the posteriors kept;
- the lesion mask: STAPLE over the raters' lesion brush regions of each image (one rater's mask is
  taken as it is; an image nobody outlined has no mask and trains only the classifier).

Both networks are fine-tuned from the promoted pair on the items outside the fixed validation split
(:func:`backend.training.training_set.is_validation`), then scored on that split against the same reference:
the U-Net by its mean Dice against the STAPLE masks, the classifier by its cross-entropy against the
Dawid-Skene posteriors (a proper scoring rule on soft targets). Each network replaces the promoted one only
if it is not worse; the pair is then registered and promoted as one version of the ``lesion`` system
(:mod:`backend.serving.registry`), and the served version changes with it. Nothing is replaced before that
last step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.label_studio.brush import decode_region as decode_region  # re-exported: its old home
from backend.serving import registry
from backend.serving.lesion import DUAL_FILE, SEG_FILE, promote_pair
from backend.training.training_set import lesion_group
from consensus.models import Item
from consensus.repository import ham_code as ham_code  # the store's diagnosis -> HAM10000 code, re-exported
from consensus.service import LesionReference, run_lesion_consensus
from labeling_config import HAM_CLASSES, PATTERN_KEYS

logger = logging.getLogger(__name__)


def lesion_reference(session: Session) -> LesionReference:
    """Dawid-Skene diagnoses and STAPLE masks from every live annotation of a lesion project, stored as a
    consensus run (:func:`consensus.service.run_lesion_consensus`, with Label Studio's brush RLE decoded
    by :func:`decode_region`). The caller commits.

    Raises:
        ValueError: no HAM10000 diagnosis in the store.
    """
    return run_lesion_consensus(session, decode_region)


def reference_table(
    session: Session,
    reference: LesionReference,
    image_of: Callable[[Item], Path | None],
    folder: Path,
) -> pd.DataFrame:
    """The training table of :mod:`model.lesion.train_dual` / :mod:`model.lesion.train_seg`
    (``load_table``'s columns).

    STAPLE masks are written as PNGs under ``folder``; age / sex / site come from the task's data
    (``age``, ``sex``, ``site`` or ``localization``, as ``lesion.xml`` shows them).
    """
    ids = list(reference.posteriors.index.astype(str))
    items = {i.external_id: i for i in session.scalars(select(Item).where(Item.external_id.in_(ids)))}
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for external_id in ids:
        item = items.get(external_id)
        path = image_of(item) if item is not None else None
        if path is None:
            reference.skipped.append(f"{external_id}: no image")
            continue
        mask_path = None
        mask = reference.masks.get(external_id)
        if mask is not None:
            with Image.open(path) as im:
                size = im.size
            if mask.shape != (size[1], size[0]):
                reference.skipped.append(f"{external_id}: the lesion mask is not the image's size")
            else:
                mask_path = folder / f"{external_id}_segmentation.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        dx = str(reference.posteriors.loc[external_id].idxmax())
        data = item.data if item is not None else {}
        lesion_id, split_key = lesion_group(external_id, data)
        records.append({
            "image_id": external_id, "lesion_id": lesion_id, "split_key": split_key, "image_path": str(path),
            "mask_path": str(mask_path) if mask_path else None, "dx": dx, "bcc": int(dx == "bcc"),
            "age": data.get("age"), "sex": data.get("sex"),
            "localization": data.get("site", data.get("localization")), "has_patterns": False,
            **dict.fromkeys(PATTERN_KEYS, np.nan),
        })  # fmt: skip
    return pd.DataFrame(records)


# ----------------------------------------------------------------------------------------- scoring
def mean_dice(segnet_path: Path, table: pd.DataFrame) -> float:
    """Mean Dice of a U-Net's masks against the reference masks of ``table`` (rows with a mask)."""
    from model.lesion.evaluate_seg import predict_row_masks
    from model.lesion.masks import dice
    from model.lesion.segmentation import load_segnet

    rows = table[table["mask_path"].notna()]
    if rows.empty:
        return math.nan
    model, meta = load_segnet(segnet_path)
    scores = []
    for predicted, mask_path in zip(predict_row_masks(model, meta, rows), rows["mask_path"], strict=True):
        with Image.open(mask_path) as im:
            scores.append(dice(predicted, np.asarray(im.convert("L")) > 127))
    return float(np.mean(scores))


def diagnosis_loss(dual_path: Path, table: pd.DataFrame, posteriors: pd.DataFrame) -> float:
    """Cross-entropy of a classifier's seven-class probabilities against the Dawid-Skene posteriors."""
    from torch.utils.data import DataLoader

    from model.lesion.train_dual import DualDataset, collate, load_dual, predict

    if table.empty:
        return math.nan
    model, meta = load_dual(dual_path)
    cfg = meta["config"]
    loader = DataLoader(
        DualDataset(table, int(cfg["image_size"]), int(cfg["lesion_size"])), batch_size=32, collate_fn=collate
    )
    p = np.clip(predict(model, loader)["probs"], 1e-6, 1.0)
    target = posteriors.loc[table["image_id"], list(HAM_CLASSES)].to_numpy(float)
    return float(-(target * np.log(p)).sum(1).mean())


# ----------------------------------------------------------------------------------------- the job
def retrain_lesion(
    session: Session,
    model_dir: Path,
    out: Path,
    image_of: Callable[[Item], Path | None],
    is_validation: Callable[[str], bool],
    params: Mapping[str, Any],
    threads: int,
    note: Callable[[str], None],
) -> dict[str, Any]:
    """Fine-tune the promoted pair on the consensus; promote what is not worse. Returns the outcome
    (also written to ``out/lesion.json``).

    Raises:
        ValueError: no promoted pair, no HAM10000 diagnosis, or too few items to train.
    """
    from model.lesion.segmentation import load_segnet
    from model.lesion.train_dual import DualConfig, train_dual
    from model.lesion.train_seg import SegTrainConfig, train_seg

    parent = registry.promoted(session, registry.LESION)
    if parent is None:
        raise ValueError("no lesion pair is promoted: `dermassist models promote-lesion SEGNET DUAL` first")
    parent_seg, parent_dual = Path(parent.path) / SEG_FILE, Path(parent.path) / DUAL_FILE
    reference = lesion_reference(session)
    session.commit()  # the consensus run is kept whatever becomes of the training
    note(f"lesion: consensus run {reference.run.id} ({reference.run.method})")
    table = reference_table(session, reference, image_of, out / "reference-masks")
    if reference.skipped:
        note(f"lesion: {len(reference.skipped)} answer(s) or item(s) left out: {reference.skipped[:5]}")
    if table.empty:
        raise ValueError("no item with a HAM10000 consensus has a usable image")
    # A patient's (or a lesion's) images all on one side.
    val = table.pop("split_key").map(is_validation).to_numpy(bool)
    train, validation = table[~val].reset_index(drop=True), table[val].reset_index(drop=True)
    note(
        f"lesion: Dawid-Skene diagnoses of {len(table)} items from {reference.n_raters} raters, "
        f"STAPLE masks of {int(table['mask_path'].notna().sum())}; {len(train)} training, "
        f"{len(validation)} validation items"
    )
    if len(train) < 5:
        raise ValueError(f"lesion: only {len(train)} training items with a consensus and an image: too few")
    epochs = int(params.get("lesion_epochs", params.get("epochs", 3)))
    steps = params.get("max_steps_per_epoch")
    outcome: dict[str, Any] = {"n_train": len(train), "n_validation": len(validation)}

    # The U-Net: trained on the items with a STAPLE mask.
    new_seg: Path | None = None
    with_masks = train[train["mask_path"].notna()]
    if with_masks["lesion_id"].nunique() >= 5:
        seg_meta = load_segnet(parent_seg)[1]
        seg_config = SegTrainConfig(
            out=str(out / "segnet"),
            weights=str(parent_seg),
            image_size=int(seg_meta.input_size),
            epochs=epochs,
            batch_size=int(params.get("batch_size", 8)),
            threads=threads,
            max_steps_per_epoch=steps,
            warmup_steps=0,
            progress=False,
        )
        seg = train_seg(seg_config, with_masks)
        new_seg = seg.best
        outcome["segnet"] = {"candidate_dice": mean_dice(new_seg, validation),
                             "promoted_dice": mean_dice(parent_seg, validation)}  # fmt: skip
    else:
        note("lesion: fewer than five outlined training items: the U-Net is kept as it is")

    dual = train_dual(
        DualConfig(data="-", out=str(out / "dual"), weights=str(parent_dual), epochs=epochs,
                   batch_size=int(params.get("batch_size", 8)), threads=threads, max_steps_per_epoch=steps,
                   progress=False),
        train,
    )  # fmt: skip
    new_dual = Path(dual["best"])
    outcome["dual"] = {
        "candidate_loss": diagnosis_loss(new_dual, validation, reference.posteriors),
        "promoted_loss": diagnosis_loss(parent_dual, validation, reference.posteriors),
    }

    def not_worse(candidate: float, promoted: float, higher_is_better: bool) -> bool:
        if math.isnan(promoted):  # nothing to compare on (no validation item): keep the trained one
            return True
        if math.isnan(candidate):
            return False
        return candidate >= promoted if higher_is_better else candidate <= promoted

    take_seg = new_seg is not None and not_worse(
        outcome["segnet"]["candidate_dice"], outcome["segnet"]["promoted_dice"], True
    )
    take_dual = not_worse(outcome["dual"]["candidate_loss"], outcome["dual"]["promoted_loss"], False)
    outcome["promoted"] = {"segnet": take_seg, "dual": take_dual}
    if take_seg or take_dual:
        promoted = promote_pair(
            session,
            model_dir,
            new_seg if take_seg and new_seg else parent_seg,
            new_dual if take_dual else parent_dual,
            metrics=outcome,
            consensus_run_id=reference.run.id,
        )
        session.commit()
        outcome["version"] = promoted.version
    (out / "lesion.json").write_text(json.dumps(outcome, indent=2, default=float))
    note(f"lesion: {json.dumps(outcome, default=float)}")
    return outcome
