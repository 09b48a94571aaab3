"""A synthetic study as Label Studio would send it: tasks with uploaded images, annotations, webhook events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from backend.demo.study import lesion_ratings, lesion_result, rater_result
from labeling_config import load_config

BCC_XML = load_config("bcc")
LESION_XML = load_config("lesion")


def study_tasks(study: Path, files: Any, project: int = 1, limit: int | None = None) -> list[dict[str, Any]]:
    """Label Studio's JSON export of the study: one task per image, one annotation per rater (the
    simulated dermatologist's diagnosis, patterns and painted regions, as :mod:`backend.demo.study` sends them).

    Images are put on the test server as ``/data/upload/<project>/<file name>``.
    """
    ratings = pd.read_csv(study / "ratings.csv", dtype={"image_id": str})
    images = sorted(ratings["image_id"].unique())[:limit]
    raters = sorted(ratings["rater"].unique())
    tasks = []
    for t, image_id in enumerate(images, start=1):
        source = next((study / "images").glob(f"{image_id}.*"))
        path = f"/data/upload/{project}/{source.name}"
        if files is not None:
            files.routes[path] = (200, {"Content-Type": "image/jpeg"}, source.read_bytes())
        with Image.open(source) as im:
            size = im.width
        annotations = []
        for r, rater in enumerate(raters):
            rows = ratings[(ratings["image_id"] == image_id) & (ratings["rater"] == rater)]
            values = dict(zip(rows["label"], rows["value"], strict=True))
            if "bcc" not in values:
                continue
            result = rater_result(study, str(rater), str(image_id), values, size)
            annotations.append(
                {
                    "id": t * 100 + r,
                    "completed_by": r + 1,
                    "result": result,
                    "task": t,
                    "was_cancelled": False,
                    "updated_at": "2026-11-20T10:00:00Z",
                }
            )
        tasks.append({"id": t, "data": {"image": path}, "project": project, "annotations": annotations})
    return tasks


def lesion_tasks(study: Path, files: Any, project: int = 2, n_raters: int = 3) -> list[dict[str, Any]]:
    """The study as a ``lesion.xml`` project's export: age / sex / site in the task data, one annotation
    (HAM10000 diagnosis + lesion outline) per simulated rater (:func:`backend.demo.study.lesion_ratings`)."""
    labels = pd.read_csv(study / "labels.csv", dtype={"image_id": str}).set_index("image_id")
    by_image: dict[str, list[tuple[str, str, Any]]] = {}
    for image_id, rater, said, mask in lesion_ratings(study, n_raters):
        by_image.setdefault(image_id, []).append((rater, said, mask))
    tasks = []
    for t, (image_id, ratings) in enumerate(sorted(by_image.items()), start=1):
        source = next((study / "images").glob(f"{image_id}.*"))
        path = f"/data/upload/{project}/{source.name}"
        if files is not None:
            files.routes[path] = (200, {"Content-Type": "image/jpeg"}, source.read_bytes())
        row = labels.loc[image_id]
        data = {
            "image": path,
            # Label Studio sends a missing value as "" (its webhooks are strict JSON: never NaN)
            "age": float(row["age"]) if pd.notna(row["age"]) else "",
            "sex": str(row["sex"]),
            "site": str(row["localization"]),
        }
        annotations = [
            {"id": 10_000 + t * 100 + r, "completed_by": 50 + r, "result": lesion_result(said, mask), "task": 1000 + t,
             "was_cancelled": False, "updated_at": "2026-11-20T10:00:00Z"}
            for r, (_, said, mask) in enumerate(ratings)
        ]  # fmt: skip
        tasks.append({"id": 1000 + t, "data": data, "project": project, "annotations": annotations})
    return tasks


def webhook_events(
    tasks: list[dict[str, Any]], project: int = 1, label_config: str = BCC_XML
) -> list[dict[str, Any]]:
    """One ANNOTATION_CREATED event per annotation of the export."""
    events = []
    for task in tasks:
        bare = {k: v for k, v in task.items() if k != "annotations"}
        for annotation in task["annotations"]:
            events.append(
                {
                    "action": "ANNOTATION_CREATED",
                    "annotation": annotation,
                    "task": bare,
                    "project": {"id": project, "label_config": label_config},
                }
            )
    return events
