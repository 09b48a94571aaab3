"""Benchmark: our Dawid-Skene vs crowd-kit's DawidSkene and MajorityVote, accuracy and wall time.

On every multi-rater set with truth in ../shared/data/crowd (answers.csv + truth.csv; accuracy on the
tasks that have answers, which matters for s5_adult; chexpert_test pooled over its 14 findings, and per
finding with --per-finding) and on a synthetic set of 1,000,000 binary answers (~143,000 items, 4-10
raters each, 200 raters of whom 17 spammers, prevalence 0.3), in one run:

    ours          DawidSkene()                                  (the defaults: smoothing on, tol)
    ours-plain100 DawidSkene(n_iter=100, tol=-inf, no smoothing)  (plain ML Dawid-Skene, 100 iterations)
    ck-DS         crowdkit DawidSkene()                          (its default, often 2 iterations)
    ck-DS100      crowdkit DawidSkene(n_iter=100, tol=-inf)
    ck-MV         crowdkit MajorityVote()

Prints accuracy / seconds per set, the share of labels ours-plain100 shares with ck-DS100, whether the
defaults reach max(ck-DS100, ck-MV) - 0.005, and on the 1M set the ratios

    crowd-kit DS / ours = X            (default vs default; target >= 10, ours < 5 s)
    crowd-kit DS100 / ours-plain100 = Y  (the same 100 iterations)

Usage: .venv/bin/python bench/consensus.py [--crowd ../shared/data/crowd] [--answers 1000000]
       [--per-finding] [--skip-crowdkit-1m]
This is a benchmark script, not a timed test; run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
# This script shares its name with the package it measures: take bench/ off the import path (Python
# puts the script's folder first) so that `consensus` below is the package, not this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from consensus.dawid_skene import DawidSkene  # noqa: E402

PLAIN = {"n_iter": 100, "tol": -math.inf, "smoothing": 0.0, "diag_smoothing": 0.0, "prior_smoothing": 0.0}


def methods() -> dict[str, Callable[[pd.DataFrame], pd.Series]]:
    """Name -> function from an answer table to one label per task."""
    from crowdkit.aggregation import DawidSkene as CKDawidSkene
    from crowdkit.aggregation import MajorityVote

    return {
        "ours": lambda df: DawidSkene().fit_predict(df),
        "ours-plain100": lambda df: DawidSkene(**PLAIN).fit_predict(df),
        "ck-DS": lambda df: CKDawidSkene().fit_predict(df),
        "ck-DS100": lambda df: CKDawidSkene(n_iter=100, tol=-np.inf).fit_predict(df),
        "ck-MV": lambda df: MajorityVote().fit_predict(df),
    }


def accuracy(labels: pd.Series, truth: pd.Series) -> float:
    """Accuracy on the tasks that have both a label and a truth."""
    truth = truth[truth.index.isin(labels.index)]
    return float((labels.reindex(truth.index) == truth).mean())


def timed(fn: Callable[[pd.DataFrame], pd.Series], df: pd.DataFrame) -> tuple[pd.Series, float]:
    start = time.perf_counter()
    labels = fn(df)
    return labels, time.perf_counter() - start


def per_finding(fn: Callable[[pd.DataFrame], pd.Series]) -> Callable[[pd.DataFrame], pd.Series]:
    """Run ``fn`` on each chexpert finding ('<study>::<finding>') separately and join the labels."""

    def run(df: pd.DataFrame) -> pd.Series:
        finding = df["task"].str.rsplit("::", n=1).str[1]
        return pd.concat([fn(part) for _, part in df.groupby(finding)])

    return run


def synthetic(
    n_answers: int, n_raters: int = 200, n_spammers: int = 17, prevalence: float = 0.3, seed: int = 0
) -> tuple[pd.DataFrame, pd.Series, np.ndarray, np.ndarray]:
    """Binary answers, 4-10 distinct raters per item; spammers answer independently of the truth.

    Returns the answers, the truth per task, and every rater's true sensitivity and specificity.
    """
    rng = np.random.default_rng(seed)
    n_items = round(n_answers / 7)  # 7 raters per item on average
    truth = (rng.random(n_items) < prevalence).astype(np.int64)
    sens = rng.uniform(0.65, 0.95, n_raters)
    spec = rng.uniform(0.70, 0.97, n_raters)
    spam = rng.choice(n_raters, n_spammers, replace=False)
    p_yes = rng.uniform(0.2, 0.8, n_spammers)
    sens[spam], spec[spam] = p_yes, 1 - p_yes
    per_item = rng.integers(4, 11, n_items)
    tasks, workers = [], []
    for start in range(0, n_items, 10_000):  # chunks keep the random keys small
        stop = min(start + 10_000, n_items)
        keys = rng.random((stop - start, n_raters), dtype=np.float32)
        picked = np.argpartition(keys, 10, axis=1)[:, :10]  # 10 distinct raters per item
        keep = np.arange(10) < per_item[start:stop, None]
        tasks.append(np.broadcast_to(np.arange(start, stop)[:, None], picked.shape)[keep])
        workers.append(picked[keep])
    task, worker = np.concatenate(tasks), np.concatenate(workers)
    p_positive = np.where(truth[task] == 1, sens[worker], 1 - spec[worker])
    label = (rng.random(task.size) < p_positive).astype(np.int64)
    answers = pd.DataFrame({"task": task, "worker": worker, "label": label})
    return answers, pd.Series(truth, name="label"), sens, spec


def run_real(crowd: Path, with_per_finding: bool) -> pd.DataFrame:
    rows = []
    for folder in sorted(p for p in crowd.iterdir() if p.is_dir()):
        truth_path = folder / "truth.csv"
        if not truth_path.exists():
            continue
        truth = pd.read_csv(truth_path)
        if truth.empty:
            continue
        truth = truth.set_index("task")["label"]
        answers = pd.read_csv(folder / "answers.csv")
        variants = [(folder.name, methods())]
        if with_per_finding and folder.name == "chexpert_test":
            variants = [
                (f"{folder.name} (pooled)", methods()),
                (f"{folder.name} (per finding)", {k: per_finding(f) for k, f in methods().items()}),
            ]
        for name, fns in variants:
            row: dict[str, object] = {"dataset": name, "answers": len(answers)}
            labels = {}
            for method, fn in fns.items():
                labels[method], seconds = timed(fn, answers)
                row[method] = accuracy(labels[method], truth)
                row[f"{method} s"] = seconds
            plain, ds100 = labels["ours-plain100"], labels["ck-DS100"]
            row["plain100 = DS100"] = float((plain == ds100.reindex(plain.index)).mean())
            row["target"] = max(float(row["ck-DS100"]), float(row["ck-MV"])) - 0.005  # type: ignore[arg-type]
            row["ok"] = float(row["ours"]) >= float(row["target"]) - 1e-12  # type: ignore[arg-type]
            rows.append(row)
            print(f"  {name}: done", flush=True)
    return pd.DataFrame(rows).set_index("dataset")


def print_real(table: pd.DataFrame) -> None:
    names = ["ours", "ours-plain100", "ck-DS", "ck-DS100", "ck-MV"]
    header = f"{'dataset':30s}" + "".join(f"{n:>18s}" for n in names)
    header += f"{'plain=DS100':>13s}{'target':>8s}  ok"
    print(header)
    print("-" * len(header))
    for name, row in table.iterrows():
        cells = "".join(f"{row[n]:>10.4f} /{row[f'{n} s']:>5.2f}s" for n in names)
        ok = "yes" if row["ok"] else "NO"
        print(f"{name!s:30s}{cells}{row['plain100 = DS100']:>12.2%}{row['target']:>9.4f}  {ok}")
    print("(accuracy / wall seconds)")
    ours_s, ck_s = table["ours s"].sum(), table["ck-DS s"].sum()
    ck100_s, plain_s = table["ck-DS100 s"].sum(), table["ours-plain100 s"].sum()
    print(
        f"all real sets: ours {ours_s:.2f} s, crowd-kit DS {ck_s:.2f} s (x{ck_s / ours_s:.1f}); "
        f"ours-plain100 {plain_s:.2f} s, crowd-kit DS100 {ck100_s:.2f} s (x{ck100_s / plain_s:.1f})"
    )
    print(
        f"defaults reach max(DS100, MV) - 0.005 on {int(table['ok'].sum())} of {len(table)} sets; "
        f"ours-plain100 labels = crowd-kit DS100 on >= {table['plain100 = DS100'].min():.2%} of items "
        f"(worst set)"
    )


def run_synthetic(n_answers: int, skip_crowdkit: bool) -> None:
    answers, truth, sens, spec = synthetic(n_answers)
    print(
        f"\nsynthetic: {len(answers):,} answers, {answers['task'].nunique():,} items, "
        f"{answers['worker'].nunique()} raters (17 spammers), prevalence 0.3"
    )
    fns = methods()
    if skip_crowdkit:
        fns = {k: v for k, v in fns.items() if k.startswith("ours")}
    results: dict[str, tuple[float, float]] = {}
    for method, fn in fns.items():
        labels, seconds = timed(fn, answers)
        results[method] = (accuracy(labels, truth), seconds)
        print(f"  {method:15s} accuracy {results[method][0]:.4f}   {seconds:7.2f} s", flush=True)

    ds = DawidSkene().fit(answers)
    rel = ds.rater_reliability().set_index("worker").sort_index()
    error = np.r_[np.abs(rel["sensitivity"] - sens), np.abs(rel["specificity"] - spec)]
    print(
        f"  ours: {ds.n_iter_} iterations; sensitivity/specificity recovery error: "
        f"mean {error.mean():.4f}, max {error.max():.4f}"
    )
    if "ck-DS" in results:
        ratio = results["ck-DS"][1] / results["ours"][1]
        ratio100 = results["ck-DS100"][1] / results["ours-plain100"][1]
        ours_s = results["ours"][1]
        print(f"\ncrowd-kit DS / ours = {ratio:.1f}   (target >= 10; ours {ours_s:.2f} s, target < 5 s)")
        print(f"crowd-kit DS100 / ours-plain100 = {ratio100:.1f}   (same 100 iterations)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crowd", type=Path, default=ROOT.parent / "shared" / "data" / "crowd")
    parser.add_argument("--answers", type=int, default=1_000_000, help="size of the synthetic set")
    parser.add_argument("--per-finding", action="store_true", help="chexpert_test per finding as well")
    parser.add_argument("--skip-crowdkit-1m", action="store_true", help="time only ours on the synthetic set")
    args = parser.parse_args()
    # crowd-kit on pandas 2.x emits FutureWarnings that would drown the table.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    if args.crowd.is_dir():
        print(f"real sets in {args.crowd}:")
        print_real(run_real(args.crowd, args.per_finding))
    else:
        print(f"{args.crowd} is absent: skipping the real sets")
    run_synthetic(args.answers, args.skip_crowdkit_1m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
