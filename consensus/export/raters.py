"""A page per reader: their reliability per label against each reference, and the images where they
disagreed with the consensus, as thumbnails with the painted regions.

What a coordinator hands each dermatologist: ``raters/<name>.html`` beside the study report, one
self-contained file (thumbnails embedded as PNG), named by :func:`page_name` so that any rater name or
e-mail gives a safe, distinct file name. Thumbnails are made where the image is a readable local file (a
Label Studio URL is not fetched here: the page then names the image without a picture); on a pattern's
thumbnail the consensus region is outlined in green and the reader's own painted region filled in
magenta. Pages are deterministic: the same store and images give the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from markupsafe import Markup
from numpy.typing import NDArray

from consensus.export.html import render, table_html, with_interval
from labeling_config import TARGETS

if TYPE_CHECKING:
    from consensus.export import Study

logger = logging.getLogger(__name__)

#: The longest side of a thumbnail, in pixels.
THUMBNAIL = 96
#: The folder of the readers' pages, beside the report.
PAGES = "raters"
CONSENSUS_COLOUR = (0, 200, 0)
RATER_COLOUR = np.array([230, 0, 200], dtype=np.float64)


@dataclass
class Overlay:
    """One image and pattern's regions at thumbnail size: the consensus and each reader's (by name)."""

    consensus: NDArray[np.bool_] | None = None
    raters: dict[str, NDArray[np.bool_]] = field(default_factory=dict)


def page_name(rater: str) -> str:
    """A reader's page file: a readable slug of the name and a short hash of it (distinct, safe anywhere).

    Examples:
        >>> page_name("Dr. Ana Ruiz <ana@example.org>")
        'dr-ana-ruiz-ana-example-org-5de5faf8.html'
    """
    slug = re.sub(r"[^a-z0-9]+", "-", rater.lower()).strip("-")[:40].strip("-") or "rater"
    return f"{slug}-{hashlib.sha256(rater.encode()).hexdigest()[:8]}.html"


def thumbnail_size(height: int, width: int, side: int = THUMBNAIL) -> tuple[int, int]:
    """``(height, width)`` scaled so the longer side is ``side`` (never upscaled, never 0)."""
    scale = min(1.0, side / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def shrink(mask: NDArray[np.bool_], side: int = THUMBNAIL) -> NDArray[np.bool_]:
    """A mask at thumbnail size; a pixel is in where any of the pixels it covers was (thin strokes stay)."""
    from PIL import Image

    height, width = thumbnail_size(mask.shape[0], mask.shape[1], side)
    if (height, width) == mask.shape:
        return mask.copy()
    small = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize(
        (width, height), Image.Resampling.BOX
    )
    out: NDArray[np.bool_] = np.asarray(small) > 0
    return out


def _outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    edge: NDArray[np.bool_] = mask & ~inner
    return edge


def thumbnail(
    image: str | Path | None, overlay: Overlay | None = None, rater: str | None = None
) -> str | None:
    """A base64 PNG thumbnail of a local image file with the regions drawn on it; None when the image cannot
    be read (no path, a URL, a missing or broken file)."""
    from PIL import Image, UnidentifiedImageError

    if image is None or not str(image) or "://" in str(image):
        return None
    path = Path(image)
    try:
        if not path.is_file():
            return None
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        logger.info("no thumbnail of %s: %s", path, exc)
        return None
    own = overlay.raters.get(rater or "") if overlay else None
    masks = [m for m in (overlay.consensus if overlay else None, own) if m is not None]
    height, width = masks[0].shape if masks else thumbnail_size(picture.height, picture.width)
    pixels = np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float64)
    if own is not None and own.shape == (height, width):
        pixels[own] = 0.55 * pixels[own] + 0.45 * RATER_COLOUR
    if overlay is not None and overlay.consensus is not None and overlay.consensus.shape == (height, width):
        pixels[_outline(overlay.consensus)] = CONSENSUS_COLOUR
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _reliability_rows(study: Study, rater: str) -> pd.DataFrame:
    """The reader's rates per label: against the consensus (Dawid-Skene's estimates, agreement and kappa
    with the consensus labels) and against the gold labels on the gold items; each row names its
    reference."""
    rows: list[dict[str, Any]] = []
    rel = study.reliability
    versus = study.vs_consensus
    mine = rel[rel["rater"] == rater] if not rel.empty else rel
    for r in mine.to_dict("records"):
        vs = (
            versus[(versus["label_key"] == r["label_key"]) & (versus["worker"] == rater)]
            if not versus.empty
            else versus
        )
        agree = vs.iloc[0] if len(vs) else None
        rows.append({
            "label": r["label_key"], "reference": "consensus",
            "n": int(agree["n_items"]) if agree is not None else r.get("n_items"),
            "sensitivity": with_interval(r["sensitivity"], r["sensitivity_low"], r["sensitivity_high"]),
            "specificity": with_interval(r["specificity"], r["specificity_low"], r["specificity_high"]),
            "agreement": with_interval(agree["percent_agreement"] if agree is not None else None, None, None),
            "kappa": with_interval(agree["kappa"] if agree is not None else None, None, None),
        })  # fmt: skip
    gold = study.rater_vs_gold
    for r in (gold[gold["rater"] == rater] if not gold.empty else gold).to_dict("records"):
        rows.append({
            "label": r["label_key"], "reference": r["reference"], "n": int(r["n_items"]),
            "sensitivity": with_interval(r["sensitivity"], r["sensitivity_low"], r["sensitivity_high"]),
            "specificity": with_interval(r["specificity"], r["specificity_low"], r["specificity_high"]),
            "agreement": with_interval(r["agreement"], r["agreement_low"], r["agreement_high"]), "kappa": "-",
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    labels = set(frame["label"])
    order = {k: i for i, k in enumerate([k for k in TARGETS if k in labels] + sorted(labels - set(TARGETS)))}
    return frame.sort_values("label", key=lambda c: c.map(order), kind="stable")


def rater_page(study: Study, rater: str, images: Mapping[str, str | Path]) -> str:
    """One reader's page (HTML)."""
    found = study.disagreements
    mine = found[found["rater"] == rater] if not found.empty else found
    sections = []
    for key, group in mine.groupby("label_key", sort=False):
        cards = []
        for r in group.to_dict("records"):
            overlay = study.overlays.get((r["image_id"], str(key)))
            cards.append({
                "image_id": r["image_id"], "said": r["rater_value"], "consensus": r["consensus"],
                "posterior": with_interval(r["posterior"], None, None),
                "thumbnail": thumbnail(images.get(r["image_id"]), overlay, rater),
                "painted": overlay is not None and rater in overlay.raters,
            })  # fmt: skip
        sections.append({"label": key, "cards": cards})
    regions = study.region_reliability
    own_regions = regions[regions["rater"] == rater].drop(columns="rater") if not regions.empty else regions
    return render(
        "rater.html",
        rater=rater,
        run=study.run,
        reliability=Markup(table_html(_reliability_rows(study, rater))),
        regions=Markup(table_html(own_regions)) if not own_regions.empty else None,
        sections=sections,
        n_disagreements=len(mine),
        n_answers=int(study.readers.set_index("rater")["answers"].get(rater, 0))
        if not study.readers.empty
        else 0,
        gold_used=study.gold_summary.get("run", {}).get("used", False),
    )


def write_rater_pages(
    study: Study, folder: str | Path, images: Mapping[str, str | Path] | None = None
) -> list[Path]:
    """Write one page per reader, ``folder/<page_name(rater)>``; returns their paths in rater order.

    Args:
        study: from :func:`consensus.export.build_study`.
        folder: where the pages go (the report links to ``raters/`` beside it).
        images: image id -> local image file, for the thumbnails; default the store's image of each item
            (``Item.image``) where that is a readable path.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    known = {**study.images, **dict(images or {})}
    written = []
    for rater in study.readers["rater"] if not study.readers.empty else []:
        path = out / page_name(str(rater))
        path.write_text(rater_page(study, str(rater), known), encoding="utf-8")
        written.append(path)
    return written
