"""The BCC region on real images, before and after: the whole-image half-maximum blob vs the compact piece
inside the U-Net's lesion outline that the backend now draws.

On the BCC images of a DermNet checkpoint's validation split (derm-dev), against the reference lesion
masks; intervals: 95% bootstrap over lesions::

    python tools/measure_regions.py models/dermnet-bcc.pt models/lesion-unet.pt ../shared/data/derm-dev \\
        --out runs/regions [--gallery 6]

Per image and rule: the map's energy inside the reference lesion, the drawn region's area as a share of
the lesion's, the share of the drawn region inside the lesion, and the pointing game (the map's peak in
the lesion). ``before``: :func:`model.common.explain.cam_to_mask` on the whole image (what was drawn until
now); ``after``: :func:`model.common.explain.compact_region` with the U-Net's mask (what the backend draws).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from backend.label_studio.predictions import MASK_THRESHOLD, REGION_MAX_SHARE
from backend.serving.multitask import load_served, run_batch
from model.common.data import load_table, split_by_lesion, split_sources
from model.common.explain import cam_to_mask, compact_region, scale_maps
from model.common.metrics import bootstrap
from model.lesion.evaluate_seg import predict_masks
from model.lesion.segmentation import load_segnet


def _measure(cam: Any, drawn: Any, lesion: Any) -> dict[str, float]:
    total = float(cam.sum())
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return {
        "energy_inside": float(cam[lesion].sum() / total) if total > 0 else float("nan"),
        "area_share": float(drawn.sum() / max(1, lesion.sum())),
        "region_inside": float((drawn & lesion).sum() / drawn.sum()) if drawn.any() else float("nan"),
        "pointing": float(lesion[peak]) if total > 0 else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dermnet")
    parser.add_argument("segnet")
    parser.add_argument("data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gallery", type=int, default=6)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    served = load_served(args.dermnet)
    segnet, seg_meta = load_segnet(args.segnet)
    table = load_table(args.data)
    cfg = served.meta.extra.get("train_config", {})
    _, val = split_sources(table, cfg.get("val_fraction", 0.2), seed=cfg.get("split_seed", 0))
    rows = table.iloc[val]
    rows = rows[(rows["bcc"] == 1) & rows["mask_path"].notna()].reset_index(drop=True)
    seg_cfg = seg_meta.extra.get("train_config", {})
    _, seg_val = split_by_lesion(
        table,
        seg_cfg.get("val_fraction", 0.2),
        int(seg_cfg.get("split_seed", 0)),
        str(seg_cfg.get("stratify", "bcc")),
    )
    unseen_by_segnet = set(table["image_id"].iloc[seg_val])
    records: list[dict[str, Any]] = []
    examples: list[tuple[str, Any, Any, Any, Any]] = []
    for row in rows.to_dict("records"):
        with Image.open(row["image_path"]) as im:
            image = im.convert("RGB")
        with Image.open(row["mask_path"]) as m:
            lesion = np.asarray(m.convert("L")) > 127
        (output,) = run_batch(served, [image])
        raw = output.maps[0]
        h, w = lesion.shape
        cam = scale_maps(raw, (h, w)).numpy()
        outline = predict_masks(segnet, [np.array(image)], seg_meta.input_size, seg_meta.threshold)[0]
        before = cam_to_mask(raw, w, h, MASK_THRESHOLD)
        after = compact_region(raw, w, h, outline, MASK_THRESHOLD, REGION_MAX_SHARE)
        inside = cam * outline
        records.append(
            {
                "image_id": row["image_id"],
                "lesion_id": row["lesion_id"],
                "p_bcc": output.probs["bcc"],
                "segnet_held_out": row["image_id"] in unseen_by_segnet,
                **{f"before_{k}": v for k, v in _measure(cam, before, lesion).items()},
                **{f"after_{k}": v for k, v in _measure(inside, after, lesion).items()},
            }
        )
        if len(examples) < args.gallery:
            examples.append((row["image_id"], np.asarray(image), lesion, before, after))

    frame = pd.DataFrame(records)
    names = [c for c in frame.columns if c.startswith(("before_", "after_"))]

    def summary(sub: pd.DataFrame) -> dict[str, Any]:
        def means(index: Any) -> dict[str, float]:
            return {c: float(np.nanmean(sub[c].to_numpy()[index])) for c in names}

        return {"n_images": len(sub), **bootstrap(means, sub["lesion_id"].to_numpy(), args.bootstrap, 0)}

    held_out = frame[frame["segnet_held_out"]].reset_index(drop=True)
    result = {
        # the images the U-Net did not train on either (its split is stratified by diagnosis)
        "segnet_held_out": summary(held_out) if len(held_out) else {"n_images": 0},
        "dermnet": args.dermnet,
        "segnet": args.segnet,
        "data": args.data,
        "n_lesions": int(frame["lesion_id"].nunique()),
        "region_rule": {"threshold": MASK_THRESHOLD, "max_share_of_lesion": REGION_MAX_SHARE},
        **summary(frame),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    frame.to_csv(out / "per_image.csv", index=False)
    _gallery(out / "regions.png", examples)
    for metric in ("energy_inside", "area_share", "region_inside", "pointing"):
        b, a = result[f"before_{metric}"], result[f"after_{metric}"]
        print(
            f"{metric:14s} before {b['value']:.3f} [{b['low']:.3f}, {b['high']:.3f}]"
            f"  after {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"
        )
    return 0


def _gallery(path: Path, examples: list[tuple[str, Any, Any, Any, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        return
    fig, axes = plt.subplots(2, len(examples), figsize=(3 * len(examples), 5.4), squeeze=False)
    for j, (image_id, image, lesion, before, after) in enumerate(examples):
        for i, (drawn, title) in enumerate(((before, "before"), (after, "after"))):
            ax = axes[i, j]
            ax.imshow(image)
            ax.contour(lesion, levels=[0.5], colors="white", linewidths=1)
            ax.imshow(np.where(drawn, 1.0, np.nan), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(f"{image_id} {title}", fontsize=8)
            ax.axis("off")
    fig.suptitle("BCC region drawn (yellow) and the reference lesion outline (white)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
