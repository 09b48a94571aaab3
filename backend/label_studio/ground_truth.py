"""The consensus regions as Label Studio brush ground truth.

:func:`backend.label_studio.export.ls_import_tasks` writes one ``ground_truth`` annotation per image with
the consensus diagnosis and patterns; :func:`add_region_ground_truth` adds to it one ``brushlabels``
result per pattern whose consensus region (:mod:`consensus.regions`, STAPLE over the raters' painted
regions) has a pixel, as Label Studio RLE at the image's size, under the project's own brush control
name and label values. Patterns the project's brush control does not offer are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from backend.label_studio.predictions import brush_item
from labeling_config import PATTERN_KEYS, ProjectConfig


def region_results(masks: Mapping[str, NDArray[np.bool_]], config: ProjectConfig) -> list[dict[str, Any]]:
    """Brush results for one image's consensus regions (pattern key -> mask), in the schema's order."""
    regions = config.regions
    if regions is None:
        return []
    return [
        brush_item(regions.name, regions.to_name, regions.values[key], masks[key])
        for key in PATTERN_KEYS
        if key in masks and key in regions.values and bool(np.any(masks[key]))
    ]


def add_region_ground_truth(
    tasks: list[dict[str, Any]],
    masks: Mapping[str, Mapping[str, NDArray[np.bool_]]],
    config: ProjectConfig,
) -> int:
    """Append each task's consensus regions to its ground-truth annotation (in place).

    Args:
        tasks: Label Studio tasks as :func:`backend.label_studio.export.ls_import_tasks` writes them
            (``data.image_id``, one annotation with ``ground_truth: true``).
        masks: image id -> pattern key -> consensus mask (:func:`consensus.region_export.region_masks`).
        config: the target project's labeling config, parsed.

    Returns:
        How many brush results were added.
    """
    added = 0
    for task in tasks:
        found = masks.get(str(task.get("data", {}).get("image_id")))
        if not found:
            continue
        results = region_results(found, config)
        if not results:
            continue
        truth = next((a for a in task.get("annotations", []) if a.get("ground_truth")), None)
        if truth is None:
            truth = {"result": [], "ground_truth": True}
            task.setdefault("annotations", []).append(truth)
        truth["result"].extend(results)
        added += len(results)
    return added
