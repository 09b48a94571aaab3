"""Benchmark: which acquisition strategy saves dermatologists' labels on real dermoscopy (issue 17, part 2).

A cheap proxy for retraining the network at every round, measured on the 4,038 real HAM10000 images of
../shared/data/derm-dev:

1. **Embeddings.** torchvision's ImageNet MobileNet-V2 (the local file of ``make weights``; nothing is
   downloaded) turns every image, resized to 224 x 224 without cropping and normalised with ImageNet's
   statistics, into its global-average-pooled 1,280-d feature vector; likewise each of the dihedral views
   the ``tta`` strategy samples over (identity, horizontal flip, vertical flip, 90-degree turn and, with
   ``--views 8``, the other four of the square's symmetries). They are cached in
   ``runs/label_efficiency/embeddings.npz``, so a rerun starts at once.
2. **Proxy model.** A small head on the frozen, standardised embeddings,
   ``Linear(1280, 128) - ReLU - Dropout(0.3) - Linear(128, 1 + 7)``: one BCC logit (sigmoid) and the
   seven HAM10000 diagnoses (softmax), trained with class-balanced BCE + CE (the weights from the
   labelled set itself), Adam (lr 1e-3, weight decay 1e-4), 40 epochs of mini-batches of 128 but at
   least 200 steps; retrained from scratch, seeded, every round.
3. **Strategies** (``model.common.acquisition``), on the outputs the proxy serves, as a deployment
   serving both systems would: ``Outputs(binary=BCC probability, categorical=the 7-class softmax)``.
   ``random``; ``least_confidence`` (by its definition, the BCC output alone); ``entropy`` (BCC and the
   diagnosis); ``bald`` (Monte Carlo dropout, T = 20); ``tta`` (the head's outputs on the views'
   embeddings as the samples); ``coreset`` (k-center greedy on the embeddings, the labelled images as
   centres); ``entropy+diversity`` (:func:`~model.common.acquisition.diverse_batch`, pool factor 4).
   Embedding distances (core-set, diversity) are taken on the standardised 1,280-d features.
4. **Protocol.** The fixed lesion-grouped validation split that training uses
   (``split_sources(table, 0.2, seed=0)``, as ``model/multitask/train.py``) is never labelled; the pool
   is the training split. Per seed: ``--initial`` random labelled images, then ``--batch`` more per
   round chosen by the strategy, for ``--rounds`` rounds. After each round: BCC AUROC and 7-class
   balanced accuracy on the validation split. The seed sets the initial set, the head's initialisation
   and dropout, and random's picks; every strategy of one seed starts from the same initial set. The
   reference is the head trained on every training image (per seed, then the mean): printed are the
   labels each strategy needs to reach 95 % of its AUROC (first round at which the seeds' mean reaches
   it, and per seed).

Honest limits:

- A frozen ImageNet backbone is not the fine-tuned network: the representation does not improve with
  the labels, and core-set distances are ImageNet's, not the task's. It ranks strategies cheaply; it
  does not say how many labels the real network needs. :func:`select` takes any model's outputs, so a
  full-model confirmation run can reuse the strategies unchanged.
- The validation split is lesion-grouped (no lesion on both sides), but its rows are images: a lesion
  photographed several times counts several times in the AUROC.
- 207 BCC images (131 lesions) in all, about 40 in validation: the AUROC moves by a few points between
  seeds; read the min-max bands before a difference of means.
- derm-dev's images are mostly 200 x 150 (upsampled to 224 here).
- The labelled set comes from one pool of ~3,200 images; a deployment's pool is larger and less curated.

Usage: .venv/bin/python bench/label_efficiency.py [--data ../shared/data/derm-dev] [--seeds 3]
       [--initial 100] [--batch 100] [--rounds 15] [--views 4] [--threads 1] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from labeling_config import HAM_CLASSES  # noqa: E402
from model.common import acquisition  # noqa: E402
from model.common.acquisition import Outputs  # noqa: E402

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

STRATEGIES = (
    "random",
    "least_confidence",
    "entropy",
    "bald",
    "tta",
    "coreset",
    "entropy+diversity",
)
# the square's eight symmetries: (turns by 90 degrees, then a horizontal flip)
DIHEDRAL = {
    "identity": (0, False),
    "hflip": (0, True),
    "vflip": (2, True),
    "rot90": (1, False),
    "rot180": (2, False),
    "rot270": (3, False),
    "transpose": (1, True),
    "antitranspose": (3, True),
}
IMAGE_SIZE = 224
EMBEDDING_DIM = 1280
MC_SAMPLES = 20
TARGET_SHARE = 0.95
VAL_FRACTION, SPLIT_SEED = 0.2, 0  # as model/multitask/train.py's TrainConfig


@dataclass(frozen=True)
class HeadConfig:
    """The proxy head and its training: sizes, dropout, Adam, epochs, mini-batch.

    ``epochs`` passes over the labelled set, but at least ``min_steps`` optimiser steps, so that a small
    set (100 images: one mini-batch) is trained too.
    """

    hidden: int = 128
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 128
    min_steps: int = 200


# ----------------------------------------------------------------------------------------------- embeddings


def view(images: torch.Tensor, name: str) -> torch.Tensor:
    """One dihedral view (:data:`DIHEDRAL`) of a ``(B, C, H, W)`` batch of square images."""
    turns, flip = DIHEDRAL[name]
    out = torch.rot90(images, turns, dims=(2, 3))
    return torch.flip(out, dims=(3,)) if flip else out


def mobilenet_features() -> nn.Module:
    """torchvision's ImageNet MobileNet-V2 ``features`` + global average pooling, from the local file only."""
    from torchvision.models import mobilenet_v2

    from model.common.imagenet import imagenet_features_state

    net = mobilenet_v2(weights=None)
    net.features.load_state_dict(imagenet_features_state())
    return nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def load_image(path: str) -> torch.Tensor:
    """An image as a ``(3, 224, 224)`` float tensor: resized without cropping, ImageNet-normalised."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as tf

    from model.common.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from model.common.training import transforms

    with Image.open(path) as im:
        pixels = tf.pil_to_tensor(im.convert("RGB"))
    resized = transforms(IMAGE_SIZE, False)(pixels)
    out: torch.Tensor = tf.normalize(
        tf.to_dtype(resized, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD
    )
    return out


def embed(paths: Sequence[str], views: Sequence[str], batch_images: int = 8) -> FloatArray:
    """``(N, V, 1280)`` embeddings of every image in every view, with a printed counter."""
    net = mobilenet_features()
    out = np.zeros((len(paths), len(views), EMBEDDING_DIM), dtype=np.float32)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(paths), batch_images):
            batch = torch.stack([load_image(p) for p in paths[first : first + batch_images]])
            stacked = torch.cat([view(batch, v) for v in views])  # (V * B, ...), view-major
            features = net(stacked).reshape(len(views), len(batch), EMBEDDING_DIM)
            out[first : first + len(batch)] = features.transpose(0, 1).numpy()
            done = first + len(batch)
            if done % 400 < batch_images or done == len(paths):
                spent = time.perf_counter() - start
                print(
                    f"  embedded {done}/{len(paths)} images x {len(views)} views "
                    f"({1000 * spent / (done * len(views)):.1f} ms per image-view, {spent:.0f} s)",
                    flush=True,
                )
    return out.astype(np.float64)


def cached_embeddings(
    image_ids: Sequence[str], paths: Sequence[str], views: Sequence[str], cache: Path
) -> tuple[FloatArray, float]:
    """:func:`embed`, read from ``cache`` when it holds these images in (at least) these views.

    Returns:
        ``(N, V, 1280)`` embeddings in the order of ``views``, and the seconds spent computing them
        (0 when read from the cache).
    """
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            ids, names = stored["image_ids"].tolist(), stored["views"].tolist()
            if ids == list(image_ids) and set(views) <= set(names):
                print(f"embeddings: read from {cache}", flush=True)
                picked = stored["embeddings"][:, [names.index(v) for v in views]]
                return picked.astype(np.float64), 0.0
    print(f"embeddings: computing {len(paths)} images x {len(views)} views (cached in {cache})", flush=True)
    start = time.perf_counter()
    emb = embed(paths, views)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        cache, image_ids=np.array(image_ids), views=np.array(views), embeddings=emb.astype(np.float32)
    )
    return emb, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- proxy head


class Head(nn.Module):
    """``Linear - ReLU - Dropout - Linear`` to one BCC logit and the seven diagnosis logits."""

    def __init__(self, dim: int = EMBEDDING_DIM, config: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout))
        self.out = nn.Linear(config.hidden, 1 + len(HAM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.body(x))
        return out


def train_head(
    x: FloatArray, bcc: IntArray, dx: IntArray, seed: int, config: HeadConfig = HeadConfig()
) -> Head:
    """A :class:`Head` trained from scratch on standardised embeddings ``x`` with class-balanced losses.

    The BCE's positive weight is negatives / positives and the CE's class weights are inverse class
    frequencies, both of the labelled set (classes it lacks get weight 0: they never occur in the loss).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = Head(x.shape[1], config)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yb = torch.as_tensor(bcc, dtype=torch.float32)
    yd = torch.as_tensor(dx, dtype=torch.int64)
    positives = float(yb.sum())
    pos_weight = torch.tensor((len(yb) - positives) / positives if positives else 1.0)
    counts = torch.bincount(yd, minlength=len(HAM_CLASSES)).float()
    weight = torch.where(counts > 0, len(yd) / (len(HAM_CLASSES) * counts.clamp(min=1)), 0.0)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    ce = nn.CrossEntropyLoss(weight=weight)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batches = -(-len(xt) // config.batch_size)
    head.train()
    for _ in range(max(config.epochs, -(-config.min_steps // batches))):
        order = torch.randperm(len(xt), generator=generator)
        for first in range(0, len(xt), config.batch_size):
            rows = order[first : first + config.batch_size]
            logits = head(xt[rows])
            loss = bce(logits[:, 0], yb[rows]) + ce(logits[:, 1:], yd[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


def predict(head: Head, x: FloatArray, samples: int = 0, seed: int = 0) -> Outputs:
    """The head's probabilities for the rows of ``x``: ``(N, 1)`` BCC and ``(N, 7)`` diagnosis.

    With ``samples`` > 0, that many Monte Carlo dropout passes (dropout on): ``(N, T, ...)`` outputs.
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    with torch.inference_mode():
        if samples <= 0:
            head.eval()
            logits = head(xt)[:, None]
        else:
            torch.manual_seed(seed)
            head.train()
            logits = torch.stack([head(xt) for _ in range(samples)], dim=1)
            head.eval()
    binary = torch.sigmoid(logits[..., :1]).double().numpy()
    categorical = torch.softmax(logits[..., 1:].double(), dim=-1).numpy()
    if samples <= 0:
        binary, categorical = binary[:, 0], categorical[:, 0]
    return Outputs(binary=binary, categorical=categorical)


def view_samples(head: Head, views: FloatArray, rows: IntArray) -> Outputs:
    """The head's outputs (dropout off) on each view of ``rows``: ``(N, V, ...)`` samples.

    Args:
        views: ``(images, V, 1280)`` embeddings of every view.
        rows: the images to score.
    """
    per_view = [predict(head, views[rows, v]) for v in range(views.shape[1])]
    return Outputs(
        binary=np.stack([o.binary for o in per_view if o.binary is not None], axis=1),
        categorical=np.stack([o.categorical for o in per_view if o.categorical is not None], axis=1),
    )


# ---------------------------------------------------------------------------------------------- strategies


@dataclass
class Pool:
    """What a strategy sees of the unlabelled pool (row i of each array is pool image i).

    Attributes:
        outputs: the model's deterministic outputs.
        embeddings: ``(N, D)`` embeddings (core-set, diversity).
        labelled: ``(M, D)`` embeddings of the images labelled so far.
        dropout_samples: Monte Carlo dropout outputs ``(N, T, ...)`` (for ``bald``), or a callable.
        view_samples: outputs on the augmented views ``(N, V, ...)`` (for ``tta``), or a callable.
    """

    outputs: Outputs
    embeddings: FloatArray
    labelled: FloatArray
    dropout_samples: Outputs | Callable[[], Outputs] | None = None
    view_samples: Outputs | Callable[[], Outputs] | None = None


def _resolve(samples: Outputs | Callable[[], Outputs] | None, strategy: str) -> Outputs:
    if samples is None:
        raise ValueError(f"the {strategy} strategy needs sampled outputs")
    return samples if isinstance(samples, Outputs) else samples()


def most_uncertain(uncertainties: FloatArray, n: int) -> list[int]:
    """The ``n`` rows of highest uncertainty, ties by row (as :func:`acquisition.diverse_batch` orders)."""
    order = np.lexsort((np.arange(len(uncertainties)), -np.asarray(uncertainties)))
    return [int(i) for i in order[: max(0, n)]]


def select(strategy: str, pool: Pool, n: int, rng: np.random.Generator) -> list[int]:
    """Which ``n`` pool rows ``strategy`` (:data:`STRATEGIES`) asks the dermatologists to label next.

    Model-agnostic: a full-model run fills :class:`Pool` from the fine-tuned network's outputs,
    dropout passes, augmented views and pooled features.

    Raises:
        ValueError: an unknown strategy, or ``bald`` / ``tta`` without their samples.
    """
    size = len(pool.embeddings)
    n = min(n, size)
    if strategy == "random":
        return [int(i) for i in rng.choice(size, size=n, replace=False)]
    if strategy == "coreset":
        return acquisition.k_center_greedy(pool.embeddings, n, pool.labelled)
    if strategy == "entropy+diversity":
        u = acquisition.entropy(pool.outputs)
        return acquisition.diverse_batch(u, pool.embeddings, n, labelled=pool.labelled)
    if strategy in ("least_confidence", "entropy"):
        return most_uncertain(acquisition.uncertainty(strategy, pool.outputs), n)
    if strategy == "bald":
        samples = _resolve(pool.dropout_samples, strategy)
    elif strategy == "tta":
        samples = _resolve(pool.view_samples, strategy)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return most_uncertain(acquisition.uncertainty(strategy, pool.outputs, samples), n)


# ----------------------------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Study:
    """The data of one run: standardised embeddings, labels and the fixed split."""

    views: FloatArray  # (N, V, D), view 0 the identity
    bcc: IntArray
    dx: IntArray
    train: IntArray
    val: IntArray

    @property
    def x(self) -> FloatArray:
        return self.views[:, 0]


def evaluate(head: Head, study: Study) -> tuple[float, float]:
    """BCC AUROC and 7-class balanced accuracy of ``head`` on the validation split."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    out = predict(head, study.x[study.val])
    assert out.binary is not None and out.categorical is not None
    auroc = float(roc_auc_score(study.bcc[study.val], out.binary[:, 0]))
    balanced = float(balanced_accuracy_score(study.dx[study.val], out.categorical.argmax(axis=1)))
    return auroc, balanced


def run_strategy(
    study: Study, strategy: str, seed: int, initial: IntArray, batch: int, rounds: int, config: HeadConfig
) -> dict[str, list[float]]:
    """One seed of one strategy: labels, AUROC, balanced accuracy and BCC images labelled, per round."""
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    labelled = [int(i) for i in initial]
    record: dict[str, list[float]] = {"labels": [], "auroc": [], "balanced_accuracy": [], "bcc_labelled": []}
    for round_ in range(rounds + 1):
        rows = np.array(labelled, dtype=np.int64)
        head = train_head(study.x[rows], study.bcc[rows], study.dx[rows], seed * 1000 + round_, config)
        auroc, balanced = evaluate(head, study)
        record["labels"].append(len(rows))
        record["auroc"].append(auroc)
        record["balanced_accuracy"].append(balanced)
        record["bcc_labelled"].append(int(study.bcc[rows].sum()))
        if round_ == rounds:
            break
        taken = set(labelled)
        pool_rows = np.array([i for i in study.train if int(i) not in taken], dtype=np.int64)
        if len(pool_rows) == 0:
            break
        pool_x = study.x[pool_rows]
        pool = Pool(
            outputs=predict(head, pool_x),
            embeddings=pool_x,
            labelled=study.x[rows],
            dropout_samples=partial(predict, head, pool_x, MC_SAMPLES, seed * 1000 + round_),
            view_samples=partial(view_samples, head, study.views, pool_rows),
        )
        labelled += [int(pool_rows[i]) for i in select(strategy, pool, batch, rng)]
    return record


def labels_to_reach(labels: Sequence[float], values: Sequence[float], target: float) -> int | None:
    """The first number of labels at which ``values`` reaches ``target``; None if it never does."""
    return next((int(n) for n, v in zip(labels, values, strict=True) if v >= target), None)


def summarise(runs: list[dict[str, list[float]]], key: str) -> dict[str, list[float]]:
    """Mean, min and max over seeds, per round (rounds every seed reached)."""
    length = min(len(r[key]) for r in runs)
    values = np.array([r[key][:length] for r in runs])
    return {
        "labels": runs[0]["labels"][:length],
        "mean": values.mean(axis=0).tolist(),
        "min": values.min(axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels, BCC AUROC and balanced accuracy vs labels: mean lines, min-max bands, 95 % lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.get_cmap("tab10")
    panels = (("auroc", "BCC AUROC (validation)"), ("balanced_accuracy", "7-class balanced accuracy"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for k, strategy in enumerate(STRATEGIES):
            s = result["strategies"][strategy][key]
            style = {"color": "black", "linewidth": 2.2} if strategy == "random" else {"color": colours(k)}
            ax.plot(s["labels"], s["mean"], label=strategy, **style)
            ax.fill_between(s["labels"], s["min"], s["max"], alpha=0.12, color=style["color"])
        full = result["full_data"][key]["mean"]
        ax.axhline(TARGET_SHARE * full, color="grey", linestyle="--", linewidth=1)
        ax.axhline(full, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{title}; dashed: 95 % of all {result['pool_size']} labels ({full:.3f}), dotted: all")
        ax.title.set_fontsize(9)
        ax.set_xlabel("labelled training images")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over seeds, band: min-max")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Acquisition on derm-dev (frozen ImageNet MobileNet-V2 + head proxy, {len(result['seeds'])} seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_study(data: Path, views: Sequence[str], cache: Path) -> tuple[Study, float]:
    """The table, the training split (``split_sources`` as training) and the cached embeddings."""
    from model.common.data import load_tables, split_sources

    table = load_tables([data])
    train, val = split_sources(table, VAL_FRACTION, seed=SPLIT_SEED)
    emb, seconds = cached_embeddings(table["image_id"].tolist(), table["image_path"].tolist(), views, cache)
    mean = emb[train, 0].mean(axis=0)
    std = emb[train, 0].std(axis=0) + 1e-6
    dx = np.array([HAM_CLASSES.index(str(d)) for d in table["dx"]], dtype=np.int64)
    study = Study(
        views=(emb - mean) / std,
        bcc=table["bcc"].to_numpy(dtype=np.int64),
        dx=dx,
        train=train,
        val=val,
    )
    return study, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "derm-dev")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--initial", type=int, default=100, help="random labelled images to start from")
    parser.add_argument("--batch", type=int, default=100, help="images labelled per round")
    parser.add_argument("--rounds", type=int, default=15, help="acquisition rounds after the initial set")
    parser.add_argument("--views", type=int, choices=(4, 8), default=4, help="dihedral views for tta")
    parser.add_argument("--epochs", type=int, default=HeadConfig.epochs)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "label_efficiency" / "embeddings.npz")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(f"skipped: {args.data} is absent (the real HAM10000 images of derm-dev)")
        return 0
    torch.set_num_threads(args.threads)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; use {', '.join(STRATEGIES)}")
    views = list(DIHEDRAL)[: args.views]
    config = HeadConfig(epochs=args.epochs)
    started = time.perf_counter()
    study, embed_seconds = load_study(args.data, views, args.cache)
    print(
        f"split: {len(study.train)} training images (the pool), {len(study.val)} validation "
        f"({int(study.bcc[study.val].sum())} BCC); views: {', '.join(views)}",
        flush=True,
    )

    seeds = list(range(args.seeds))
    full: dict[str, list[float]] = {"auroc": [], "balanced_accuracy": []}
    for seed in seeds:
        head = train_head(study.x[study.train], study.bcc[study.train], study.dx[study.train], seed, config)
        auroc, balanced = evaluate(head, study)
        full["auroc"].append(auroc)
        full["balanced_accuracy"].append(balanced)
    full_summary: dict[str, dict[str, Any]] = {
        k: {"per_seed": v, "mean": float(np.mean(v))} for k, v in full.items()
    }
    print(
        f"all {len(study.train)} labels: AUROC {full_summary['auroc']['mean']:.4f} "
        f"{[round(v, 4) for v in full['auroc']]}, balanced accuracy "
        f"{full_summary['balanced_accuracy']['mean']:.4f}",
        flush=True,
    )

    runs: dict[str, list[dict[str, list[float]]]] = {s: [] for s in strategies}
    seconds = dict.fromkeys(strategies, 0.0)
    for seed in seeds:
        initial = np.random.default_rng(seed).choice(study.train, size=args.initial, replace=False)
        for strategy in strategies:
            t0 = time.perf_counter()
            runs[strategy].append(
                run_strategy(study, strategy, seed, initial, args.batch, args.rounds, config)
            )
            seconds[strategy] += time.perf_counter() - t0
            last = runs[strategy][-1]
            print(
                f"  seed {seed} {strategy:>17}: AUROC {last['auroc'][-1]:.4f} at {last['labels'][-1]:.0f} "
                f"labels, {last['bcc_labelled'][-1]:.0f} BCC labelled ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    result: dict[str, Any] = {
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "bench/label_efficiency.py", *(argv or sys.argv[1:])]
        ),
        "settings": {
            "data": str(args.data),
            "seeds": seeds,
            "initial": args.initial,
            "batch": args.batch,
            "rounds": args.rounds,
            "views": views,
            "mc_samples": MC_SAMPLES,
            "pool_factor": acquisition.POOL_FACTOR,
            "head": asdict(config),
            "threads": args.threads,
            "split": f"split_sources(table, {VAL_FRACTION}, seed={SPLIT_SEED}), lesion-grouped",
            "outputs_for_acquisition": "binary=(BCC probability,), categorical=7-class HAM10000 softmax",
            "embedding_distance": "Euclidean on standardised 1280-d ImageNet MobileNet-V2 pooled features",
        },
        "seeds": seeds,
        "pool_size": len(study.train),
        "pool_bcc": int(study.bcc[study.train].sum()),
        "validation": {"images": len(study.val), "bcc_images": int(study.bcc[study.val].sum())},
        "full_data": full_summary,
        "strategies": {},
    }
    targets = {k: TARGET_SHARE * full_summary[k]["mean"] for k in full}
    for strategy in strategies:
        entry: dict[str, Any] = {"per_seed": runs[strategy]}
        for key in ("auroc", "balanced_accuracy", "bcc_labelled"):
            entry[key] = summarise(runs[strategy], key)
        for key in ("auroc", "balanced_accuracy"):
            s = entry[key]
            entry[f"labels_to_95pct_{key}"] = {
                "mean_curve": labels_to_reach(s["labels"], s["mean"], targets[key]),
                "per_seed": [labels_to_reach(r["labels"], r[key], targets[key]) for r in runs[strategy]],
            }
        result["strategies"][strategy] = entry
    result["seconds"] = {
        "embeddings": embed_seconds,
        "strategies": seconds,
        "total": time.perf_counter() - started,
    }

    print_tables(result, strategies, targets)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_efficiency.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if set(strategies) == set(STRATEGIES):
        plot(result, args.out / "label_efficiency.png")
    print(f"wrote {args.out / 'label_efficiency.json'}; {result['seconds']['total']:.0f} s in all")
    return 0


def print_tables(result: dict[str, Any], strategies: Sequence[str], targets: dict[str, float]) -> None:
    """The strategy x labels table (mean [min, max]) and the labels-to-95 % table."""
    for key, name in (("auroc", "BCC AUROC"), ("balanced_accuracy", "7-class balanced accuracy")):
        series = [result["strategies"][strategy][key] for strategy in strategies]
        print(f"\n{name} on validation, mean [min, max] over {len(result['seeds'])} seeds")
        print(f"{'labels':>6} " + " ".join(f"{strategy:>19}" for strategy in strategies))
        for k, labels in enumerate(series[0]["labels"]):
            cells = [f"{s['mean'][k]:.3f} [{s['min'][k]:.3f},{s['max'][k]:.3f}]" for s in series]
            print(f"{labels:>6.0f} " + " ".join(f"{c:>19}" for c in cells))
    print(
        f"\nlabels to reach 95 % of the all-labels value (AUROC target {targets['auroc']:.4f}, balanced "
        f"accuracy target {targets['balanced_accuracy']:.4f}); '-' not reached"
    )
    print(f"{'strategy':>17} {'AUROC: mean':>12} {'per seed':>22} {'bal. acc.: mean':>16} {'per seed':>22}")
    for strategy in strategies:
        entry = result["strategies"][strategy]
        cells = []
        for key in ("auroc", "balanced_accuracy"):
            reach = entry[f"labels_to_95pct_{key}"]
            cells += [_count(reach["mean_curve"]), " ".join(_count(v) for v in reach["per_seed"])]
        print(f"{strategy:>17} {cells[0]:>12} {cells[1]:>22} {cells[2]:>16} {cells[3]:>22}")
    print(f"\nBCC images labelled at the last round (mean over seeds; the pool has {result['pool_bcc']}):")
    for strategy in strategies:
        print(f"{strategy:>17} {result['strategies'][strategy]['bcc_labelled']['mean'][-1]:.1f}")


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    sys.exit(main())
