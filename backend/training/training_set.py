"""A job's training set: the items with consensus and an image, and the fixed validation split.

The validation split is the same for every job, whatever was added since: an item belongs to it when
its id hashes into the last fifth (:func:`is_validation`). Images come from a study folder (the CLI's
``--images``) or from Label Studio through the same guarded fetcher as ``/predict``
(:class:`ImageSource`).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.settings import Settings
from consensus.groups import lesion_group as lesion_group  # lesion.py and the tests read it here
from consensus.models import Item
from consensus.repository import consensus_table
from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS, TARGETS
from model.common.data import IMAGE_SUFFIXES
from model.common.files import atomic_write_bytes

VALIDATION_BUCKETS = 5  # one item in five, by a hash of its id, validates every job


def is_validation(external_id: str) -> bool:
    """Whether an item (or a lesion, or a patient: the key :func:`lesion_group` gives) belongs to the
    fixed validation split (stable across jobs and machines)."""
    digest = hashlib.sha256(external_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % VALIDATION_BUCKETS == 0


@dataclass
class TrainingSet:
    """Items with consensus and an image, split into training and the fixed validation part."""

    table: pd.DataFrame  # model.common.data.load_table's columns
    targets: pd.DataFrame  # soft targets (posterior of 1), index image_id
    validation: pd.DataFrame
    validation_targets: pd.DataFrame


def _local_image(folder: Path, external_id: str) -> Path | None:
    for sub in (folder / "images", folder):
        for suffix in IMAGE_SUFFIXES:
            path = sub / f"{external_id}{suffix}"
            if path.is_file():
                return path
    return None


class ImageSource:
    """Where a job finds an item's image: a study folder (the CLI's ``--images``), else Label Studio
    through the same guarded fetcher as ``/predict``, kept under ``MODEL_DIR/cache/images`` by content
    hash. Call it with an item: the image's path, or None with the reason in ``last_error``."""

    def __init__(self, settings: Settings, images: Path | None) -> None:
        from backend.images import ImageFetcher

        self.images = images
        self.cache = Path(settings.model_dir) / "cache" / "images"
        self.fetcher = ImageFetcher(settings) if images is None else None
        self.last_error = ""

    def __call__(self, item: Item) -> Path | None:
        from backend.images import ImageError

        self.last_error = "no image"
        if self.images is not None:
            return _local_image(self.images, item.external_id)
        if not item.image or self.fetcher is None:
            return None
        # Fetched again for every job and kept under its content hash: a file replaced behind the
        # same URL is never trained on stale.
        try:
            loaded = self.fetcher.fetch(item.image)
        except ImageError as exc:
            self.last_error = str(exc)
            return None
        path = self.cache / f"{loaded.sha256}.png"
        if not path.is_file():
            png = io.BytesIO()
            loaded.image.save(png, format="PNG")
            atomic_write_bytes(path, png.getvalue())
        return path


def build_training_set(
    session: Session, run_id: int, settings: Settings, images: Path | None, log: list[str]
) -> TrainingSet:
    """Consensus posteriors + images -> the tables :func:`model.multitask.train.train` reads.

    Images come from ``images`` (a study folder, the CLI's ``--images``) when given, else from Label
    Studio through the same guarded fetcher as ``/predict``, kept under ``MODEL_DIR/cache/images``
    by content hash.
    """
    from consensus.models import ConsensusRun

    run = session.get(ConsensusRun, run_id)
    if run is None:
        raise ValueError(f"consensus run {run_id} not found")
    long = consensus_table(session, run)
    long["p1"] = np.where(long["value"] == "1", long["posterior"], 1.0 - long["posterior"])
    wide = long.pivot_table(index="task", columns="label_key", values="p1", aggfunc="first")
    if DIAGNOSIS_KEY not in wide.columns:
        raise ValueError("the consensus has no diagnosis: no rater answered BCC / non-BCC yet")
    wide = wide[wide[DIAGNOSIS_KEY].notna()]
    items = {
        i.external_id: i for i in session.scalars(select(Item).where(Item.external_id.in_(list(wide.index))))
    }
    source = ImageSource(settings, images)
    rows: list[dict[str, Any]] = []
    keys: list[str] = []  # each row's side of the split: its patient, else its lesion
    skipped: list[str] = []
    for external_id, probs in wide.iterrows():
        item = items.get(str(external_id))
        path = source(item) if item is not None else None
        if path is None:
            skipped.append(f"{external_id}: {source.last_error if item is not None else 'no image'}")
            continue
        lesion_id, split_key = lesion_group(str(external_id), item.data if item is not None else None)
        keys.append(split_key)
        row: dict[str, Any] = {
            "image_id": str(external_id),
            "lesion_id": lesion_id,
            "image_path": str(path),
            "mask_path": None,
            DIAGNOSIS_KEY: int(probs[DIAGNOSIS_KEY] >= 0.5),
        }
        known = [k for k in PATTERN_KEYS if k in probs.index and not math.isnan(probs[k])]
        row["has_patterns"] = len(known) == len(PATTERN_KEYS)
        for key in PATTERN_KEYS:
            row[key] = int(probs[key] >= 0.5) if key in known else np.nan
        rows.append(row)
    if skipped:
        log.append(f"{len(skipped)} item(s) without a usable image: {skipped[:5]}")
    if not rows:
        raise ValueError("no consensus item has a usable image")
    table = pd.DataFrame(rows)
    targets = wide.reindex(columns=[k for k in TARGETS if k in wide.columns]).loc[table["image_id"]]
    targets.index.name = "image_id"
    val = np.array([is_validation(key) for key in keys], dtype=bool)
    return TrainingSet(
        table=table[~val].reset_index(drop=True),
        targets=targets[~val],
        validation=table[val].reset_index(drop=True),
        validation_targets=targets[val],
    )
