"""A Label Studio import file with the consensus as ground-truth annotations.

Label Studio imports a JSON list of tasks; each task here carries its image and one annotation marked
``ground_truth`` whose result holds the consensus diagnosis and patterns, written with the control names
and values of the project's own labeling config (mapped by :func:`labeling_config.parse_config`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS, ProjectConfig
from labeling_config.parse import NON_BCC_KEY


def consensus_result(row: pd.Series, config: ProjectConfig) -> list[dict[str, Any]]:
    """Result items for one image's consensus (a row of ``Study.consensus``)."""
    result: list[dict[str, Any]] = []
    diagnosis = config.diagnosis
    if diagnosis is not None and DIAGNOSIS_KEY in row and not pd.isna(row[DIAGNOSIS_KEY]):
        key = DIAGNOSIS_KEY if int(row[DIAGNOSIS_KEY]) == 1 else NON_BCC_KEY
        result.append({
            "from_name": diagnosis.name, "to_name": diagnosis.to_name, "type": "choices",
            "value": {"choices": [diagnosis.values[key]]},
        })  # fmt: skip
    patterns = config.patterns
    if patterns is not None:
        chosen = [
            patterns.values[k] for k in PATTERN_KEYS if k in patterns.values and k in row and row[k] == 1
        ]
        if chosen:
            result.append({
                "from_name": patterns.name, "to_name": patterns.to_name, "type": "choices",
                "value": {"choices": chosen},
            })  # fmt: skip
    return result


def ls_import_tasks(
    consensus: pd.DataFrame,
    config: ProjectConfig,
    images: dict[str, str] | None = None,
    image_template: str = "{id}",
    run_id: int | None = None,
) -> list[dict[str, Any]]:
    """Label Studio tasks, one per image, with the consensus as a ground-truth annotation.

    Args:
        consensus: ``Study.consensus`` (index image_id).
        config: the target project's labeling config, parsed.
        images: image id -> the image reference Label Studio knows (from the store), where known.
        image_template: for the other images, ``{id}`` is replaced by the image id
            (e.g. ``/data/local-files/?d=study/images/{id}.jpg``).
        run_id: the consensus run, recorded in each task's ``meta``.
    """
    images = images or {}
    tasks = []
    for image_id, row in consensus.iterrows():
        key = str(image_id)
        posteriors = {
            c.removesuffix("_posterior"): round(float(row[c]), 6)
            for c in consensus.columns
            if c.endswith("_posterior")
        }
        tasks.append({
            "data": {config.image_key: images.get(key) or image_template.format(id=key), "image_id": key},
            "annotations": [{"result": consensus_result(row, config), "ground_truth": True}],
            "meta": {"dermassist_consensus_run": run_id, "posteriors": posteriors},
        })  # fmt: skip
    return tasks
