"""A synthetic study's painted regions into the store, as Label Studio would have sent them.

``dermassist synth`` writes each simulated dermatologist's region of every pattern they reported under
``regions/<rater>/<image_id>_<pattern>.png``; Label Studio sends painted regions as brush RLE. This puts
the PNGs into the store in that form (``{label, format, rle, width, height}``, the label the pattern key:
what :func:`backend.label_studio.annotations.parse_result` stores), beside the ratings already imported,
so that a consensus run with the brush decoder fuses them (:mod:`consensus.regions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.label_studio.brush import mask_to_rle
from consensus.models import Annotation, Item, Rater, Source
from consensus.repository import upsert_annotation
from labeling_config import PATTERN_KEYS


def stored_region(label: str, mask: np.ndarray[Any, Any]) -> dict[str, Any]:
    """One painted region as the store keeps a Label Studio brush result."""
    height, width = mask.shape
    return {"label": label, "format": "rle", "rle": mask_to_rle(mask), "width": width, "height": height}


def import_study_regions(session: Session, study: Path) -> int:
    """Attach every ``regions/<rater>/<image_id>_<pattern>.png`` of ``study`` to that rater's stored
    annotation of that image (labels and diagnosis kept); images or raters the store lacks are skipped.

    Returns:
        How many regions were attached.
    """
    rows = session.execute(
        select(Annotation, Item, Rater)
        .join(Item, Annotation.item_id == Item.id)
        .join(Rater, Annotation.rater_id == Rater.id)
        .where(Annotation.deleted.is_(False))
        .order_by(Item.external_id, Rater.name)
    ).all()
    count = 0
    for annotation, item, rater in rows:
        regions = []
        for key in PATTERN_KEYS:
            path = study / "regions" / rater.name / f"{item.external_id}_{key}.png"
            if path.is_file():
                with Image.open(path) as im:
                    regions.append(stored_region(key, np.asarray(im.convert("L")) > 127))
        if regions:
            upsert_annotation(
                session, item, rater, dict(annotation.labels), Source.IMPORT, annotation.diagnosis, regions
            )
            count += len(regions)
    return count
