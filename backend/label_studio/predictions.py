"""Model outputs -> Label Studio prediction JSON for the project's own labeling config.

One prediction per task (``{"result": [...], "score": float, "model_version": str}``):

- the diagnosis control gets one choice, BCC when the calibrated BCC probability reaches its
  threshold, else non-BCC; its ``score`` is the probability of the chosen value;
- the patterns control gets every pattern whose probability reaches its threshold (the control's
  ``model_score_threshold`` or ``MODEL_SCORE_THRESHOLD`` overrides the checkpoint's per-output
  thresholds); its ``score`` is the lowest probability among them;
- the regions control gets, for each predicted pattern it offers (and for the diagnosis when BCC is
  predicted and the control has a BCC label: the first system's explanation of the diagnosis), one
  brush mask from that output's Grad-CAM map at the image's original size: the map inside the lesion
  mask (the U-Net's, where the lesion model is available), rescaled to its maximum there, kept where it
  is at least half that maximum, only the piece holding the maximum, at most ``REGION_MAX_SHARE`` of the
  lesion (:func:`model.common.maps.compact_region`), in Label Studio's RLE with ``original_width`` /
  ``original_height``; its ``score`` is the output's probability;
- only outputs validated on real images are pre-annotated (``model.common.provenance``; ``SHOW_OUTPUTS=all``
  shows every output): a head that never saw a labelled dermoscopic image is left out rather than shown
  to a dermatologist as if it knew, because Label Studio draws every prediction item alike;
- the task ``score`` is the model's **confidence in its diagnosis**: the calibrated probability of the
  diagnosis it chose (BCC: p, non-BCC: 1 - p), between 0 and 1. Sorting tasks by prediction score
  ascending in Label Studio's data manager therefore puts the most uncertain first: the
  active-learning queue.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from backend.label_studio.brush import mask_to_rle
from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS, TARGETS
from labeling_config.parse import NON_BCC_KEY, ProjectConfig, Role
from model.common.maps import compact_region
from model.common.provenance import shown


class ImageOutput(Protocol):
    """What the BCC model says of one image (:class:`backend.serving.multitask.ImageOutput`)."""

    @property
    def probs(self) -> dict[str, float]: ...  # target key -> calibrated probability

    @property
    def maps(self) -> Any: ...  # (K, h, w) Grad-CAM maps at feature resolution, in target order


#: Roles the BCC model fills.
MODEL_ROLES = (Role.DIAGNOSIS, Role.PATTERNS, Role.REGIONS)
MASK_THRESHOLD = 0.5
REGION_MAX_SHARE = 0.3  # a drawn region covers at most this share of the lesion (of the image without one)


def threshold_for(
    key: str, thresholds: dict[str, float], control_threshold: float | None, override: float | None
) -> float:
    """One output's decision threshold: the control's attribute, else the setting, else the checkpoint's."""
    if control_threshold is not None:
        return control_threshold
    if override is not None:
        return override
    return float(thresholds.get(key, 0.5))


def task_prediction(
    output: ImageOutput,
    config: ProjectConfig,
    model_version: str,
    width: int,
    height: int,
    thresholds: dict[str, float],
    override: float | None = None,
    provenance: Mapping[str, Mapping[str, Any]] | None = None,
    outline: Callable[[], NDArray[np.bool_] | None] | None = None,
) -> dict[str, Any]:
    """The Label Studio prediction of one task.

    Args:
        provenance: where each output comes from (``model.common.provenance``); when given, only outputs
            validated on real images are pre-annotated, the others are left out (None: every output).
        outline: gives the lesion mask at the image's size (the U-Net's), inside which regions are
            drawn; called only when a region is (segmenting costs more than the BCC model's pass).
    """

    def offered(key: str) -> bool:
        return provenance is None or shown(provenance, key)

    result: list[dict[str, Any]] = []
    p_bcc = output.probs[DIAGNOSIS_KEY]
    diagnosis = config.diagnosis
    t_bcc = threshold_for(DIAGNOSIS_KEY, thresholds, diagnosis.threshold if diagnosis else None, override)
    is_bcc = p_bcc >= t_bcc
    confidence = p_bcc if is_bcc else 1.0 - p_bcc
    diagnosed = offered(DIAGNOSIS_KEY)  # else no diagnosis, no BCC region and no task score
    if diagnosed and diagnosis is not None:
        key = DIAGNOSIS_KEY if is_bcc else NON_BCC_KEY
        if key in diagnosis.values:
            result.append(
                {
                    "from_name": diagnosis.name,
                    "to_name": diagnosis.to_name,
                    "type": "choices",
                    "value": {"choices": [diagnosis.values[key]]},
                    "score": round(confidence, 6),
                }
            )

    patterns = config.patterns
    regions = config.regions
    predicted: list[str] = []
    for key in PATTERN_KEYS:
        in_config = (patterns is not None and key in patterns.values) or (
            regions is not None and key in regions.values
        )
        if not in_config or not offered(key):
            continue
        control = patterns if patterns is not None and key in patterns.values else regions
        t = threshold_for(key, thresholds, control.threshold if control else None, override)
        if output.probs[key] >= t:
            predicted.append(key)
    if patterns is not None:
        chosen = [k for k in predicted if k in patterns.values]
        if chosen:
            result.append(
                {
                    "from_name": patterns.name,
                    "to_name": patterns.to_name,
                    "type": "choices",
                    "value": {"choices": [patterns.values[k] for k in chosen]},
                    "score": round(min(output.probs[k] for k in chosen), 6),
                }
            )
    if regions is not None:
        index = {k: i for i, k in enumerate(TARGETS)}
        drawn = [DIAGNOSIS_KEY] if is_bcc and diagnosed else []
        drawn = [key for key in drawn + predicted if key in regions.values]
        lesion = outline() if drawn and outline is not None else None
        for key in drawn:
            mask = compact_region(
                output.maps[index[key]], width, height, lesion, MASK_THRESHOLD, REGION_MAX_SHARE
            )
            if not mask.any():
                continue
            result.append(
                brush_item(regions.name, regions.to_name, regions.values[key], mask, output.probs[key])
            )
    score = round(confidence, 6) if diagnosed else None
    return {"result": result, "score": score, "model_version": model_version}


def brush_item(
    from_name: str, to_name: str, label: str, mask: NDArray[Any], score: float | None = None
) -> dict[str, Any]:
    """A Label Studio brush result: ``mask`` (H, W, truthy = painted) as RLE at its own size."""
    height, width = mask.shape
    item: dict[str, Any] = {
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask_to_rle(mask),
            "brushlabels": [label],
        },
    }
    if score is not None:
        item["score"] = round(float(score), 6)
    return item


def empty_prediction(model_version: str, reason: str) -> dict[str, Any]:
    """The prediction of a task whose image could not be used: no result items, the reason beside them."""
    return {"result": [], "score": None, "model_version": model_version, "error": reason}
