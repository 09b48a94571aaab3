"""Drawing synthetic dermoscopy: a lesion on textured skin with hair, each pattern as a dermatologist
looks for it (see ``labeling_config.schema.PATTERNS``), with a mask per pattern and for the lesion.

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

Lesion geometry, colours and patterns come from a seed shared by the images of one lesion;
orientation, hair and sensor noise from the image's own seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter

from labeling_config import PATTERN_KEYS
from model.synthetic.cases import Case

FloatImage = NDArray[np.float32]
BoolMask = NDArray[np.bool_]
Geom = tuple[float, float, float]  # lesion centre x, centre y, mean radius (pixels)
Drawn = tuple[FloatImage, Any, BoolMask]  # alpha to paint, colour (RGB or per-pixel), region mask

_SKIN_TONES = np.array(
    [[0.94, 0.78, 0.68], [0.88, 0.68, 0.56], [0.78, 0.56, 0.43], [0.64, 0.45, 0.33]], np.float32
)
_SKIN_WEIGHTS = np.array([0.35, 0.35, 0.2, 0.1])


@dataclass
class Rendered:
    """One drawn image with its lesion mask and one mask per pattern present."""

    image: NDArray[np.uint8]
    lesion: BoolMask
    patterns: dict[str, BoolMask]


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


def dilate(mask: BoolMask, pixels: int) -> BoolMask:
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
        return alpha, colour, dilate(np.asarray(shape) > 0, round(1 * self.scale))

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
        return _alpha(layer, 0.4 * self.scale) * 0.95, colour, dilate(vessels, round(2 * self.scale))

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
