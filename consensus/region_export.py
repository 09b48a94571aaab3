"""A run's pattern-region consensus for a study: PNG masks, a table of regions, the raters' region rates.

The masks are those :func:`consensus.service.run_consensus` stored (label keys ``region:<pattern>``,
:mod:`consensus.regions`). Files, under the folder given:

- ``regions/<image_id>_<pattern>.png``: one 8-bit greyscale PNG per image and pattern with a consensus
  region, 255 inside, 0 outside, at the image's size (the naming of the ISIC 2018 attribute masks);
- ``region_consensus.csv``: ``image_id, pattern, height, width, area, posterior, n_raters, raters,
  method, png`` (``area`` the region's share of the image, ``posterior`` the mean consensus posterior
  over the region's pixels; an empty consensus region has no PNG);
- ``region_reliability.csv``: per pattern and rater, STAPLE's pixel-pooled sensitivity / specificity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from consensus.models import ConsensusLabel, ConsensusMask, ConsensusRun, Item, Rater, RaterReliability
from consensus.regions import REGION_PREFIX
from consensus.repository import unpack_mask

REGION_COLUMNS = (
    "image_id",
    "pattern",
    "height",
    "width",
    "area",
    "posterior",
    "n_raters",
    "raters",
    "method",
    "png",
)


def region_masks(session: Session, run: ConsensusRun) -> dict[str, dict[str, NDArray[np.bool_]]]:
    """A run's pattern-region consensus: image id -> pattern key -> mask (empty regions included)."""
    rows = session.execute(
        select(Item.external_id, ConsensusMask.label_key, ConsensusMask.mask, ConsensusMask.height,
               ConsensusMask.width)
        .join(Item, ConsensusMask.item_id == Item.id)
        .where(ConsensusMask.run_id == run.id, ConsensusMask.label_key.startswith(REGION_PREFIX))
        .order_by(Item.external_id, ConsensusMask.label_key)
    ).all()  # fmt: skip
    out: dict[str, dict[str, NDArray[np.bool_]]] = {}
    for task, key, data, height, width in rows:
        out.setdefault(task, {})[key.removeprefix(REGION_PREFIX)] = unpack_mask(data, height, width)
    return out


def png_name(image_id: str, pattern: str) -> str:
    """The PNG of one consensus region: ``<image_id>_<pattern>.png``."""
    return f"{image_id}_{pattern}.png"


def write_region_pngs(masks: dict[str, dict[str, NDArray[np.bool_]]], folder: Path) -> list[Path]:
    """One 0 / 255 greyscale PNG per non-empty region, ``folder/<image_id>_<pattern>.png``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for image_id, by_pattern in masks.items():
        for pattern, mask in by_pattern.items():
            if not mask.any():
                continue
            path = folder / png_name(image_id, pattern)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
            written.append(path)
    return written


def region_table(session: Session, run: ConsensusRun) -> pd.DataFrame:
    """One row per image and pattern with a region consensus (:data:`REGION_COLUMNS`)."""
    rows = session.execute(
        select(Item.external_id, ConsensusMask.label_key, ConsensusMask.mask, ConsensusMask.height,
               ConsensusMask.width, ConsensusMask.raters, ConsensusMask.details, ConsensusLabel.probabilities)
        .join(Item, ConsensusMask.item_id == Item.id)
        .join(ConsensusLabel, (ConsensusLabel.run_id == ConsensusMask.run_id)
              & (ConsensusLabel.item_id == ConsensusMask.item_id)
              & (ConsensusLabel.label_key == ConsensusMask.label_key))
        .where(ConsensusMask.run_id == run.id, ConsensusMask.label_key.startswith(REGION_PREFIX))
        .order_by(Item.external_id, ConsensusMask.label_key)
    ).all()  # fmt: skip
    records = []
    for task, key, data, height, width, raters, details, probabilities in rows:
        mask = unpack_mask(data, height, width)
        pattern = key.removeprefix(REGION_PREFIX)
        records.append({
            "image_id": task, "pattern": pattern, "height": height, "width": width,
            "area": float(mask.mean()), "posterior": probabilities.get("1"), "n_raters": len(raters),
            "raters": ";".join(map(str, raters)), "method": details.get("method"),
            "png": f"regions/{png_name(task, pattern)}" if mask.any() else None,
        })  # fmt: skip
    return pd.DataFrame(records, columns=list(REGION_COLUMNS))


def region_reliability(session: Session, run: ConsensusRun) -> pd.DataFrame:
    """Per pattern and rater: the pixel-pooled region sensitivity / specificity and the images pooled."""
    rows = session.execute(
        select(RaterReliability.label_key, Rater.name, RaterReliability.sensitivity,
               RaterReliability.specificity, RaterReliability.n_items)
        .join(Rater, RaterReliability.rater_id == Rater.id)
        .where(RaterReliability.run_id == run.id, RaterReliability.label_key.startswith(REGION_PREFIX))
        .order_by(RaterReliability.label_key, Rater.name)
    ).all()  # fmt: skip
    return pd.DataFrame(
        [(k.removeprefix(REGION_PREFIX), *rest) for k, *rest in rows],
        columns=["pattern", "rater", "sensitivity", "specificity", "n_images"],
    )


def write_region_export(session: Session, run: ConsensusRun, folder: Path) -> list[Path]:
    """The PNGs, ``region_consensus.csv`` and ``region_reliability.csv`` under ``folder``; the paths.

    A run without region consensus writes the two tables with their headers only.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = write_region_pngs(region_masks(session, run), folder / "regions")
    for name, frame in (
        ("region_consensus.csv", region_table(session, run)),
        ("region_reliability.csv", region_reliability(session, run)),
    ):
        frame.to_csv(folder / name, index=False)
        written.append(folder / name)
    return written
