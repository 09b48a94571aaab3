"""A synthetic study played through a live Label Studio: tasks, predictions, simulated dermatologists.

Used by ``dermassist demo`` and the end-to-end tests, so both drive Label Studio the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from backend.ls_client import LabelStudioClient
from labeling_config import PATTERNS

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


def tasks(ls: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    body = ls.get_json(f"/api/tasks/?project={project}&page_size=10000")
    found: list[dict[str, Any]] = body["tasks"] if isinstance(body, dict) else body
    return found


def predictions(ls: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    body = ls.get_json(f"/api/predictions/?project={project}")
    found: list[dict[str, Any]] = body if isinstance(body, list) else body.get("results", [])
    return found


def retrieve_predictions(ls: LabelStudioClient, project: int, task_ids: list[int] | None = None) -> None:
    """Label Studio's "Retrieve predictions" action, for every task or the given ones."""
    selected: dict[str, Any] = (
        {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
    )
    ls.post_json(
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}", {"selectedItems": selected}
    )


def rater_result(
    study: Path, rater: str, image_id: str, values: dict[str, int], size: int
) -> list[dict[str, Any]]:
    """One simulated dermatologist's annotation of an image: diagnosis, patterns, their painted regions."""
    from label_studio_sdk.converter.brush import mask2rle

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
            mask = (np.asarray(im.convert("L")) > 127).astype(np.uint8) * 255
        result.append(
            {
                "from_name": "regions",
                "to_name": "image",
                "type": "brushlabels",
                "original_width": size,
                "original_height": size,
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": [int(v) for v in mask2rle(mask)],  # type: ignore[no-untyped-call]
                    "brushlabels": [DISPLAY[key]],
                },
            }
        )
    return result


def create_raters(ls: LabelStudioClient, names: list[str], domain: str = "derm.example") -> list[int]:
    """One Label Studio user per simulated dermatologist; returns their user ids."""
    ids = []
    for name in names:
        user = ls.post_json(
            "/api/users/",
            {
                "email": f"{name}@{domain}",
                "username": name,
                "first_name": name,
                "password": "derm-pass-12345",
            },
        )
        ids.append(int(user["id"]))
    return ids


def annotate(
    ls: LabelStudioClient,
    study: Path,
    by_image: dict[str, int],
    users: dict[str, int],
    size: int,
    before_each: Callable[[int], None] | None = None,
) -> int:
    """Every rating of ``study/ratings.csv`` for the given images, as that rater's Label Studio annotation.

    Args:
        by_image: image id -> task id (only these images are annotated).
        users: rater name -> Label Studio user id.
        before_each: called with the running count before each annotation (the tests kill the backend).

    Returns:
        How many annotations were created.
    """
    ratings = pd.read_csv(study / "ratings.csv", dtype={"image_id": str})
    ratings = ratings[ratings["image_id"].isin(list(by_image))]
    count = 0
    for (image_id, rater), rows in ratings.groupby(["image_id", "rater"], sort=True):
        values = dict(zip(rows["label"], rows["value"].astype(int), strict=True))
        if "bcc" not in values:
            continue
        if before_each is not None:
            before_each(count)
        ls.post_json(
            f"/api/tasks/{by_image[str(image_id)]}/annotations/",
            {
                "completed_by": users[str(rater)],
                "result": rater_result(study, str(rater), str(image_id), values, size),
            },
        )
        count += 1
    return count
