"""What both systems' HTML reports share: figures as inlined PNGs, and Grad-CAM overlays.

Reports are Jinja2 templates in each system's ``templates/`` folder (autoescaped); figures are
matplotlib figures rendered to base64 PNGs and inlined, so one HTML file carries everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from model.common.data import read_binary_mask
from model.common.explain import scale_maps


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


__all__ = ["overlay"]
