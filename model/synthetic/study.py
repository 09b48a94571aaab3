"""Writing a synthetic study: images, masks, truth, ratings and the raters' regions in one folder.

The parts: :mod:`model.synthetic.cases` draws the truth, :mod:`model.synthetic.painter` draws the
images and masks, :mod:`model.synthetic.raters` the simulated dermatologists; :func:`generate` writes
them in the derm-dev layout and :func:`contact_sheet` shows a study at a glance.

Everything is determined by the seed: image ``i`` is the same whatever ``n``, and the same seed gives
byte-identical files.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS, PATTERNS, TARGETS, bcc_consistent
from model.common.data import SYNTHETIC_GENERATOR
from model.synthetic.cases import Case, SynthConfig, sample_cases
from model.synthetic.painter import BoolMask, dilate, render
from model.synthetic.raters import draw_rater_quality, rater_ids, rater_region, simulate_ratings

FORMAT_VERSION = 1
RATINGS_FILE = "ratings.csv"
RATERS_FILE = "raters.csv"
LABELS_FILE = "labels.csv"
STUDY_FILE = "study.json"


@dataclass(frozen=True)
class StudySummary:
    """What :func:`generate` wrote."""

    out: Path
    n_images: int
    n_lesions: int
    n_bcc: int
    n_raters: int
    n_ratings: int
    pattern_counts: dict[str, int]

    def line(self) -> str:
        """One-line human summary."""
        return (
            f"synthetic study: {self.n_images} images of {self.n_lesions} lesions "
            f"({self.n_bcc} BCC, {self.n_images - self.n_bcc} non-BCC), {self.n_raters} raters, "
            f"{self.n_ratings} ratings -> {self.out}"
        )


def _save_mask(mask: BoolMask, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, optimize=False)


_OUTPUTS = (
    "images",
    "masks",
    "regions",
    LABELS_FILE,
    RATINGS_FILE,
    RATERS_FILE,
    STUDY_FILE,
    "contact_sheet.png",
)


def _prepare_out(out: Path) -> None:
    """Create ``out``; an earlier synthetic study there is replaced whole, anything else is kept.

    Raises:
        FileExistsError: ``out`` is a file, or a non-empty folder that is not a synthetic study.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a folder for the study")
    if out.is_dir() and any(out.iterdir()):
        if not (out / STUDY_FILE).is_file():
            raise FileExistsError(
                f"{out} is not empty and holds no synthetic study ({STUDY_FILE} missing); "
                "choose an empty or new folder"
            )
        # Replace the earlier study whole, so no file of a larger earlier run survives.
        for name in _OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for sub in ("images", "masks", "regions"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def _truth_row(case: Case, size: int) -> dict[str, Any]:
    return {
        "image_id": case.image_id,
        "lesion_id": case.lesion_id,
        "dx": "bcc" if case.bcc else "non-bcc",
        DIAGNOSIS_KEY: case.bcc,
        "age": case.age,
        "sex": case.sex,
        "localization": case.site,
        "mask": f"{case.image_id}_segmentation.png",
        "width": size,
        "height": size,
        **case.patterns,
        "bcc_consistent": int(bcc_consistent(case.patterns)),
    }


def generate(config: SynthConfig, out: str | Path, progress: bool = False) -> StudySummary:
    """Write a synthetic study in the derm-dev layout plus ratings and the raters' regions.

    Layout::

        images/<image_id>.jpg                       the dermoscopy-like images
        masks/<image_id>_segmentation.png           lesion mask (0 / 255), as derm-dev
        masks/<image_id>_<pattern>.png              one mask per pattern present
        labels.csv                                  truth: diagnosis, patterns, metadata, lesion_id
        ratings.csv                                 image_id, rater, label, value (0/1)
        raters.csv                                  each rater's true sensitivity / specificity
        regions/<rater>/<image_id>_<pattern>.png    each rater's region for each pattern they reported
        study.json                                  the configuration and counts

    Args:
        config: what to draw.
        out: output folder (created; existing files of the same names are overwritten).
        progress: show a progress bar on stderr.

    Returns:
        A summary of what was written.
    """
    from tqdm import tqdm

    out = Path(out)
    _prepare_out(out)
    cases = sample_cases(config)
    labels = pd.DataFrame([_truth_row(case, config.size) for case, _ in cases])

    # The ratings depend on the truth only, so they are drawn before any image is rendered and
    # each rater's regions are written as soon as their image exists.
    ratings = pd.DataFrame(columns=["image_id", "rater", "label", "value"])
    reported: dict[str, list[tuple[str, str]]] = {}
    if config.raters:
        quality = draw_rater_quality(config.raters, config.rater, config.seed)
        ratings = simulate_ratings(labels, quality, config.rater.missing, config.seed)
        positive = ratings[(ratings["value"] == 1) & ratings["label"].isin(PATTERN_KEYS)]
        for row in positive.itertuples(index=False):
            reported.setdefault(str(row.image_id), []).append((str(row.rater), str(row.label)))
        for rater in rater_ids(config.raters):
            (out / "regions" / rater).mkdir(exist_ok=True)

    for index, (case, lesion) in enumerate(tqdm(cases, desc="synth", unit="img", disable=not progress)):
        rendered = render(case, [config.seed, 0, lesion, 1], [config.seed, 1, index], config.size)
        Image.fromarray(rendered.image).save(out / "images" / f"{case.image_id}.jpg", quality=92)
        _save_mask(rendered.lesion, out / "masks" / f"{case.image_id}_segmentation.png")
        for key, mask in rendered.patterns.items():
            _save_mask(mask, out / "masks" / f"{case.image_id}_{key}.png")
        for rater, label in reported.get(case.image_id, []):
            rng = np.random.default_rng([config.seed, 4, index, int(rater[4:]), PATTERN_KEYS.index(label)])
            region = rater_region(
                rendered.patterns.get(label), rendered.lesion, rng, config.rater.region_jitter
            )
            _save_mask(region, out / "regions" / rater / f"{case.image_id}_{label}.png")

    labels.to_csv(out / LABELS_FILE, index=False, lineterminator="\n")
    if config.raters:
        quality.to_csv(out / RATERS_FILE, index=False, lineterminator="\n")
        ratings.to_csv(out / RATINGS_FILE, index=False, lineterminator="\n")

    summary = StudySummary(
        out=out,
        n_images=len(labels),
        n_lesions=int(labels["lesion_id"].nunique()),
        n_bcc=int(labels[DIAGNOSIS_KEY].sum()),
        n_raters=config.raters,
        n_ratings=len(ratings),
        pattern_counts={k: int(labels[k].sum()) for k in PATTERN_KEYS},
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "generator": SYNTHETIC_GENERATOR,
        "config": asdict(config),
        "targets": list(TARGETS),
        "patterns": [p.key for p in PATTERNS],
        "raters": rater_ids(config.raters),
        "counts": {
            "images": summary.n_images,
            "lesions": summary.n_lesions,
            "bcc": summary.n_bcc,
            "ratings": summary.n_ratings,
            "patterns": summary.pattern_counts,
        },
    }
    (out / STUDY_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _outline(mask: BoolMask, width: int) -> BoolMask:
    return mask & ~dilate(mask, -width)


def contact_sheet(
    root: str | Path, image_ids: list[str] | None = None, columns: int = 4, tile: int = 256
) -> Image.Image:
    """A grid of a study's images with each pattern mask outlined in its colour, and the lesion in white.

    Args:
        root: a study folder (derm-dev layout; pattern masks ``masks/<id>_<pattern>.png`` where present).
        image_ids: which images (default: the first ``columns * 4`` of labels.csv).
        columns: tiles per row.
        tile: tile width and height in pixels.

    Returns:
        The sheet as an RGB image, with a caption bar per tile naming diagnosis and patterns.
    """
    root = Path(root)
    labels = pd.read_csv(root / LABELS_FILE)
    if image_ids is None:
        image_ids = labels["image_id"].astype(str).head(columns * 4).tolist()
    rows = math.ceil(len(image_ids) / columns)
    caption = 14
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    by_id = labels.set_index("image_id")
    for i, image_id in enumerate(image_ids):
        x0, y0 = (i % columns) * tile, (i // columns) * (tile + caption)
        path = next((root / "images").glob(f"{image_id}.*"))
        with Image.open(path) as opened:
            img = np.array(opened.convert("RGB").resize((tile, tile)), dtype=np.uint8)
        width = max(1, tile // 128)
        outlines: list[tuple[Path, tuple[int, int, int]]] = [
            (root / "masks" / f"{image_id}_segmentation.png", (255, 255, 255))
        ]
        for pattern in PATTERNS:
            colour = tuple(int(pattern.colour[j : j + 2], 16) for j in (1, 3, 5))
            outlines.append((root / "masks" / f"{image_id}_{pattern.key}.png", colour))  # type: ignore[arg-type]
        for mask_path, colour in outlines:
            if mask_path.exists():
                with Image.open(mask_path) as opened:
                    mask = np.asarray(opened.convert("L").resize((tile, tile))) > 127
                img[_outline(mask, width)] = colour
        sheet.paste(Image.fromarray(img), (x0, y0 + caption))
        row = by_id.loc[image_id]
        shown = [p.key.split("_")[0][:6] for p in PATTERNS if p.key in row and row[p.key] == 1]
        dx = "BCC" if int(str(row[DIAGNOSIS_KEY])) else "non-BCC"
        draw.text((x0 + 3, y0 + 1), f"{image_id} {dx}: {' '.join(shown) or '-'}", fill=(230, 230, 230))
    return sheet
