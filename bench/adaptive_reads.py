"""Benchmark: reads saved at equal consensus accuracy by stopping each image once it is confident (issue 17).

On every multi-rater set with truth in ../shared/data/crowd (the DermX dermatologists first), the recorded
reads are replayed (:func:`consensus.adaptive.replay`): round by round each open image shows one more
read, the consensus is refitted, and an image stops when its most probable class has posterior
>= CONFIDENCE after >= MIN_READS reads (or has MAX_READS). The next read of an image is drawn in a random
order per image (``--order random``) or, after one random read (K with ``reliable@K``), is the read of
the reader the consensus so far rates most reliable (``--order reliable``). Per set, rule and order,
over ``--seeds`` read orders: the share of reads saved, the accuracy of the final consensus (mean, min,
max), the accuracy of the consensus of every read (the same estimator), the difference of the means, and
whether the rule keeps "equal accuracy": its mean accuracy is not lower than the all-reads accuracy by
more than one image (1 / the number of images with truth). The largest saving at equal accuracy is
listed per set. Writes docs/adaptive_reads.json (every number, the commands; ``--merge`` adds to it) and
docs/adaptive_reads.png (``--plot-only`` redraws it from the JSON).

Usage: .venv/bin/python bench/adaptive_reads.py [--crowd ../shared/data/crowd] [--seeds 5]
       [--sets dermx_ak,dermx_dx,...] [--confidence 0.95,0.99,0.999] [--min-reads 2,3,4]
       [--max-reads none] [--order random,reliable,reliable@2] [--estimator ds|pooled|selected]
       [--merge] [--plot-only]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from consensus.adaptive import ORDERS, StoppingRule, replay  # noqa: E402
from consensus.dawid_skene import DawidSkene, PooledDawidSkene  # noqa: E402
from consensus.selection import SelectedDawidSkene  # noqa: E402

EQUAL = "mean accuracy over the seeds >= all-reads accuracy - 1 / images with truth (one image)"
FIRST = ("dermx_ak", "dermx_dx", "rte", "temp")
ESTIMATORS: dict[str, type[Any]] = {
    "ds": DawidSkene,
    "pooled": PooledDawidSkene,
    "selected": SelectedDawidSkene,
}


def accuracy(labels: pd.Series, truth: pd.Series) -> float:
    """Share of the tasks with truth whose consensus label is the true one (a missing label is wrong)."""
    return float((labels.reindex(truth.index) == truth).mean())


def floats(text: str) -> list[float]:
    """``"0.95,0.99"`` -> ``[0.95, 0.99]``."""
    return [float(v) for v in text.split(",") if v]


def caps(text: str) -> list[int | None]:
    """``"none,6"`` -> ``[None, 6]``."""
    return [None if v.lower() == "none" else int(v) for v in text.split(",") if v]


def rule_name(rule: StoppingRule) -> str:
    """``p>=0.99 n>=3`` (and ``max 6`` with a cap)."""
    name = f"p>={rule.confidence:g} n>={rule.min_reads}"
    return name if rule.max_reads is None else f"{name} max {rule.max_reads}"


def grid(confidences: list[float], min_reads: list[int], max_reads: list[int | None]) -> list[StoppingRule]:
    """Every valid rule of the grid (a cap below ``min_reads`` is skipped)."""
    return [
        StoppingRule(p, n, m)
        for m in max_reads
        for n in min_reads
        for p in confidences
        if m is None or m >= n
    ]


def run_set(
    name: str,
    answers: pd.DataFrame,
    truth: pd.Series,
    rules: list[StoppingRule],
    orders: list[str],
    seeds: int,
    estimator: type[Any],
) -> dict[str, Any]:
    """Every rule and order on one set: per seed saved and accuracy, their summary, the equal flag."""
    truth = truth[truth.index.isin(answers["task"])]
    start = time.perf_counter()
    full = accuracy(estimator().fit_predict(answers), truth)
    full_s = time.perf_counter() - start
    tolerance = 1.0 / len(truth)
    rows = []
    for order in orders:
        for rule in rules:
            start = time.perf_counter()
            how, _, first = order.partition("@")
            runs = [
                replay(answers, estimator(), rule, random_state=s, order=how, random_reads=int(first or 1))
                for s in range(seeds)
            ]
            accs = [accuracy(r.labels, truth) for r in runs]
            saved = [r.saved for r in runs]
            mean = float(np.mean(accs))
            row = {
                "rule": rule_name(rule),
                "confidence": rule.confidence,
                "min_reads": rule.min_reads,
                "max_reads": rule.max_reads,
                "order": order,
                "saved": float(np.mean(saved)),
                "saved_per_seed": saved,
                "accuracy": mean,
                "accuracy_min": float(np.min(accs)),
                "accuracy_max": float(np.max(accs)),
                "accuracy_per_seed": accs,
                "difference": round(mean - full, 12),  # no -1e-16 from float sums
                "equal": bool(mean >= full - tolerance - 1e-12),
                "rounds": float(np.mean([r.rounds for r in runs])),
                "s_per_replay": (time.perf_counter() - start) / seeds,
            }
            rows.append(row)
            flag = " equal" if row["equal"] else ""
            print(
                f"  {name} {order:8} {row['rule']:18} saved {row['saved']:.3f} acc {mean:.4f} "
                f"({row['difference']:+.4f}){flag}  {row['s_per_replay']:.2f} s/replay",
                flush=True,
            )
    return {
        "tasks": int(answers["task"].nunique()),
        "tasks_with_truth": len(truth),
        "reads": len(answers),
        "readers": int(answers["worker"].nunique()),
        "reads_per_image": len(answers) / answers["task"].nunique(),
        "all_reads_accuracy": full,
        "all_reads_s": full_s,
        "tolerance": tolerance,
        "seeds": seeds,
        "rows": rows,
        "best": best(rows),
    }


def best(rows: list[dict[str, Any]]) -> dict[str, str | None]:
    """Per order: the rule with the largest saving among those at equal accuracy that save reads (None:
    no rule does)."""
    found: dict[str, str | None] = {}
    for order in dict.fromkeys(r["order"] for r in rows):
        equal = [r for r in rows if r["order"] == order and r["equal"] and r["saved"] > 0]
        found[order] = max(equal, key=lambda r: r["saved"])["rule"] if equal else None
    return found


def merged(earlier: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A set's result with the rows of an earlier run of other rules or orders kept (same seeds)."""
    if earlier is None or earlier.get("seeds") != new["seeds"]:
        return new
    keys = {(r["rule"], r["order"]) for r in new["rows"]}
    rows = [r for r in earlier["rows"] if (r["rule"], r["order"]) not in keys] + new["rows"]
    return {**new, "rows": rows, "best": best(rows), "s": earlier.get("s", 0.0) + new.get("s", 0.0)}


def print_set(name: str, result: dict[str, Any]) -> None:
    """The table of one set, then the largest saving at equal accuracy per order."""
    table = pd.DataFrame(result["rows"])
    table["acc min-max"] = [
        f"{a:.4f}-{b:.4f}" for a, b in zip(table["accuracy_min"], table["accuracy_max"], strict=True)
    ]
    table["equal"] = np.where(table["equal"], "yes", "")
    shown = table[
        ["order", "rule", "saved", "accuracy", "acc min-max", "difference", "equal", "s_per_replay"]
    ]
    print(
        f"\n{name}: {result['tasks']} images ({result['tasks_with_truth']} with truth), "
        f"{result['readers']} readers, {result['reads_per_image']:.2f} reads/image; "
        f"all reads accuracy {result['all_reads_accuracy']:.4f}; "
        f"equal = mean >= all reads - {result['tolerance']:.4f} (one image)"
    )
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        print(shown.to_string(index=False))
    for order, rule in result["best"].items():
        if rule is None:
            print(f"  largest saving at equal accuracy ({order}): none of these rules saves reads at it")
        else:
            row = next(r for r in result["rows"] if r["order"] == order and r["rule"] == rule)
            print(
                f"  largest saving at equal accuracy ({order}): {rule}, saved {row['saved']:.3f}, "
                f"accuracy {row['accuracy']:.4f} ({row['difference']:+.4f})"
            )


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per set: accuracy against reads saved, one point per rule and order, the all-reads line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    orders = list(dict.fromkeys(r["order"] for result in results.values() for r in result["rows"]))
    looks = list(zip("o^sDv", ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=True))
    styles = {order: looks[i % len(looks)] for i, order in enumerate(orders)}
    for ax, name in zip(axes.flat, names, strict=False):
        result = results[name]
        for order, (marker, color) in styles.items():
            pts = [r for r in result["rows"] if r["order"] == order]
            if not pts:
                continue
            x = [100 * r["saved"] for r in pts]
            y = [r["accuracy"] for r in pts]
            err = [
                [max(0.0, r["accuracy"] - r["accuracy_min"]) for r in pts],  # >= 0 despite float rounding
                [max(0.0, r["accuracy_max"] - r["accuracy"]) for r in pts],
            ]
            ax.errorbar(x, y, yerr=err, fmt=marker, color=color, ms=4, lw=0.6, alpha=0.8, label=order)
        full = result["all_reads_accuracy"]
        ax.axhline(full, color="k", lw=0.8, label="all reads")
        ax.axhline(full - result["tolerance"], color="k", lw=0.6, ls=":", label="- one image")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("reads saved (%)", fontsize=8)
        ax.set_ylabel("consensus accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def write(
    args: argparse.Namespace, commands: list[str], results: dict[str, dict[str, Any]], wall: float
) -> None:
    """docs/adaptive_reads.json (every number, the commands) and the plot."""
    payload = {
        "commands": commands,
        "estimator": args.estimator,
        "equal_accuracy": EQUAL,
        "wall_s_last_command": wall,
        "sets": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if results:
        plot(results, args.plot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crowd", type=Path, default=ROOT.parent / "shared" / "data" / "crowd")
    parser.add_argument("--seeds", type=int, default=5, help="read orders per rule (seeds 0..N-1)")
    parser.add_argument("--sets", default=None, help="comma-separated set names (default: all with truth)")
    parser.add_argument("--confidence", type=floats, default=[0.95, 0.99, 0.999])
    parser.add_argument("--min-reads", type=lambda t: [int(v) for v in t.split(",") if v], default=[2, 3, 4])
    parser.add_argument("--max-reads", type=caps, default=[None], help="caps, e.g. none,6")
    parser.add_argument(
        "--order",
        default="random,reliable",
        help="comma-separated: random, reliable, reliable@K (K reads at random, then by reliability)",
    )
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="ds")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "adaptive_reads.json")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other sets, rules and orders of an earlier --json"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "adaptive_reads.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --json and stop")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.json.read_text())["sets"], args.plot)
        print(f"wrote {args.plot}")
        return 0
    orders = [o for o in args.order.split(",") if o]
    if unknown := [o for o in orders if not re.fullmatch(r"random|reliable(@[1-9][0-9]*)?", o)]:
        parser.error(f"unknown order(s) {unknown}; choose from {ORDERS}, or reliable@K")
    if not args.crowd.exists():
        print(f"skipped: {args.crowd} is absent")
        return 0
    names = sorted(p.name for p in args.crowd.iterdir() if (p / "truth.csv").is_file())
    names = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    if args.sets:
        wanted = args.sets.split(",")
        names = [n for n in wanted if n in names]
    rules = grid(args.confidence, args.min_reads, args.max_reads)
    estimator = ESTIMATORS[args.estimator]
    command = " ".join(
        [
            ".venv/bin/python",
            "bench/adaptive_reads.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    )
    print(f"{command}\n{len(rules)} rules x {len(orders)} orders x {args.seeds} seeds per set", flush=True)
    wall = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    commands = [command]
    if args.merge and args.json.is_file():
        earlier = json.loads(args.json.read_text())
        if earlier.get("estimator") != args.estimator:
            parser.error(f"--merge: {args.json} has another estimator")
        results = dict(earlier["sets"])
        commands = [*earlier.get("commands", [earlier.get("command")]), command]
    for name in names:
        truth = pd.read_csv(args.crowd / name / "truth.csv")
        if truth.empty:
            continue
        answers = pd.read_csv(args.crowd / name / "answers.csv")
        start = time.perf_counter()
        result = run_set(
            name, answers, truth.set_index("task")["label"], rules, orders, args.seeds, estimator
        )
        result["s"] = time.perf_counter() - start
        results[name] = merged(results.get(name), result)
        print(f"  {name}: done in {result['s']:.1f} s", flush=True)
        write(args, commands, results, time.perf_counter() - wall)  # so a stopped sweep keeps what ran
    for name in names:
        if name in results:
            print_set(name, results[name])
    wall = time.perf_counter() - wall
    print(f"\nwall time {wall:.1f} s")
    write(args, commands, results, wall)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
