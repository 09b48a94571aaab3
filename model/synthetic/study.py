"""Synthetic dermoscopy: images, masks, metadata and simulated dermatologists, with known truth.

Each image shows a lesion on textured skin with hair, and each dermoscopic pattern is drawn as
what a dermatologist looks for (see ``labeling_config.schema.PATTERNS``):

=========================  =========================================================================
pattern                    drawn as
=========================  =========================================================================
pigment network            a warped reticular grid of brown lines over part of the lesion
ulceration                 a red-orange structureless patch with a dark red-brown crust
blue-grey ovoid nests      one to four large, soft blue-grey ellipses
multiple globules          a cluster of many small blue-grey dots
maple leaf-like areas      brown-grey bulbous lobes that bulge out of the lesion rim
spoke wheel areas          radial spokes around a dark central hub
arborizing telangiectasia  sharp red vessels that branch like a tree, thinning at each fork
=========================  =========================================================================

Generation, per lesion: a latent class (BCC with probability ``prevalence``) draws the patterns
(BCC lesions rarely show pigment network and show at least one BCC pattern; other lesions mostly show
pigment network and rarely a BCC pattern); the diagnosis label is the clinical criterion
(:func:`labeling_config.bcc_consistent`) flipped with probability ``label_noise``; age, sex and site
depend on the diagnosis as in the BCC literature (older patients, more men, head and neck).
Some lesions get a second image (another orientation and other hairs), so splits must be grouped
by ``lesion_id``, as with HAM10000.

Simulated dermatologists: rater ``r`` reports each binary target ``t`` (the diagnosis and the seven
patterns) with its own sensitivity and specificity, drawn uniformly from the profile's ranges, and
skips an image with probability ``missing`` (every image keeps at least one rater). Raters answer
independently given the truth (the Dawid-Skene model). For every pattern a rater reports, a region
mask is written: the true mask shifted and dilated or eroded, or a small false-positive blob inside
the lesion when the pattern is absent.

Everything is determined by the seed: image ``i`` is the same whatever ``n``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter

from labeling_config import BCC_PATTERNS, DIAGNOSIS_KEY, PATTERN_KEYS, PATTERNS, TARGETS, bcc_consistent
from model.common.data import SYNTHETIC_GENERATOR

FORMAT_VERSION = 1
RATINGS_FILE = "ratings.csv"
RATERS_FILE = "raters.csv"
LABELS_FILE = "labels.csv"
STUDY_FILE = "study.json"

FloatImage = NDArray[np.float32]
BoolMask = NDArray[np.bool_]
Geom = tuple[float, float, float]  # lesion centre x, centre y, mean radius (pixels)
Drawn = tuple[FloatImage, Any, BoolMask]  # alpha to paint, colour (RGB or per-pixel), region mask

# P(pattern present | latent class). BCC lesions need at least one BCC pattern (enforced below).
_P_PATTERN_BCC = {
    "pigment_network": 0.04,
    "ulceration": 0.45,
    "ovoid_nests": 0.45,
    "multiple_globules": 0.35,
    "maple_leaf": 0.30,
    "spoke_wheel": 0.22,
    "arborizing_telangiectasia": 0.60,
}
_P_PATTERN_OTHER = {key: (0.75 if key == "pigment_network" else 0.06) for key in PATTERN_KEYS}

# Anatomical sites (HAM10000 vocabulary) and their frequency by diagnosis.
_SITES_BCC = {
    "face": 0.34, "back": 0.12, "trunk": 0.09, "neck": 0.08, "chest": 0.08,
    "upper extremity": 0.08, "scalp": 0.06, "ear": 0.05, "lower extremity": 0.05, "abdomen": 0.05,
}  # fmt: skip
_SITES_OTHER = {
    "back": 0.28, "lower extremity": 0.20, "trunk": 0.14, "upper extremity": 0.10, "abdomen": 0.10,
    "chest": 0.05, "face": 0.05, "foot": 0.03, "neck": 0.02, "hand": 0.01, "scalp": 0.01, "ear": 0.01,
}  # fmt: skip

_SKIN_TONES = np.array(
    [[0.94, 0.78, 0.68], [0.88, 0.68, 0.56], [0.78, 0.56, 0.43], [0.64, 0.45, 0.33]], np.float32
)
_SKIN_WEIGHTS = np.array([0.35, 0.35, 0.2, 0.1])


@dataclass(frozen=True)
class RaterProfile:
    """How the simulated dermatologists err.

    Attributes:
        sensitivity: range from which each (rater, target) sensitivity is drawn uniformly.
        specificity: range from which each (rater, target) specificity is drawn uniformly.
        missing: probability that a rater skips an image.
        region_jitter: standard deviation of the shift of a rater's region, as a fraction of the size.
    """

    sensitivity: tuple[float, float] = (0.75, 0.95)
    specificity: tuple[float, float] = (0.85, 0.98)
    missing: float = 0.1
    region_jitter: float = 0.02

    def __post_init__(self) -> None:
        for name in ("sensitivity", "specificity"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} range must satisfy 0 <= low <= high <= 1, got {low}, {high}")
        if not 0.0 <= self.missing < 1.0:
            raise ValueError(f"missing must be in [0, 1), got {self.missing}")
        if not 0.0 <= self.region_jitter <= 0.5:
            raise ValueError(f"region_jitter must be in [0, 0.5], got {self.region_jitter}")


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`generate` draws.

    Attributes:
        n: number of images.
        size: width and height in pixels.
        raters: number of simulated dermatologists (0 for none).
        seed: the seed; the same seed gives byte-identical files.
        prevalence: share of lesions whose latent class is BCC.
        label_noise: probability that the diagnosis label contradicts the clinical criterion.
        second_image: probability that a lesion gets a second image.
        rater: the raters' error profile.
    """

    n: int = 500
    size: int = 256
    raters: int = 4
    seed: int = 0
    prevalence: float = 0.4
    label_noise: float = 0.02
    second_image: float = 0.2
    rater: RaterProfile = field(default_factory=RaterProfile)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 64 <= self.size <= 4096:
            raise ValueError(f"size must be between 64 and 4096 pixels, got {self.size}")
        if self.raters < 0:
            raise ValueError(f"raters must be >= 0, got {self.raters}")
        for name in ("prevalence", "label_noise", "second_image"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class Case:
    """The truth of one image: what is drawn, the diagnosis and the metadata."""

    image_id: str
    lesion_id: str
    latent_bcc: bool
    patterns: dict[str, int]
    bcc: int
    age: float | None
    sex: str
    site: str


@dataclass
class Rendered:
    """One drawn image with its lesion mask and one mask per pattern present."""

    image: NDArray[np.uint8]
    lesion: BoolMask
    patterns: dict[str, BoolMask]


# --------------------------------------------------------------------------------------------
# Sampling the truth
# --------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_patterns(rng: np.random.Generator, latent_bcc: bool) -> dict[str, int]:
    """Draw which of the seven patterns a lesion shows, given its latent class."""
    probs = _P_PATTERN_BCC if latent_bcc else _P_PATTERN_OTHER
    present = {key: int(rng.random() < probs[key]) for key in PATTERN_KEYS}
    if latent_bcc and not any(present[k] for k in BCC_PATTERNS):
        present[_choice(rng, {k: _P_PATTERN_BCC[k] for k in BCC_PATTERNS})] = 1
    return present


def sample_metadata(rng: np.random.Generator, bcc: int) -> tuple[float | None, str, str]:
    """Age (5-year bins, as HAM10000; missing in 1%), sex and site, given the diagnosis."""
    mean, sd = (68.0, 11.0) if bcc else (47.0, 16.0)
    age: float | None = float(5 * round(float(np.clip(rng.normal(mean, sd), 5, 90)) / 5))
    if rng.random() < 0.01:
        age = None
    sex = "male" if rng.random() < (0.58 if bcc else 0.5) else "female"
    site = _choice(rng, _SITES_BCC if bcc else _SITES_OTHER)
    return age, sex, site


def sample_cases(config: SynthConfig) -> list[tuple[Case, int]]:
    """The truth of every image, with the index of the lesion it shows (lesions share geometry)."""
    cases: list[tuple[Case, int]] = []
    lesion = 0
    while len(cases) < config.n:
        rng = np.random.default_rng([config.seed, 0, lesion])
        latent = bool(rng.random() < config.prevalence)
        patterns = sample_patterns(rng, latent)
        consistent = bcc_consistent(patterns)
        bcc = int(consistent != (rng.random() < config.label_noise))
        age, sex, site = sample_metadata(rng, bcc)
        views = 2 if rng.random() < config.second_image else 1
        for _ in range(min(views, config.n - len(cases))):
            case = Case(
                image_id=f"SYN_{len(cases):06d}",
                lesion_id=f"SYNL_{lesion:06d}",
                latent_bcc=latent,
                patterns=patterns,
                bcc=bcc,
                age=age,
                sex=sex,
                site=site,
            )
            cases.append((case, lesion))
        lesion += 1
    return cases


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> FloatImage:
    """Smooth random field of roughly unit amplitude with about ``cells`` bumps per side."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field_ = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(field_, dtype=np.float32)


def _layer(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("L", (size, size), 0)
    return layer, ImageDraw.Draw(layer)


def _alpha(layer: Image.Image, blur: float) -> FloatImage:
    if blur > 0:
        layer = layer.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(layer, dtype=np.float32) / 255.0


def _dilate(mask: BoolMask, pixels: int) -> BoolMask:
    """Grow (pixels > 0) or shrink (pixels < 0) a mask by a square structuring element."""
    if pixels == 0:
        return mask.copy()
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    filt = ImageFilter.MaxFilter if pixels > 0 else ImageFilter.MinFilter
    return np.asarray(img.filter(filt(2 * abs(pixels) + 1))) > 127


def _paint(canvas: FloatImage, alpha: FloatImage, colour: FloatImage | NDArray[np.float32]) -> None:
    a = alpha[..., None]
    canvas *= 1.0 - a
    canvas += a * colour


def _blob(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    yy: FloatImage,
    xx: FloatImage,
    roughness: float = 0.12,
    harmonics: int = 6,
) -> FloatImage:
    """Signed distance-like field (> 0 inside) of an irregular star-shaped blob."""
    theta = np.arctan2(yy - cy, xx - cx)
    r_theta = np.ones_like(theta)
    for k in range(2, harmonics + 2):
        r_theta += rng.normal(0.0, roughness / math.sqrt(k)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r_theta = radius * np.clip(r_theta, 0.55, 1.45)
    field_: FloatImage = (r_theta - np.hypot(yy - cy, xx - cx)).astype(np.float32)
    return field_


class _Painter:
    """Draws one lesion; all geometry scales with ``size``."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.size = size
        self.scale = size / 256.0
        coords = np.arange(size, dtype=np.float32) + 0.5
        self.yy, self.xx = np.meshgrid(coords, coords, indexing="ij")

    def skin(self) -> FloatImage:
        rng, s = self.rng, self.size
        tone = _SKIN_TONES[int(rng.choice(len(_SKIN_TONES), p=_SKIN_WEIGHTS))]
        tone = np.clip(tone + rng.normal(0, 0.02, 3), 0, 1).astype(np.float32)
        low = _smooth_noise(rng, s, 4)[..., None]
        fine = _smooth_noise(rng, s, max(8, s // 6))[..., None]
        # Skin furrows: faint crossing lines.
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(9, 16) * self.scale
        furrow = np.cos((self.xx * np.cos(angle) + self.yy * np.sin(angle)) * 2 * np.pi / period)
        img = tone * (1 + 0.05 * low + 0.025 * fine) - 0.015 * furrow[..., None] ** 8
        skin: FloatImage = img.astype(np.float32)
        return skin

    def lesion_body(self, img: FloatImage, latent_bcc: bool) -> tuple[FloatImage, Geom]:
        rng, s = self.rng, self.size
        cx = s / 2 + rng.normal(0, 0.04 * s)
        cy = s / 2 + rng.normal(0, 0.04 * s)
        radius = s * rng.uniform(0.25, 0.33)
        field_ = _blob(rng, cx, cy, radius, self.yy, self.xx, roughness=0.14, harmonics=7)
        soft = np.clip(field_ / (0.025 * s) + 0.5, 0.0, 1.0)
        # Body colour on a continuum from pink-translucent to brown; BCC leans pink, others brown.
        t = rng.beta(2.0, 5.0) if latent_bcc else rng.beta(5.0, 2.0)
        pink = np.array([0.86, 0.58, 0.58], np.float32)
        brown = np.array([0.55, 0.36, 0.24], np.float32)
        base = (1 - t) * pink + t * brown
        other = base * rng.uniform(0.7, 0.9) + rng.normal(0, 0.03, 3).astype(np.float32)
        mix = np.clip(0.5 + 0.5 * _smooth_noise(rng, s, 5), 0, 1)[..., None]
        colour = (1 - mix) * base + mix * other
        # Structureless darker and lighter blotches.
        blotch = _smooth_noise(rng, s, 9)[..., None]
        colour = colour * (1 + 0.08 * blotch)
        _paint(img, (soft * rng.uniform(0.75, 0.95)).astype(np.float32), colour.astype(np.float32))
        return soft, (cx, cy, radius)

    def anchor(self, geom: Geom, sector: float, reach: float) -> tuple[float, float]:
        cx, cy, radius = geom
        angle = sector + self.rng.uniform(-0.4, 0.4)
        r = radius * reach * math.sqrt(self.rng.uniform(0.15, 1.0))
        return cx + r * math.cos(angle), cy + r * math.sin(angle)

    # Each pattern returns (alpha layer to paint, colour, region mask).

    def pigment_network(self, geom: Geom, soft: FloatImage) -> Drawn:
        rng, s = self.rng, self.size
        cx, cy, radius = geom
        # A honeycomb: three plane waves at 60 degrees; the net's lines are where their sum is low.
        period = s * rng.uniform(0.028, 0.038)
        warp_u = _smooth_noise(rng, s, 7) * 0.45 * period
        warp_v = _smooth_noise(rng, s, 7) * 0.45 * period
        u, v = self.xx + warp_u, self.yy + warp_v
        angle = rng.uniform(0, np.pi / 3)
        k = 2 * np.pi / period
        waves = sum(
            np.cos(k * (u * math.cos(angle + j * np.pi / 3) + v * math.sin(angle + j * np.pi / 3)))
            for j in range(3)
        )
        level = rng.uniform(-0.9, -0.5)
        net = np.clip((level - waves) / 0.6 + 0.5, 0, 1)
        region_field = _blob(rng, cx, cy, radius * rng.uniform(0.6, 0.95), self.yy, self.xx, 0.2)
        region = np.clip(region_field / (0.04 * s) + 0.5, 0, 1) * soft
        fade = np.clip(region_field / (0.12 * s), 0.35, 1.0)  # lines thin out towards the periphery
        colour = np.array([0.30, 0.18, 0.10], np.float32) * rng.uniform(0.8, 1.1)
        return (net * region * fade * 0.85).astype(np.float32), colour, region > 0.5

    def ulceration(self, geom: Geom, sector: float) -> Drawn:
        rng, s = self.rng, self.size
        x, y = self.anchor(geom, sector, 0.5)
        r = geom[2] * rng.uniform(0.18, 0.28)
        field_ = _blob(rng, x, y, r, self.yy, self.xx, 0.18)
        patch = np.clip(field_ / (0.01 * s) + 0.5, 0, 1)
        texture = 0.5 + 0.5 * _smooth_noise(rng, s, max(6, s // 20))
        red = np.array([0.86, 0.36, 0.16], np.float32)
        crust = np.array([0.38, 0.12, 0.07], np.float32)
        crust_field = _blob(
            rng, x + rng.normal(0, r * 0.2), y + rng.normal(0, r * 0.2), r * 0.5, self.yy, self.xx, 0.25
        )
        crust_mix = np.clip(crust_field / (0.01 * s) + 0.5, 0, 1) * (0.6 + 0.4 * texture)
        crust_a, shade = crust_mix[..., None], 0.9 + 0.2 * texture[..., None]
        colour = (1 - crust_a) * red * shade + crust_a * crust
        return (patch * 0.95).astype(np.float32), colour.astype(np.float32), patch > 0.5

    def ovoid_nests(self, geom: Geom, sector: float) -> Drawn:
        rng, s = self.rng, self.size
        x, y = self.anchor(geom, sector, 0.45)
        layer, draw = _layer(s)
        shape, sdraw = _layer(s)
        radius = geom[2]
        for _ in range(int(rng.integers(1, 5))):
            a = radius * rng.uniform(0.17, 0.26)
            b = a * rng.uniform(0.5, 0.75)
            ex, ey = x + rng.normal(0, radius * 0.15), y + rng.normal(0, radius * 0.15)
            rot = rng.uniform(0, np.pi)
            pts = [
                (
                    ex + a * math.cos(t) * math.cos(rot) - b * math.sin(t) * math.sin(rot),
                    ey + a * math.cos(t) * math.sin(rot) + b * math.sin(t) * math.cos(rot),
                )
                for t in np.linspace(0, 2 * np.pi, 40, endpoint=False)
            ]
            draw.polygon(pts, fill=int(rng.uniform(200, 245)))
            sdraw.polygon(pts, fill=255)
        colour = np.array([0.36, 0.43, 0.54], np.float32) * rng.uniform(0.85, 1.1)
        alpha = _alpha(layer, 1.5 * self.scale)
        return alpha, colour, _dilate(np.asarray(shape) > 0, round(1 * self.scale))

    def multiple_globules(self, geom: Geom, sector: float) -> Drawn:
        rng, s = self.rng, self.size
        x, y = self.anchor(geom, sector, 0.5)
        layer, draw = _layer(s)
        region, rdraw = _layer(s)
        spread = geom[2] * rng.uniform(0.22, 0.32)
        for _ in range(int(rng.integers(12, 30))):
            r = s * rng.uniform(0.009, 0.016)
            gx, gy = x + rng.normal(0, spread * 0.5), y + rng.normal(0, spread * 0.5)
            draw.ellipse((gx - r, gy - r, gx + r, gy + r), fill=int(rng.uniform(200, 250)))
            rr = 2.2 * r
            rdraw.ellipse((gx - rr, gy - rr, gx + rr, gy + rr), fill=255)
        colour = np.array([0.40, 0.46, 0.60], np.float32) * rng.uniform(0.85, 1.1)
        return _alpha(layer, 0.6 * self.scale), colour, np.asarray(region) > 0

    def maple_leaf(self, geom: Geom, body: FloatImage) -> Drawn:
        """Bulbous lobes on the rim; they extend the lesion, so the lesion mask must include them."""
        rng, s = self.rng, self.size
        cx, cy, radius = geom
        layer, draw = _layer(s)
        for _ in range(int(rng.integers(1, 3))):
            start = rng.uniform(0, 2 * np.pi)
            lobes = int(rng.integers(3, 6))
            for j in range(lobes):
                angle = start + j * rng.uniform(0.13, 0.18)
                # Find the rim along this direction on the soft body mask.
                rim = radius
                for r in np.linspace(radius * 1.4, radius * 0.5, 40):
                    px, py = int(cx + r * math.cos(angle)), int(cy + r * math.sin(angle))
                    if 0 <= px < s and 0 <= py < s and body[py, px] > 0.5:
                        rim = r
                        break
                lr = radius * rng.uniform(0.09, 0.13)
                out = rim - lr * rng.uniform(0.1, 0.6)
                lx, ly = cx + out * math.cos(angle), cy + out * math.sin(angle)
                draw.ellipse((lx - lr, ly - lr, lx + lr, ly + lr), fill=255)
        colour = np.array([0.42, 0.33, 0.33], np.float32) * rng.uniform(0.85, 1.1)
        shape = np.asarray(layer) > 0
        return _alpha(layer, 0.8 * self.scale) * 0.9, colour, shape

    def spoke_wheel(self, geom: Geom, sector: float) -> Drawn:
        rng, s = self.rng, self.size
        x, y = self.anchor(geom, sector, 0.45)
        layer, draw = _layer(s)
        radius = geom[2]
        hub = radius * rng.uniform(0.05, 0.075)
        length = radius * rng.uniform(0.2, 0.27)
        spokes = int(rng.integers(7, 12))
        start = rng.uniform(0, 2 * np.pi)
        for j in range(spokes):
            angle = start + 2 * np.pi * j / spokes + rng.normal(0, 0.08)
            half = rng.uniform(0.16, 0.24)
            reach = length * rng.uniform(0.8, 1.05)
            tip = (x + reach * math.cos(angle), y + reach * math.sin(angle))
            left = (x + hub * math.cos(angle - half * 2.5), y + hub * math.sin(angle - half * 2.5))
            right = (x + hub * math.cos(angle + half * 2.5), y + hub * math.sin(angle + half * 2.5))
            draw.polygon([left, tip, right], fill=190)
        draw.ellipse((x - hub, y - hub, x + hub, y + hub), fill=250)
        colour = np.array([0.40, 0.30, 0.30], np.float32)
        alpha = _alpha(layer, 0.7 * self.scale)
        # The hub is darker than the spokes.
        hub_mix = np.clip((hub * 1.1 - np.hypot(self.yy - y, self.xx - x)) / (2 * self.scale), 0, 1)[
            ..., None
        ]
        colour_img = (1 - hub_mix) * colour + hub_mix * np.array([0.2, 0.14, 0.16], np.float32)
        region = np.hypot(self.yy - y, self.xx - x) <= length * 1.08
        return alpha, colour_img.astype(np.float32), region

    def arborizing_telangiectasia(self, geom: Geom, sector: float) -> Drawn:
        rng, s = self.rng, self.size
        x, y = self.anchor(geom, sector, 0.35)
        layer, draw = _layer(s)
        radius = geom[2]

        def branch(px: float, py: float, angle: float, length: float, width: float, depth: int) -> None:
            steps = 6
            pts = [(px, py)]
            a = angle
            for _ in range(steps):
                a += rng.normal(0, 0.18)
                px += length / steps * math.cos(a)
                py += length / steps * math.sin(a)
                pts.append((px, py))
            draw.line(pts, fill=255, width=max(1, round(width)), joint="curve")
            if depth > 0:
                for side in (-1, 1):
                    branch(
                        px,
                        py,
                        a + side * rng.uniform(0.35, 0.75),
                        length * rng.uniform(0.55, 0.75),
                        width * 0.7,
                        depth - 1,
                    )

        for _ in range(int(rng.integers(1, 3))):
            branch(x, y, rng.uniform(0, 2 * np.pi), radius * rng.uniform(0.3, 0.42), 3.2 * self.scale, 3)
        colour = np.array([0.78, 0.08, 0.12], np.float32) * rng.uniform(0.9, 1.1)
        vessels = np.asarray(layer) > 0
        return _alpha(layer, 0.4 * self.scale) * 0.95, colour, _dilate(vessels, round(2 * self.scale))

    def hair(self, img: FloatImage, count: int) -> None:
        rng, s = self.rng, self.size
        layer, draw = _layer(s)
        for _ in range(count):
            p0 = rng.uniform(-0.1, 1.1, 2) * s
            p2 = rng.uniform(-0.1, 1.1, 2) * s
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * s, 2)
            t = np.linspace(0, 1, 24)[:, None]
            curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            draw.line(
                [tuple(p) for p in curve],
                fill=int(rng.uniform(170, 235)),
                width=max(1, round(rng.uniform(0.8, 1.8) * self.scale)),
            )
        _paint(img, _alpha(layer, 0.3 * self.scale), np.array([0.12, 0.08, 0.06], np.float32))


def render(case: Case, lesion_seed: list[int], image_seed: list[int], size: int) -> Rendered:
    """Draw one image of a case.

    Lesion geometry, colours and patterns come from ``lesion_seed`` (shared by the images of one
    lesion); orientation, hair and sensor noise from ``image_seed``.
    """
    painter = _Painter(np.random.default_rng(lesion_seed), size)
    rng = painter.rng
    img = painter.skin()
    soft, geom = painter.lesion_body(img, case.latent_bcc)
    body = soft > 0.5
    present = [k for k in PATTERN_KEYS if case.patterns[k]]
    # Interior patterns get their own angular sector so they overlap little.
    interior = [k for k in present if k not in ("pigment_network", "maple_leaf")]
    offset = rng.uniform(0, 2 * np.pi)
    sectors = {k: offset + 2 * np.pi * i / max(1, len(interior)) for i, k in enumerate(interior)}

    masks: dict[str, BoolMask] = {}
    lesion = body
    order = (
        "pigment_network",
        "maple_leaf",
        "ovoid_nests",
        "multiple_globules",
        "spoke_wheel",
        "ulceration",
        "arborizing_telangiectasia",
    )
    for key in order:
        if key not in present:
            continue
        if key == "pigment_network":
            alpha, colour, region = painter.pigment_network(geom, soft)
        elif key == "maple_leaf":
            alpha, colour, region = painter.maple_leaf(geom, soft)
            lesion = lesion | region
        else:
            alpha, colour, region = getattr(painter, key)(geom, sectors[key])
            alpha = alpha * soft  # interior structures stay inside the lesion
        _paint(img, alpha, colour)
        masks[key] = region

    # Every pattern region lies inside the lesion.
    masks = {k: m & lesion for k, m in masks.items()}

    # Per image: orientation, hair, sensor noise, dermatoscope vignette.
    irng = np.random.default_rng(image_seed)
    painter.rng = irng
    painter.hair(img, int(irng.poisson(3.0)))
    k, flip = int(irng.integers(0, 4)), bool(irng.integers(0, 2))

    def orient(a: NDArray[Any]) -> NDArray[Any]:
        a = np.rot90(a, k, axes=(0, 1))
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    radial = np.hypot(painter.yy - size / 2, painter.xx - size / 2) / (size / 2)
    vignette = np.clip(1.25 - 0.35 * radial**2, 0, 1)[..., None]
    img = (img * vignette + irng.normal(0, 0.012, img.shape)).astype(np.float32)
    pixels = np.clip(np.rint(orient(img) * 255), 0, 255).astype(np.uint8)
    smoothed = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.45 * painter.scale))
    return Rendered(
        image=np.asarray(smoothed),
        lesion=orient(lesion),
        patterns={key: orient(m) for key, m in masks.items()},
    )


# --------------------------------------------------------------------------------------------
# Simulated dermatologists
# --------------------------------------------------------------------------------------------


def rater_ids(n: int) -> list[str]:
    """Stable rater identifiers: derm1, derm2, ..."""
    return [f"derm{r + 1}" for r in range(n)]


def draw_rater_quality(n_raters: int, profile: RaterProfile, seed: int) -> pd.DataFrame:
    """Each (rater, target)'s true sensitivity and specificity.

    Returns:
        Columns ``rater, label, sensitivity, specificity``, one row per rater and target.
    """
    rng = np.random.default_rng([seed, 2])
    rows = []
    for rater in rater_ids(n_raters):
        for target in TARGETS:
            rows.append({
                "rater": rater,
                "label": target,
                "sensitivity": round(float(rng.uniform(*profile.sensitivity)), 4),
                "specificity": round(float(rng.uniform(*profile.specificity)), 4),
            })  # fmt: skip
    return pd.DataFrame(rows)


def simulate_ratings(truth: pd.DataFrame, quality: pd.DataFrame, missing: float, seed: int) -> pd.DataFrame:
    """Simulate every rater's answers.

    Args:
        truth: one row per image, columns ``image_id`` and one 0/1 column per target in ``TARGETS``.
        quality: output of :func:`draw_rater_quality`.
        missing: probability that a rater skips an image (each image keeps at least one rater).
        seed: random seed.

    Returns:
        Long table ``image_id, rater, label, value`` (value 0/1), sorted by image, rater, target order.
    """
    rng = np.random.default_rng([seed, 3])
    raters = list(dict.fromkeys(quality["rater"]))
    n_img, n_rat, n_tgt = len(truth), len(raters), len(TARGETS)
    q = quality.set_index(["rater", "label"])
    sens = np.array([[q.loc[(r, t), "sensitivity"] for t in TARGETS] for r in raters])
    spec = np.array([[q.loc[(r, t), "specificity"] for t in TARGETS] for r in raters])
    y = truth[list(TARGETS)].to_numpy(dtype=np.int64)  # (images, targets)
    u = rng.random((n_img, n_rat, n_tgt))
    p_one = np.where(y[:, None, :] == 1, sens[None], 1.0 - spec[None])
    answers = (u < p_one).astype(np.int64)
    present = rng.random((n_img, n_rat)) >= missing
    nobody = ~present.any(axis=1)
    present[nobody, rng.integers(0, n_rat, int(nobody.sum()))] = True
    img_idx, rat_idx, tgt_idx = np.nonzero(np.broadcast_to(present[:, :, None], answers.shape))
    return pd.DataFrame({
        "image_id": truth["image_id"].to_numpy()[img_idx],
        "rater": np.asarray(raters)[rat_idx],
        "label": np.asarray(TARGETS)[tgt_idx],
        "value": answers[img_idx, rat_idx, tgt_idx],
    })  # fmt: skip


def rater_region(
    truth_mask: BoolMask | None, lesion: BoolMask, rng: np.random.Generator, jitter: float
) -> BoolMask:
    """A rater's region for a pattern they reported: the truth shifted and grown or shrunk, or a
    small false-positive blob inside the lesion when the pattern is absent."""
    size = lesion.shape[0]
    scale = size / 256.0
    if truth_mask is None or not truth_mask.any():
        ys, xs = np.nonzero(lesion)
        if len(ys) == 0:
            return np.zeros_like(lesion)
        i = int(rng.integers(len(ys)))
        r = size * rng.uniform(0.04, 0.08)
        coords = np.arange(size) + 0.5
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        blob: BoolMask = (np.hypot(yy - ys[i], xx - xs[i]) <= r) & lesion
        return blob
    dy, dx = np.rint(rng.normal(0, jitter * size, 2)).astype(int)
    shifted = np.zeros_like(truth_mask)
    src = truth_mask[max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
    shifted[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    grown = _dilate(shifted, int(rng.integers(-2, 3) * max(1, round(scale))))
    return grown if grown.any() else shifted


# --------------------------------------------------------------------------------------------
# Writing a study
# --------------------------------------------------------------------------------------------


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
    return mask & ~_dilate(mask, -width)


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
