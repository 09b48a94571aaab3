"""The one report writer both systems use: Jinja2 pages with inlined figures, and Grad-CAM overlays.

A report is a template in its system's ``templates/`` folder that extends ``report.html`` (the page
and its style) and imports ``macros.html`` (a figure with its 95% interval, an inlined plot), both in
``model/common/templates``. :func:`write_report` renders it (autoescaped) and writes it atomically.
Figures are matplotlib figures turned into base64 PNGs (:func:`figure_png`), so one HTML file carries
everything.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from model.common.data import read_binary_mask
from model.common.explain import scale_maps
from model.common.files import atomic_write_text


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (reports are drawn without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG (110 dpi, cropped to its content), the figure closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def confusion_png(
    counts: NDArray[Any], labels: Sequence[str], title: str, size: tuple[float, float] = (5.2, 4.6)
) -> str:
    """A confusion matrix (rows: reference, columns: predicted) coloured by row share, with its counts."""
    counts = np.asarray(counts)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = pyplot().subplots(figsize=size)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (a, b), n in np.ndenumerate(counts):
        ax.text(b, a, str(n), ha="center", va="center", fontsize=8 if len(labels) > 3 else 13,
                color="white" if share[a, b] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="reference", title=title)
    return figure_png(fig)


def render(package: str, template: str, **values: Any) -> str:
    """A page from ``package``'s ``templates/`` folder, which may extend and import the common ones
    (Jinja2, autoescaped)."""
    from jinja2 import ChoiceLoader, Environment, PackageLoader, select_autoescape

    loader = ChoiceLoader([PackageLoader(package), PackageLoader("model.common")])
    environment = Environment(loader=loader, autoescape=select_autoescape(["html"]))
    return environment.get_template(template).render(**values)


def write_report(path: str | Path, package: str, template: str, **values: Any) -> None:
    """:func:`render` a page and write it atomically."""
    atomic_write_text(path, render(package, template, **values))


def overlay(image_path: str, raw: NDArray[Any], mask_path: str | None) -> NDArray[np.uint8]:
    """The image with a map in the jet colour map over it, and the mask's outline in white."""
    import matplotlib

    with Image.open(image_path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    h, w = rgb.shape[:2]
    cam = scale_maps(torch.as_tensor(raw, dtype=torch.float32), (h, w)).numpy()
    heat = matplotlib.colormaps["jet"](cam)[..., :3]
    out = 0.55 * rgb + 0.45 * heat
    if mask_path:
        mask = read_binary_mask(Path(mask_path))
        edge = mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[:-2, 1:-1]
        out[edge] = 1.0
    pixels: NDArray[np.uint8] = (np.clip(out, 0, 1) * 255).astype(np.uint8)
    return pixels


__all__ = ["confusion_png", "figure_png", "overlay", "pyplot", "render", "write_report"]
