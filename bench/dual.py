"""The second system's inference cost against the first, in one run (a script, not a timed test).

Per image, on one thread, interleaved rounds on the same random images: the single MobileNet-V2
multitask model (DermNet, 224 px), the segmentation U-Net (192 px), the dual-encoder classifier
(160 px image + 128 px lesion crop + metadata), and segmentation + lesion crop + dual classification
together. Prints ms per image (median of rounds) and the ratio of the pipeline to DermNet.

    .venv/bin/python bench/dual.py --images 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.lesion.dual import DualNet, encode_metadata, lesion_crop
from model.lesion.unet import SegNet
from model.multitask.network import DermNet


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.images, 3, 450, 600)  # HAM10000's size
    meta = encode_metadata([{"age": 60, "sex": "male", "localization": "back"}] * args.images)
    dermnet, segnet, dual = DermNet().eval(), SegNet().eval(), DualNet().eval()

    def resize(x: torch.Tensor, side: int) -> torch.Tensor:
        return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True)

    def run_dermnet() -> None:
        dermnet(resize(images, 224))

    def run_segnet() -> None:
        segnet(resize(images, 192))

    def run_dual_only() -> None:
        dual(resize(images, 160), resize(images, 128), meta)

    def run_pipeline() -> None:
        masks = torch.sigmoid(segnet(resize(images, 192)))
        masks = torch.nn.functional.interpolate(masks, size=images.shape[-2:], mode="bilinear") >= 0.5
        crops = torch.stack([lesion_crop(im, m[0].numpy(), 128) for im, m in zip(images, masks, strict=True)])
        dual(resize(images, 160), crops, meta)

    cases: dict[str, Callable[[], None]] = {
        "DermNet (single MobileNet-V2, 224 px)": run_dermnet,
        "segmentation U-Net (192 px)": run_segnet,
        "dual-encoder classifier (160 + 128 px + metadata)": run_dual_only,
        "segmentation + crop + dual classifier": run_pipeline,
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                timings[name].append(1000 * (time.perf_counter() - t0) / args.images)
    print(
        f"{args.images} images of 600x450, {args.rounds} rounds, {args.threads} thread(s): "
        "ms per image (median)"
    )
    medians = {name: statistics.median(values) for name, values in timings.items()}
    for name, value in medians.items():
        print(f"  {name:<52} {value:8.1f}")
    base = medians["DermNet (single MobileNet-V2, 224 px)"]
    print(f"pipeline / DermNet = {medians['segmentation + crop + dual classifier'] / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
