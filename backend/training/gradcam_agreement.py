"""Does the model look where the dermatologists painted? Grad-CAM against the consensus regions.

For one consensus run (its pattern regions, STAPLE over the raters' painted masks: :mod:`consensus.regions`)
and one served model version, every image with a non-empty consensus region goes through the served
model once (:func:`backend.serving.multitask.run_batch`: probabilities and one Grad-CAM map per output from
the same pass); each pattern's map, scaled to the image's size as the backend scales the maps it paints
(:func:`model.common.maps.scale_maps`), is scored against that pattern's consensus region by
:func:`model.common.agreement.spatial_agreement`: energy inside, pointing game, IoU of the map
thresholded at ``threshold`` of its maximum, and the region's area share (energy inside's chance level).

Per pattern: the number of images, and the mean of each figure over images with a 95% percentile
bootstrap interval (:func:`model.common.metrics.bootstrap_means`) that resamples patients, or lesions,
whole where the tasks' data name them (``patient_id``, ``lesion_id``: :func:`consensus.groups.lesion_group`),
else images; ``resampled`` and ``n_groups`` say which and how many. An empty consensus
region (the raters' STAPLE found nothing) is not scored: there is nothing to point at. By default only
images whose Dawid-Skene consensus says the pattern is present are scored (``present_only``): STAPLE
alone, given one rater's stray stroke and the others' empty masks, can settle on that stroke (a fixed
point with that rater's sensitivity 1 and the others' 0, as ITK's filter does too), and a map should not
be judged against a region the raters as a whole say is not there. A map with no positive value (flat)
puts no energy inside (0) and points nowhere (a miss).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.serving.multitask import BATCH_SIZE, ServedModel, run_batch
from consensus.groups import lesion_group
from consensus.models import ConsensusRun, Item
from consensus.region_export import region_masks
from consensus.repository import consensus_table
from model.common.agreement import spatial_agreement
from model.common.maps import scale_maps
from model.common.metrics import bootstrap_means

logger = logging.getLogger(__name__)

FIGURES = ("energy_inside", "pointing", "iou", "area")
SUMMARY_COLUMNS = (
    "model_version",
    "pattern",
    "n_images",
    "resampled",
    "n_groups",
    *(f"{f}{s}" for f in FIGURES for s in ("", "_low", "_high")),
)


@dataclass
class GradcamAgreement:
    """What :func:`gradcam_agreement` measured.

    Attributes:
        per_image: ``image_id, pattern, probability, energy_inside, pointing, iou, area``.
        summary: per pattern, :data:`SUMMARY_COLUMNS` (the model's version in every row).
        skipped: images left out, with why.
    """

    per_image: pd.DataFrame
    summary: pd.DataFrame
    skipped: list[str]


def summarise(
    per_image: pd.DataFrame,
    model_version: str,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Per pattern: images scored, each figure's mean and 95% bootstrap interval over images, or over
    groups of images (``groups``: image id -> its patient's or lesion's key, as
    :func:`consensus.groups.lesion_group` gives; an image not in it is its own group)."""
    rows = []
    for pattern, group in per_image.groupby("pattern", sort=False):
        ids = group["image_id"].astype(str).tolist()
        keys = [(groups or {}).get(i, i) for i in ids]
        unit = (
            "patients"
            if any(k.startswith("patient:") for k in keys)
            else "lesions"
            if keys != ids
            else "images"
        )
        found = bootstrap_means(
            {f: group[f].to_numpy(dtype=float) for f in FIGURES},
            None if unit == "images" else np.asarray(keys, dtype=object),
            n_boot,
            seed,
        )
        row: dict[str, object] = {"model_version": model_version, "pattern": pattern, "n_images": len(group),
                                  "resampled": unit, "n_groups": len(set(keys))}  # fmt: skip
        for f in FIGURES:
            row.update({f: found[f]["mean"], f"{f}_low": found[f]["low"], f"{f}_high": found[f]["high"]})
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def gradcam_agreement(
    session: Session,
    run_id: int,
    served: ServedModel,
    image_of: Callable[[Item], Path | None],
    threshold: float = 0.5,
    tolerance: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
    present_only: bool = True,
) -> GradcamAgreement:
    """The served model's Grad-CAM agreement with a run's consensus regions, per pattern.

    Args:
        session: an open session.
        run_id: a consensus run with pattern regions (``run_consensus(..., decode=...)``).
        served: the model version to score (:func:`backend.serving.multitask.load_served`).
        image_of: an item -> its image file, or None (e.g. a
            :class:`backend.training.training_set.ImageSource`).
        threshold: the map's region for the IoU: pixels at or above this share of its maximum.
        tolerance: the pointing game's tolerance in pixels of the image.
        n_boot: bootstrap replicates for the intervals.
        seed: the bootstrap's seed.
        present_only: score a region only where the run's consensus label of the pattern is present.

    Raises:
        ValueError: no such run, or a run without any non-empty consensus region.
    """
    run = session.get(ConsensusRun, run_id)
    if run is None:
        raise ValueError(f"no consensus run with id {run_id}")
    labels = consensus_table(session, run)
    if present_only:
        labels = labels[labels["value"] == "1"]
    scored = set(labels["task"] + "\t" + labels["label_key"])
    masks = {
        task: {
            k: m
            for k, m in found.items()
            if m.any() and k in served.meta.targets and f"{task}\t{k}" in scored
        }
        for task, found in region_masks(session, run).items()
    }
    masks = {task: found for task, found in masks.items() if found}
    if not masks:
        raise ValueError(
            f"consensus run {run_id} has no non-empty pattern region the model has an output for"
            + (" (of a pattern the consensus says is present)" if present_only else "")
            + ": run the consensus with the raters' painted regions (dermassist consensus run) first"
        )
    items = {i.external_id: i for i in session.scalars(select(Item).where(Item.external_id.in_(list(masks))))}
    skipped: list[str] = []
    records: list[dict[str, object]] = []
    order = sorted(masks)
    for start in range(0, len(order), BATCH_SIZE):
        chunk, images = [], []
        for task in order[start : start + BATCH_SIZE]:
            path = image_of(items[task])
            if path is None:
                skipped.append(f"{task}: no image")
                continue
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
            chunk.append(task)
        for task, image, output in zip(chunk, images, run_batch(served, images), strict=True):
            for pattern, mask in masks[task].items():
                if mask.shape != (image.height, image.width):
                    logger.info(
                        "%s: the %s region is %s, the image %s", task, pattern, mask.shape, image.size
                    )
                k = served.meta.targets.index(pattern)
                height, width = mask.shape
                cam = scale_maps(output.maps[k], (height, width))
                figures = spatial_agreement(cam, mask, threshold, tolerance)
                if np.isnan(figures["energy_inside"]):
                    figures["energy_inside"] = 0.0
                records.append({"image_id": task, "pattern": pattern, "probability": output.probs[pattern],
                                **figures})  # fmt: skip
    columns = ["image_id", "pattern", "probability", *FIGURES]
    per_image = pd.DataFrame(records, columns=columns)
    rank = {k: i for i, k in enumerate(served.meta.targets)}
    per_image = (
        per_image.assign(_rank=per_image["pattern"].map(rank))
        .sort_values(["_rank", "image_id"])
        .drop(columns="_rank")
        .reset_index(drop=True)
    )
    groups = {task: lesion_group(task, items[task].data)[1] for task in order}
    summary = summarise(per_image, served.version, n_boot, seed, groups)
    return GradcamAgreement(per_image, summary, skipped)
