"""The second system's ablation as a table and a plot, from ``dermassist evaluate-dual`` reports.

    python tools/ablation_table.py "image only=runs/ablation/image/eval-val" \
        "+ lesion encoder=runs/ablation/lesion/eval-val" "+ metadata=runs/ablation/full/eval-val" \
        --plot docs/ablation.png

Prints a Markdown table (balanced accuracy, macro AUROC, BCC AUROC with their 95% lesion-bootstrap
intervals, per-class AUROC, Grad-CAM energy inside the lesion beside the lesion's area), then each
step's gain over the row before it with a *paired* 95% interval (the same lesions resampled for both
models, from the reports' per_image.csv: overlapping marginal intervals do not say two models are
alike), and draws the per-class AUROC and the metrics with intervals side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _interval(entry: dict[str, float]) -> str:
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def table(runs: dict[str, dict[str, Any]]) -> str:
    head = ["model", "balanced accuracy", "macro AUROC", "BCC AUROC", *CLASSES, "Grad-CAM in lesion (area)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in runs.items():
        cam = m["gradcam_predicted_class"]
        cells = [
            name,
            _interval(m["balanced_accuracy"]),
            _interval(m["auroc_macro"]),
            _interval(m["auroc_bcc"]),
            *(f"{m['auroc_per_class'].get(c, float('nan')):.3f}" for c in CLASSES),
            f"{_interval(cam['energy_inside'])} ({cam['area']['value']:.3f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


STEP_METRICS = {
    "balanced_accuracy": "balanced accuracy",
    "auroc_macro": "macro AUROC",
    "auroc_bcc": "BCC AUROC",
}


def _predictions(frame: Any) -> dict[str, Any]:
    import numpy as np

    return {
        "image_id": list(frame["image_id"]),
        "dx": np.array([CLASSES.index(d) if d in CLASSES else -1 for d in frame["dx"]]),
        "probs": frame[[f"p_{c}" for c in CLASSES]].to_numpy(float),
        "bcc": frame["bcc_probability"].to_numpy(float),
        "y_bcc": (frame["dx"] == "bcc").to_numpy(float),
    }


def paired_steps(folders: dict[str, Path], n_boot: int = 1000, seed: int = 0) -> str:
    """Each run's gain over the run before it, with a paired lesion-bootstrap 95% interval."""
    import pandas as pd

    from model.common.metrics import bootstrap
    from model.lesion.train_dual import metrics

    frames = {name: pd.read_csv(folder / "per_image.csv") for name, folder in folders.items()}
    lines = ["| step | " + " | ".join(f"Δ {label}" for label in STEP_METRICS.values()) + " |"]
    lines.append("|" + "---|" * (len(STEP_METRICS) + 1))
    names = list(frames)
    for before, after in itertools.pairwise(names):
        a, b = frames[before], frames[after]
        if list(a["image_id"]) != list(b["image_id"]):
            raise ValueError(
                f"{before!r} and {after!r} were not evaluated on the same images in the same order"
            )
        pa, pb = _predictions(a), _predictions(b)

        def gain(rows: Any, pa: dict[str, Any] = pa, pb: dict[str, Any] = pb) -> dict[str, float]:
            def take(p: dict[str, Any]) -> dict[str, Any]:
                return {k: (v[rows] if k != "image_id" else [v[i] for i in rows]) for k, v in p.items()}

            ma, mb = metrics(take(pa)), metrics(take(pb))
            return {m: mb.get(m, float("nan")) - ma.get(m, float("nan")) for m in STEP_METRICS}

        found = bootstrap(gain, a["lesion_id"].to_numpy(), n_boot, seed)
        cells = [
            f"{found[m]['value']:+.3f} [{found[m]['low']:+.3f}, {found[m]['high']:+.3f}]"
            for m in STEP_METRICS
        ]
        lines.append(f"| {before} → {after} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    width = 0.8 / len(runs)
    x = np.arange(len(CLASSES))
    for k, (name, m) in enumerate(runs.items()):
        left.bar(x + k * width, [m["auroc_per_class"].get(c, np.nan) for c in CLASSES], width, label=name)
    left.set_xticks(x + width * (len(runs) - 1) / 2, CLASSES)
    left.set(ylim=(0.8, 1.0), ylabel="AUROC (one vs rest)", title="per-class AUROC, validation split")
    left.legend(fontsize=8, loc="lower left")
    metrics = [
        ("balanced_accuracy", "balanced acc."),
        ("auroc_macro", "macro AUROC"),
        ("auroc_bcc", "BCC AUROC"),
    ]
    for k, (name, m) in enumerate(runs.items()):
        values = [m[key]["value"] for key, _ in metrics]
        low = [m[key]["value"] - m[key]["low"] for key, _ in metrics]
        high = [m[key]["high"] - m[key]["value"] for key, _ in metrics]
        right.errorbar(
            np.arange(len(metrics)) + (k - (len(runs) - 1) / 2) * 0.15,
            values,
            yerr=[low, high],
            fmt="o",
            label=name,
        )
    right.set_xticks(range(len(metrics)), [label for _, label in metrics])
    right.set(ylim=(0.6, 1.0), title="with 95% lesion-bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="NAME=REPORT_DIR (a dermassist evaluate-dual --out folder)")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    parser.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap replicates")
    args = parser.parse_args(argv)
    folders = {}
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            parser.error(f"{spec!r}: give NAME=REPORT_DIR")
        folders[name] = Path(folder)
    runs = {name: json.loads((folder / "metrics.json").read_text()) for name, folder in folders.items()}
    print(table(runs))
    if len(folders) > 1:
        print()
        print(paired_steps(folders, args.n_boot))
    if args.plot is not None:
        plot(runs, args.plot)
        print(f"plot -> {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
