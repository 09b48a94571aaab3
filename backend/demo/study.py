"""A synthetic study played through a live Label Studio: tasks, predictions, simulated dermatologists.

Used by ``dermassist demo`` and the end-to-end tests, so both drive Label Studio the same way: through
label-studio-sdk's client (:func:`backend.label_studio.client.connect`). Call these inside
:func:`backend.label_studio.client.label_studio_errors` for one-line errors.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from labeling_config import HAM_CLASSES, LESION_LABEL, PATTERNS

if TYPE_CHECKING:
    from backend.label_studio.sdk import LabelStudioApi

DISPLAY = {p.key: p.display for p in PATTERNS}
T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, every: float = 0.5) -> T:
    """Poll ``condition`` until it returns something truthy.

    Raises:
        TimeoutError: naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def image_id_of(ref: str) -> str:
    """The study's image id from a task's image reference (uploads are renamed ``<8 hex>-<name>``)."""
    name = ref.rsplit("/", 1)[-1].rsplit("=", 1)[-1]
    name = re.sub(r"^[0-9a-f]{8}-", "", name)
    return name.rsplit(".", 1)[0]


def tasks(ls: LabelStudioApi, project: int) -> list[dict[str, Any]]:
    """Every task of a project, as Label Studio's JSON (``id``, ``data``, ...)."""
    pager: Iterable[Any] = ls.tasks.list(project=project, page_size=1000)  # the SDK's pager is untyped
    return [task.dict() for task in pager]


def predictions(ls: LabelStudioApi, project: int) -> list[dict[str, Any]]:
    """Every prediction of a project, as Label Studio's JSON (``task``, ``result``, ``score``, ...)."""
    return [prediction.dict() for prediction in ls.predictions.list(project=project)]


def retrieve_predictions(ls: LabelStudioApi, project: int, task_ids: list[int] | None = None) -> None:
    """Label Studio's "Retrieve predictions" action, for every task or the given ones."""
    from label_studio_sdk.actions.types import (
        PrepareParamsRequestRequestSelectedItemsExcluded as Excluded,
    )
    from label_studio_sdk.actions.types import (
        PrepareParamsRequestRequestSelectedItemsIncluded as Included,
    )

    selected = (
        Excluded.model_validate({"all": True, "excluded": []})
        if task_ids is None
        else Included.model_validate({"all": False, "included": task_ids})
    )
    ls.actions.create(id="retrieve_tasks_predictions", project=project, selected_items=selected)


def rater_result(
    study: Path, rater: str, image_id: str, values: dict[str, int], size: int
) -> list[dict[str, Any]]:
    """One simulated dermatologist's annotation of an image: diagnosis, patterns, their painted regions."""
    from backend.label_studio.predictions import brush_item

    result: list[dict[str, Any]] = [
        {
            "from_name": "diagnosis",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["BCC" if values["bcc"] else "non-BCC"]},
        }
    ]
    chosen = [k for k in DISPLAY if values.get(k)]
    if chosen:
        result.append(
            {
                "from_name": "patterns",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [DISPLAY[k] for k in chosen]},
            }
        )
    for key in chosen:
        path = study / "regions" / rater / f"{image_id}_{key}.png"
        if not path.is_file():
            continue
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) > 127
        if mask.shape != (size, size):
            raise ValueError(f"{path} is {mask.shape[::-1]}, its image {size}x{size}")
        result.append(brush_item("regions", "image", DISPLAY[key], mask))
    return result


def lesion_result(diagnosis: str, mask: np.ndarray[Any, Any] | None) -> list[dict[str, Any]]:
    """One rater's ``lesion.xml`` annotation: the HAM10000 diagnosis and the lesion outline (if any)."""
    from backend.label_studio.predictions import brush_item

    result: list[dict[str, Any]] = [
        {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [diagnosis]}}
    ]
    if mask is not None and mask.any():
        result.append(brush_item("lesion", "image", LESION_LABEL, mask))
    return result


def lesion_ratings(
    study: Path, n_raters: int = 3, accuracy: float = 0.8, seed: int = 0
) -> list[tuple[str, str, str, np.ndarray[Any, Any]]]:
    """Simulated dermatologists on ``lesion.xml`` for a synthetic study: ``(image id, rater, diagnosis,
    mask)`` rows. The study's true class is "bcc" for BCC images and one of the six others (by image)
    otherwise; each rater names it with probability ``accuracy``, else another class, and outlines
    the true lesion shifted by a few pixels."""
    labels = pd.read_csv(study / "labels.csv", dtype={"image_id": str})
    others = [c for c in HAM_CLASSES if c != "bcc"]
    rng = np.random.default_rng(seed)
    rows = []
    for k, row in enumerate(labels.itertuples()):
        truth = "bcc" if row.bcc else others[k % len(others)]
        with Image.open(study / "masks" / str(row.mask)) as im:
            mask = np.asarray(im.convert("L")) > 127
        for r in range(n_raters):
            said = (
                truth if rng.random() < accuracy else str(rng.choice([c for c in HAM_CLASSES if c != truth]))
            )
            dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
            rows.append(
                (str(row.image_id), f"dermatologist_{r + 1}", said, np.roll(mask, (dy, dx), axis=(0, 1)))
            )
    return rows


def create_raters(ls: LabelStudioApi, names: list[str], domain: str = "derm.example") -> list[int]:
    """One Label Studio user per simulated dermatologist; returns their user ids."""
    ids = []
    for name in names:
        user = ls.users.create(
            email=f"{name}@{domain}", username=name, first_name=name, password="derm-pass-12345"
        )
        if user.id is None:
            raise RuntimeError(f"Label Studio created the user {name} without an id")
        ids.append(user.id)
    return ids


def annotate(
    ls: LabelStudioApi,
    study: Path,
    by_image: dict[str, int],
    users: dict[str, int],
    size: int,
    before_each: Callable[[int], None] | None = None,
    raters: Collection[str] | None = None,
) -> int:
    """Every rating of ``study/ratings.csv`` for the given images, as that rater's Label Studio annotation.

    Args:
        by_image: image id -> task id (only these images are annotated).
        users: rater name -> Label Studio user id.
        before_each: called with the running count before each annotation (the tests kill the backend).
        raters: only these raters' ratings (default: every rater's).

    Returns:
        How many annotations were created.
    """
    ratings = pd.read_csv(study / "ratings.csv", dtype={"image_id": str})
    ratings = ratings[ratings["image_id"].isin(list(by_image))]
    if raters is not None:
        ratings = ratings[ratings["rater"].isin(list(raters))]
    count = 0
    for (image_id, rater), rows in ratings.groupby(["image_id", "rater"], sort=True):
        values = dict(zip(rows["label"], rows["value"].astype(int), strict=True))
        if "bcc" not in values:
            continue
        if before_each is not None:
            before_each(count)
        ls.annotations.create(
            id=by_image[str(image_id)],
            completed_by=users[str(rater)],
            result=rater_result(study, str(rater), str(image_id), values, size),
        )
        count += 1
    return count
