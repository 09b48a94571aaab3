"""Benchmark: the full-model check of the label-efficiency study's ranking (issue 17, part 2).

``bench/label_efficiency.py`` ranks the acquisition strategies with a cheap proxy (a head on frozen
ImageNet features). The issue asks one full-model run to confirm that ranking. Here the network itself,
MobileNet-V2 with the BCC head and a seven-class head (``DermNet(num_patterns=7)``, the second head
trained on the HAM10000 diagnosis), is fine-tuned end to end from ImageNet at every round, on the same
data, split and protocol: a random initial set, then batches chosen by each strategy from the model of
the round before (:func:`bench.label_efficiency.select`, the same code), scored on the fixed
lesion-grouped validation split.

To fit a CPU: images at ``--size`` px (default 128, not the released model's 224), ``--epochs`` of
training per round (flips as augmentation, class-balanced losses, AdamW), labels doubling per round
(``--labels 100,200,400,800``), one seed, the strategies ``random`` and ``least_confidence`` (the
proxy's best two for BCC) unless ``--strategies`` says more. It confirms or refutes the proxy's order
at these points; it is not a second sweep.

Usage: .venv/bin/python bench/label_efficiency_full.py [--data ../shared/data/derm-dev] [--size 128]
       [--epochs 6] [--labels 100,200,400,800] [--strategies random,least_confidence] [--seed 0]
       [--threads 1] [--out docs/label_efficiency_full.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from bench.label_efficiency import Pool, select  # noqa: E402
from labeling_config.schema import HAM_CLASSES  # noqa: E402
from model.common.acquisition import Outputs  # noqa: E402
from model.multitask.network import DermNet, load_imagenet_features  # noqa: E402

VAL_FRACTION, SPLIT_SEED = 0.2, 0


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """Every image resized to ``size`` x ``size`` (no crop), as uint8 ``(N, 3, S, S)``."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        out[i] = torch.from_numpy(array.transpose(2, 0, 1).copy())
        if (i + 1) % 1000 == 0:
            print(f"  loaded {i + 1}/{len(paths)} images", flush=True)
    return out


def train(images: torch.Tensor, bcc: torch.Tensor, dx: torch.Tensor, epochs: int, seed: int) -> DermNet:
    """Fine-tune MobileNet-V2 from ImageNet on the labelled images (BCC and the diagnosis)."""
    torch.manual_seed(seed)
    model = DermNet(num_patterns=len(HAM_CLASSES))
    load_imagenet_features(model)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    positives = float(bcc.sum())
    pos_weight = torch.tensor((len(bcc) - positives) / max(positives, 1.0))
    counts = torch.bincount(dx, minlength=len(HAM_CLASSES)).float()
    class_weight = torch.where(counts > 0, len(dx) / (len(HAM_CLASSES) * counts.clamp_min(1)), 0.0)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    ce = nn.CrossEntropyLoss(weight=class_weight)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            x = images[rows].float() / 255.0
            if torch.rand(1, generator=generator).item() < 0.5:
                x = x.flip(-1)
            if torch.rand(1, generator=generator).item() < 0.5:
                x = x.flip(-2)
            logits = model(x)
            loss = bce(logits[:, 0], bcc[rows].float()) + ce(logits[:, 1:], dx[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def outputs(model: DermNet, images: torch.Tensor) -> tuple[Outputs, np.ndarray]:
    """The model's BCC probability and seven-class softmax, and its pooled features."""
    probs, cats, feats = [], [], []
    for start in range(0, len(images), 64):
        x = images[start : start + 64].float() / 255.0
        features = model.forward_features(x)
        logits = model.forward_heads(features)
        probs.append(torch.sigmoid(logits[:, :1]))
        cats.append(torch.softmax(logits[:, 1:], dim=1))
        feats.append(features.mean(dim=(-2, -1)))
    return (
        Outputs(binary=torch.cat(probs).numpy(), categorical=torch.cat(cats).numpy()),
        torch.cat(feats).numpy(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "derm-dev")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--labels", default="100,200,400,800", help="labelled images at each round")
    parser.add_argument("--strategies", default="random,least_confidence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "label_efficiency_full.json")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"skipped: {args.data} is absent")
        return 0
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from model.common.data import load_tables, split_sources

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    table = load_tables([args.data])
    train_rows, val_rows = split_sources(table, VAL_FRACTION, seed=SPLIT_SEED)
    print(f"loading {len(table)} images at {args.size} px", flush=True)
    images = load_images(table["image_path"].tolist(), args.size)
    bcc = torch.from_numpy(table["bcc"].to_numpy(dtype=np.int64))
    dx = torch.tensor([HAM_CLASSES.index(str(d)) for d in table["dx"]])
    schedule = [int(n) for n in args.labels.split(",")]
    rng0 = np.random.default_rng(args.seed)
    initial = [int(i) for i in rng0.choice(train_rows, size=schedule[0], replace=False)]
    result: dict[str, Any] = {
        "command": "python bench/label_efficiency_full.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": {**{k: str(v) for k, v in vars(args).items()}},
        "pool": len(train_rows),
        "validation": len(val_rows),
        "runs": {},
    }
    for strategy in args.strategies.split(","):
        rng = np.random.default_rng([args.seed, 1])
        labelled = list(initial)
        record: dict[str, list[float]] = {
            "labels": [],
            "auroc": [],
            "balanced_accuracy": [],
            "bcc_labelled": [],
        }
        for round_ in range(len(schedule)):
            t0 = time.monotonic()
            rows = torch.tensor(labelled)
            model = train(images[rows], bcc[rows], dx[rows], args.epochs, args.seed * 100 + round_)
            val, _ = outputs(model, images[torch.from_numpy(val_rows)])
            assert val.binary is not None and val.categorical is not None
            auroc = float(roc_auc_score(bcc[val_rows].numpy(), val.binary[:, 0]))
            balanced = float(balanced_accuracy_score(dx[val_rows].numpy(), val.categorical.argmax(axis=1)))
            record["labels"].append(len(labelled))
            record["auroc"].append(auroc)
            record["balanced_accuracy"].append(balanced)
            record["bcc_labelled"].append(int(bcc[rows].sum()))
            print(
                f"  {strategy:>17s} {len(labelled):5d} labels: AUROC {auroc:.4f}, balanced accuracy "
                f"{balanced:.4f}, {int(bcc[rows].sum())} BCC labelled ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
            if round_ + 1 == len(schedule):
                break
            taken = set(labelled)
            pool_rows = np.array([i for i in train_rows if int(i) not in taken], dtype=np.int64)
            pool_out, pool_emb = outputs(model, images[torch.from_numpy(pool_rows)])
            _, labelled_emb = outputs(model, images[rows])
            pool = Pool(outputs=pool_out, embeddings=pool_emb, labelled=labelled_emb)
            more = schedule[round_ + 1] - len(labelled)
            labelled += [int(pool_rows[i]) for i in select(strategy, pool, more, rng)]
        result["runs"][strategy] = record
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{'labels':>6s} " + " ".join(f"{s:>22s}" for s in result["runs"]))
    for i, n in enumerate(schedule):
        cells = [
            f"{r['auroc'][i]:.3f} / {r['balanced_accuracy'][i]:.3f}"
            for r in result["runs"].values()
            if i < len(r["auroc"])
        ]
        print(f"{n:6d} " + " ".join(f"{c:>22s}" for c in cells))
    print(f"(BCC AUROC / seven-class balanced accuracy on the validation split); {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
