"""Benchmark: reads saved by stopping each image once its consensus is confident (issue 17, part 3).

On every multi-rater set with truth in ../shared/data/crowd (the DermX dermatologists first), the recorded
reads are replayed in a random order per image (:func:`consensus.adaptive.replay`): round by round each
open image shows one more read, the consensus (``DawidSkene()``, the defaults) is refitted, and an image
stops when its most probable class has posterior >= CONFIDENCE after >= MIN_READS reads. Printed per set
and rule, mean over ``--seeds`` read orders: the share of reads saved, the accuracy of the final
consensus, and the accuracy of the consensus of every read (the same estimator), and their difference.

Usage: .venv/bin/python bench/adaptive_reads.py [--crowd ../shared/data/crowd] [--seeds 3]
       [--sets dermx_ak,dermx_dx,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from consensus.adaptive import StoppingRule, replay  # noqa: E402
from consensus.dawid_skene import DawidSkene  # noqa: E402

RULES = (StoppingRule(0.95, 2), StoppingRule(0.99, 2), StoppingRule(0.95, 3))
FIRST = ("dermx_ak", "dermx_dx")


def accuracy(labels: pd.Series, truth: pd.Series) -> float:
    truth = truth[truth.index.isin(labels.index)]
    return float((labels.reindex(truth.index) == truth).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crowd", type=Path, default=ROOT.parent / "shared" / "data" / "crowd")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sets", default=None, help="comma-separated set names (default: all with truth)")
    args = parser.parse_args(argv)
    if not args.crowd.exists():
        print(f"skipped: {args.crowd} is absent")
        return 0
    names = sorted(p.name for p in args.crowd.iterdir() if (p / "truth.csv").is_file())
    names = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    if args.sets:
        names = [n for n in names if n in set(args.sets.split(","))]
    rows = []
    for name in names:
        truth = pd.read_csv(args.crowd / name / "truth.csv")
        if truth.empty:
            continue
        truth = truth.set_index("task")["label"]
        answers = pd.read_csv(args.crowd / name / "answers.csv")
        full = accuracy(DawidSkene().fit_predict(answers), truth)
        for rule in RULES:
            start = time.perf_counter()
            runs = [replay(answers, DawidSkene(), rule, random_state=seed) for seed in range(args.seeds)]
            rows.append(
                {
                    "dataset": name,
                    "rule": f"p>={rule.confidence} after >={rule.min_reads}",
                    "reads/image (all)": len(answers) / answers["task"].nunique(),
                    "saved": float(np.mean([r.saved for r in runs])),
                    "accuracy": float(np.mean([accuracy(r.labels, truth) for r in runs])),
                    "all reads": full,
                    "s": (time.perf_counter() - start) / args.seeds,
                }
            )
        print(f"  {name}: done", flush=True)
    table = pd.DataFrame(rows)
    table["difference"] = table["accuracy"] - table["all reads"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
