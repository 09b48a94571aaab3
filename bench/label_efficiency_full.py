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
(``--labels 100,200,400,800``). One process runs one seed of the ``--strategies`` (about 14 min per
strategy on one thread; ``bald`` and ``tta`` sample the pool as served: the 20 fixed dropout masks of
the same pass, and the flips and quarter turn). ``--labels N`` with ``N`` the whole training pool
trains the full-data reference once (no strategy is involved). ``--combine`` merges the runs' files
into the summary (mean, min and max over seeds; the labels each seed needed to reach 95 % of the
full-data reference) and the plot.

Usage: .venv/bin/python bench/label_efficiency_full.py [--data ../shared/data/derm-dev] [--size 128]
       [--epochs 6] [--labels 100,200,400,800] [--strategies random,least_confidence] [--seed 0]
       [--threads 1] [--out runs/label_efficiency_full/run.json]
       .venv/bin/python bench/label_efficiency_full.py --combine RUN.json [RUN.json ...]
       [--summary docs/label_efficiency_full.json] [--plot docs/label_efficiency_full.png]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from bench.label_efficiency import STRATEGIES, TARGET_SHARE, Pool, labels_to_reach, select  # noqa: E402
from labeling_config.schema import HAM_CLASSES  # noqa: E402
from model.common.acquisition import Outputs  # noqa: E402
from model.multitask.network import DermNet, dropout_masks, load_imagenet_features  # noqa: E402

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


def _split(logits: torch.Tensor) -> Outputs:
    """BCC probability and seven-class softmax from ``(..., 1 + 7)`` logits (last axis)."""
    return Outputs(
        binary=torch.sigmoid(logits[..., :1]).numpy(),
        categorical=torch.softmax(logits[..., 1:], dim=-1).numpy(),
    )


@torch.no_grad()
def outputs(model: DermNet, images: torch.Tensor, samples: bool = False) -> tuple[Outputs, np.ndarray, Pool]:
    """The model's BCC probability and seven-class softmax, its pooled features and, with ``samples``,
    a :class:`Pool` holding the Monte Carlo dropout outputs (the serving masks, from the same pass, as
    ``bald`` is served) and the outputs on the test-time views (flips and a quarter turn, as ``tta``)."""
    masks = dropout_masks(model.bcc_head.in_features, model.dropout_p)
    logits, feats, dropped, views = [], [], [], []
    for start in range(0, len(images), 64):
        x = images[start : start + 64].float() / 255.0
        features = model.forward_features(x)
        pooled = features.mean(dim=(-2, -1))
        logits.append(model.forward_heads(features))
        feats.append(pooled)
        if samples:
            dropped.append(model.head_samples(pooled, masks))
            turned = [x.flip(-1), x.flip(-2), torch.rot90(x, 1, dims=(-2, -1))]
            views.append(torch.stack([logits[-1], *(model(v) for v in turned)], dim=1))
    embeddings = torch.cat(feats).numpy()
    found = Pool(
        outputs=_split(torch.cat(logits)),
        embeddings=embeddings,
        labelled=np.zeros((0, embeddings.shape[1]), dtype=np.float32),
        dropout_samples=_split(torch.cat(dropped)) if samples else None,
        view_samples=_split(torch.cat(views)) if samples else None,
    )
    return found.outputs, embeddings, found


def combine(paths: list[Path], out: Path, figure: Path) -> dict[str, Any]:
    """Merge per-seed runs (and a full-data run: ``--labels N`` with N the whole pool) into one table:
    per strategy and round, the mean, min and max over seeds, and the labels each seed needed to reach
    95 % of the full-data model's BCC AUROC and balanced accuracy. Writes ``out`` and the plot."""
    seeds: dict[str, dict[str, Any]] = {}
    full: dict[str, list[float]] = {"auroc": [], "balanced_accuracy": []}
    commands: list[str] = []
    for path in paths:
        found = json.loads(path.read_text(encoding="utf-8"))
        commands.append(found["command"])
        for strategy, record in found["runs"].items():
            if record["labels"] == [found["pool"]]:  # every pool image labelled: no strategy involved
                full["auroc"] += record["auroc"]
                full["balanced_accuracy"] += record["balanced_accuracy"]
                continue
            seeds.setdefault(strategy, {})[found["settings"]["seed"]] = record
    reference = {k: float(np.mean(v)) if v else None for k, v in full.items()}
    summary: dict[str, Any] = {}
    for strategy in [s for s in STRATEGIES if s in seeds]:
        runs = list(seeds[strategy].values())
        length = min(len(r["labels"]) for r in runs)
        entry: dict[str, Any] = {"seeds": sorted(seeds[strategy]), "labels": runs[0]["labels"][:length]}
        for key in ("auroc", "balanced_accuracy", "bcc_labelled"):
            values = np.array([r[key][:length] for r in runs], dtype=float)
            entry[key] = {"mean": values.mean(0).tolist(), "min": values.min(0).tolist(),
                          "max": values.max(0).tolist()}  # fmt: skip
        for key, value in reference.items():
            if value is not None:
                entry[f"labels_to_95_{key}"] = [
                    labels_to_reach(r["labels"], r[key], TARGET_SHARE * value) for r in runs
                ]
        summary[strategy] = entry
    result = {"commands": commands, "full_data": reference, "strategies": summary, "runs": seeds}
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _plot(result, figure)
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.get_cmap("tab10")
    panels = (("auroc", "BCC AUROC (validation)"), ("balanced_accuracy", "7-class balanced accuracy"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for k, (strategy, entry) in enumerate(result["strategies"].items()):
            style = {"color": "black", "linewidth": 2.2} if strategy == "random" else {"color": colours(k)}
            label = f"{strategy} ({len(entry['seeds'])} seed{'s' * (len(entry['seeds']) > 1)})"
            ax.plot(entry["labels"], entry[key]["mean"], marker="o", label=label, **style)
            ax.fill_between(
                entry["labels"], entry[key]["min"], entry[key]["max"], alpha=0.12, color=style["color"]
            )
        full = result["full_data"].get(key)
        if full is not None:
            ax.axhline(TARGET_SHARE * full, color="grey", linestyle="--", linewidth=1)
            ax.axhline(full, color="grey", linestyle=":", linewidth=1)
            title += f"; dotted: all labels ({full:.3f}), dashed: 95 %"
        ax.set_title(title, fontsize=9)
        ax.set_xscale("log", base=2)
        ticks = next(iter(result["strategies"].values()))["labels"]
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled training images")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over seeds, band: min-max")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Acquisition on derm-dev, MobileNet-V2 fine-tuned end to end at every round (128 px)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "derm-dev")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--labels", default="100,200,400,800", help="labelled images at each round")
    parser.add_argument("--strategies", default="random,least_confidence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "label_efficiency_full" / "run.json")
    parser.add_argument("--combine", type=Path, nargs="+", help="merge these runs' JSON files instead")
    parser.add_argument("--summary", type=Path, default=ROOT / "docs" / "label_efficiency_full.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "label_efficiency_full.png")
    args = parser.parse_args(argv)
    if args.combine:
        result = combine(args.combine, args.summary, args.plot)
        print(
            json.dumps(
                {k: {m: v[m] for m in v if m.startswith("labels")} for k, v in result["strategies"].items()}
            )
        )
        print(f"full data: {result['full_data']}; wrote {args.summary} and {args.plot}")
        return 0
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
            val, _, _ = outputs(model, images[torch.from_numpy(val_rows)])
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
            sampled = strategy in ("bald", "tta")
            _, _, pool = outputs(model, images[torch.from_numpy(pool_rows)], samples=sampled)
            _, labelled_emb, _ = outputs(model, images[rows])
            pool = replace(pool, labelled=labelled_emb)
            more = schedule[round_ + 1] - len(labelled)
            labelled += [int(pool_rows[i]) for i in select(strategy, pool, more, rng)]
        result["runs"][strategy] = record
    result["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
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
