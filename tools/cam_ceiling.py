"""The most energy a Grad-CAM map of a given output stride can put inside each reference mask.

The evaluation (:func:`model.multitask.evaluate.map_agreement`) scales a feature-resolution map to the mask's
size as pytorch-grad-cam does (:func:`model.common.explain.scale_maps`: min-max, bilinear resize, ReLU,
min-max) and measures the share of its energy inside the mask. Bilinear resizing spreads one feature
cell over a tent two cells wide, so a mask smaller than that tent cannot hold all of any map's energy.
Where the resized map has a zero pixel (a one-hot map has), the scaling is linear up to a factor, and
the share is a ratio of two linear functions of the cells, largest at a single cell; so the best
one-hot map is the ceiling. This script scores every one-hot map against every mask of a dataset and
prints, per target and stride, the mean (and median) of each mask's best cell.

Usage: .venv/bin/python tools/cam_ceiling.py /tmp/syntest [--image-size 224] [--strides 32 16 8]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from labeling_config import DIAGNOSIS_KEY, PATTERN_KEYS
from model.common.data import load_table
from model.common.explain import scale_maps


def grid_side(image_size: int, stride: int) -> int:
    """Feature-map side of MobileNet-V2 at ``stride``: each stride-2 convolution halves it, rounding up."""
    side = image_size
    for _ in range(int(math.log2(stride))):
        side = math.ceil(side / 2)
    return side


def read_masks(root: str) -> tuple[list[str], torch.Tensor]:
    """Every lesion mask of a BCC image and every pattern mask of a positive pattern, as in evaluation."""
    table = load_table(root)
    names: list[str] = []
    masks: list[np.ndarray] = []
    for row in table.to_dict("records"):
        if not row["mask_path"]:
            continue
        folder = Path(row["mask_path"]).parent
        paths = [(DIAGNOSIS_KEY, Path(row["mask_path"]))] if row[DIAGNOSIS_KEY] == 1 else []
        if row["has_patterns"]:
            paths += [(k, folder / f"{row['image_id']}_{k}.png") for k in PATTERN_KEYS if row[k] == 1]
        for key, path in paths:
            if path.is_file():
                with Image.open(path) as img:
                    masks.append(np.asarray(img.convert("L")) > 127)
                names.append(key)
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        raise SystemExit(f"masks of several sizes {shapes}: this script expects one")
    return names, torch.from_numpy(np.stack(masks)).float()


def best_cell_share(masks: torch.Tensor, side: int, chunk: int = 64) -> torch.Tensor:
    """For each ``(M, H, W)`` mask, the largest energy share inside it of any one-hot ``side x side`` map."""
    h, w = masks.shape[-2:]
    flat = masks.flatten(1).T  # (H*W, M)
    best = torch.zeros(len(masks))
    cells = torch.eye(side * side).view(-1, side, side)
    for start in range(0, len(cells), chunk):
        maps = scale_maps(cells[start : start + chunk], (h, w)).flatten(1)  # (c, H*W)
        share = (maps @ flat) / maps.sum(dim=1, keepdim=True)
        best = torch.maximum(best, share.max(dim=0).values)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="dataset folder with masks (e.g. a synthetic study)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (default: %(default)s)")
    parser.add_argument("--strides", type=int, nargs="+", default=[32, 16, 8])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names, masks = read_masks(args.data)
    frame = pd.DataFrame({"target": names, "area": masks.mean(dim=(1, 2)).numpy()})
    for stride in args.strides:
        side = grid_side(args.image_size, stride)
        frame[f"s{stride} ({side}x{side})"] = best_cell_share(masks, side).numpy()
    order = {k: i for i, k in enumerate([DIAGNOSIS_KEY, *PATTERN_KEYS])}
    grouped = frame.groupby("target", sort=False)
    summary = grouped.mean().assign(n=grouped.size()).sort_index(key=lambda s: s.map(order))
    medians = grouped.median().sort_index(key=lambda s: s.map(order))
    pd.set_option("display.width", 160)
    print(f"best one-hot map's energy inside the mask, mean over masks ({args.data}, {args.image_size} px)")
    print(summary.round(3).to_string())
    print("\nmedian over masks")
    print(medians.round(3).to_string())


if __name__ == "__main__":
    main()
