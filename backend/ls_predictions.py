"""Model outputs -> Label Studio prediction JSON for the project's own labeling config.

One prediction per task (``{"result": [...], "score": float, "model_version": str}``):

- the diagnosis control gets one choice, BCC when the calibrated BCC probability reaches its
  threshold, else non-BCC; its ``score`` is the probability of the chosen value;
- the patterns control gets every pattern whose probability reaches its threshold (the control's
  ``model_score_threshold`` or ``MODEL_SCORE_THRESHOLD`` overrides the checkpoint's per-output
  thresholds); its ``score`` is the lowest probability among them;
- the regions control gets, for each predicted pattern it offers, one brush mask from that pattern's
  Grad-CAM map at the image's original size (the map resized as pytorch-grad-cam does, kept where it
  is at least half its maximum, see :func:`model.explain.cam_to_mask`), in Label Studio's RLE, with
  ``original_width`` / ``original_height``; its ``score`` is the pattern's probability;
- the task ``score`` is the model's **confidence in its diagnosis**: the calibrated probability of the
  diagnosis it chose (BCC: p, non-BCC: 1 - p), between 0 and 1. Sorting tasks by prediction score
  ascending in Label Studio's data manager therefore puts the most uncertain first: the
  active-learning queue.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from numpy.typing import NDArray

from backend.predictor import ImageOutput
from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS, TARGETS
from labeling_config.parse import NON_BCC_KEY, ProjectConfig, Role
from model.explain import cam_to_mask

#: Roles the BCC model fills.
MODEL_ROLES = (Role.DIAGNOSIS, Role.PATTERNS, Role.REGIONS)
MASK_THRESHOLD = 0.5


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
) -> dict[str, Any]:
    """The Label Studio prediction of one task."""
    result: list[dict[str, Any]] = []
    p_bcc = output.probs[DIAGNOSIS_KEY]
    diagnosis = config.diagnosis
    t_bcc = threshold_for(DIAGNOSIS_KEY, thresholds, diagnosis.threshold if diagnosis else None, override)
    is_bcc = p_bcc >= t_bcc
    confidence = p_bcc if is_bcc else 1.0 - p_bcc
    if diagnosis is not None:
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
        offered = (patterns is not None and key in patterns.values) or (
            regions is not None and key in regions.values
        )
        if not offered:
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
        for key in predicted:
            if key not in regions.values:
                continue
            mask = cam_to_mask(output.maps[index[key]], width, height, threshold=MASK_THRESHOLD)
            if not mask.any():
                continue
            result.append(
                brush_item(regions.name, regions.to_name, regions.values[key], mask, output.probs[key])
            )
    return {"result": result, "score": round(confidence, 6), "model_version": model_version}


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
            "rle": [int(v) for v in mask2rle(np.asarray(mask).astype(bool).astype(np.uint8) * 255)],  # type: ignore[no-untyped-call]
            "brushlabels": [label],
        },
    }
    if score is not None:
        item["score"] = round(float(score), 6)
    return item


def empty_prediction(model_version: str, reason: str) -> dict[str, Any]:
    """The prediction of a task whose image could not be used: no result items, the reason beside them."""
    return {"result": [], "score": None, "model_version": model_version, "error": reason}
