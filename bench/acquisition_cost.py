"""Benchmark: what each acquisition strategy costs per image when serving the released BCC model.

``python bench/acquisition_cost.py [--images sample/ham10000/images] [--n 64] [--repeats 3]``

On the shipped real sample (64 HAM10000 images), the released model (``models/dermnet-bcc.pt``) scores
every image the way ``/predict`` does (``backend.serving.multitask.run_batch``, without maps), once per
strategy, on ONNX Runtime with one thread:

- ``least_confidence`` / ``entropy``: the plain pass;
- ``bald``: the same pass with the 20 Monte Carlo dropout samples the graph computes on the pooled
  features (``mc_logits``);
- ``tta``: the pass on four views of each image.

The peer, measured in the same run: Monte Carlo dropout as it is usually done (MONAI Label's
epistemic strategy, Gal & Ghahramani's recipe): the whole network run 20 times in PyTorch with dropout
on, one thread. The script also checks that our BALD estimate and the peer's rank the images alike
(Spearman's rho of the mutual information; the peer draws fresh masks, ours are fixed).

Prints ms per image (median of the repeats) and the ratio to the peer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from backend.serving.multitask import load_served, run_batch, to_array  # noqa: E402
from model.common.acquisition import Outputs, mutual_information  # noqa: E402
from model.multitask.network import MC_SAMPLES  # noqa: E402


def _time(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=ROOT / "sample" / "ham10000" / "images")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "dermnet-bcc.pt")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    paths = sorted(args.images.glob("*.jpg"))[: args.n]
    if not paths:
        print(f"no images in {args.images}; nothing measured")
        return 0
    images = [Image.open(p).convert("RGB") for p in paths]
    served = load_served(args.model, engine="onnxruntime", threads=1)
    assert served.engine.name == "onnxruntime", "the release's ONNX graph is missing: make weights / release"
    eager = load_served(args.model, engine="torch")
    network = eager.engine.network  # type: ignore[attr-defined]
    n = len(images)

    rows: dict[str, float] = {}
    rows["least_confidence / entropy"] = _time(lambda: run_batch(served, images, maps=False), args.repeats)
    rows["bald (ours: 20 samples, one pass)"] = _time(
        lambda: run_batch(served, images, maps=False, sampling="dropout"), args.repeats
    )
    rows["tta (ours: 4 views)"] = _time(
        lambda: run_batch(served, images, maps=False, sampling="views"), args.repeats
    )

    batch = torch.from_numpy(np.stack([to_array(im, served.meta.input_size) for im in images]))
    temperatures = torch.tensor([float(served.meta.temperatures.get(k, 1.0)) for k in served.meta.targets])

    def peer() -> np.ndarray:
        network.eval()
        network.dropout.train()  # dropout on, batch norm in eval: MC dropout
        samples = []
        with torch.no_grad():
            for start in range(0, n, 16):
                chunk = batch[start : start + 16]
                samples.append(
                    torch.stack([torch.sigmoid(network(chunk) / temperatures) for _ in range(MC_SAMPLES)], 1)
                )
        network.eval()
        return torch.cat(samples).numpy()

    rows["peer: MC dropout, 20 full passes (PyTorch)"] = _time(peer, args.repeats)

    ours = np.stack([o.samples for o in run_batch(served, images, maps=False, sampling="dropout")])
    rho = spearmanr(
        mutual_information(Outputs(binary=ours)), mutual_information(Outputs(binary=peer()))
    ).statistic

    reference = rows["peer: MC dropout, 20 full passes (PyTorch)"] / n
    print(f"{n} real images (HAM10000 sample), released BCC model, one thread; median of {args.repeats}")
    print(f"{'strategy':45s} {'ms/image':>9s} {'vs peer':>8s}")
    for name, seconds in rows.items():
        per = seconds / n
        print(f"{name:45s} {per * 1000:9.1f} {per / reference:8.3f}")
    print(f"BALD ranking, ours vs the peer's (Spearman rho over the {n} images): {rho:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
