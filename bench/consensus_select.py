"""Benchmark: the rater model chosen from the answers alone, and Dawid-Skene with part of the truth as gold.

On every multi-rater set with truth in ../shared/data/crowd (chexpert_test pooled over its findings), in
one run, with settings fixed in advance (the defaults; nothing is tuned per set):

1. **Model selection** (issue 16, part 7). Accuracy against truth of crowd-kit's ``DawidSkene()`` and
   ``MajorityVote()`` (the target is max of the two - 0.005), of each candidate rater model alone
   (full, one-coin, pooled, pooled one-coin Dawid-Skene) and of ``SelectedDawidSkene`` (which chooses among
   them by 5-fold held-out answer likelihood), with the choice and every candidate's criterion.
2. **Gold** (issue 16, part 2). Our default ``DawidSkene()``, ``SelectedDawidSkene`` and crowd-kit's
   ``DawidSkene()`` with 10% and 25% of the tasks that have truth given as gold (``true_labels``) and
   with none, each scored on the same tasks: those not given as gold; 3 random draws of the gold.

Usage: .venv/bin/python bench/consensus_select.py [--crowd ../shared/data/crowd] [--seeds 3]
       [--out docs/consensus_gold.png]
This is a benchmark script, not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from consensus.dawid_skene import DawidSkene  # noqa: E402
from consensus.selection import SelectedDawidSkene, default_candidates  # noqa: E402

GOLD_SHARES = (0.0, 0.10, 0.25)


def accuracy(labels: pd.Series, truth: pd.Series) -> float:
    """Accuracy on the tasks that have both a label and a truth."""
    truth = truth[truth.index.isin(labels.index)]
    return float((labels.reindex(truth.index) == truth).mean())


def real_sets(crowd: Path) -> list[tuple[str, pd.DataFrame, pd.Series]]:
    sets = []
    for folder in sorted(p for p in crowd.iterdir() if p.is_dir()):
        truth_path = folder / "truth.csv"
        if not truth_path.exists():
            continue
        truth = pd.read_csv(truth_path)
        if truth.empty:
            continue
        answers = pd.read_csv(folder / "answers.csv")
        truth = truth.set_index("task")["label"]
        sets.append((folder.name, answers, truth[truth.index.isin(answers["task"])]))
    return sets


def selection_row(name: str, answers: pd.DataFrame, truth: pd.Series) -> dict[str, object]:
    from crowdkit.aggregation import DawidSkene as CKDawidSkene
    from crowdkit.aggregation import MajorityVote

    row: dict[str, object] = {"dataset": name}
    row["ck-DS"] = accuracy(CKDawidSkene().fit_predict(answers), truth)
    row["ck-MV"] = accuracy(MajorityVote().fit_predict(answers), truth)
    for label, candidate in default_candidates().items():
        row[label] = accuracy(candidate.fit_predict(answers), truth)
    start = time.perf_counter()
    selected = SelectedDawidSkene().fit(answers)
    row["selected s"] = time.perf_counter() - start
    row["selected"] = accuracy(selected.labels_, truth)
    row["choice"] = selected.choice_
    row["criterion"] = " ".join(f"{k}:{v:.3f}" for k, v in selected.criterion_.items())
    row["target"] = max(float(row["ck-DS"]), float(row["ck-MV"])) - 0.005  # type: ignore[arg-type]
    row["ok"] = float(row["selected"]) >= float(row["target"]) - 1e-12  # type: ignore[arg-type]
    return row


def gold_rows(name: str, answers: pd.DataFrame, truth: pd.Series, seeds: int) -> list[dict[str, object]]:
    """Per gold share and method: accuracy on the tasks not given as gold, with gold and without.

    Both are measured on the same tasks (those of each draw not given as gold), so the difference is
    what the gold did, not a change of the tasks scored.
    """
    from crowdkit.aggregation import DawidSkene as CKDawidSkene

    def fits() -> dict[str, object]:
        return {"ours": DawidSkene(), "selected": SelectedDawidSkene(), "ck-DS": CKDawidSkene()}

    without = {method: est.fit_predict(answers) for method, est in fits().items()}  # type: ignore[attr-defined]
    rows = []
    for share in GOLD_SHARES[1:]:
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            gold = truth.iloc[np.sort(rng.choice(len(truth), round(share * len(truth)), replace=False))]
            rest = truth.drop(gold.index)
            for method, est in fits().items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    labels = est.fit_predict(answers, true_labels=gold)  # type: ignore[attr-defined]
                rows.append(
                    {"dataset": name, "gold": share, "seed": seed, "method": method,
                     "with gold": accuracy(labels, rest), "without": accuracy(without[method], rest)}
                )  # fmt: skip
    return rows


def plot(gold: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = gold[gold["method"] == "ours"].assign(change=lambda f: f["with gold"] - f["without"])
    mean = ours.groupby(["dataset", "gold"])["change"].agg(["mean", "min", "max"]).reset_index()
    names = list(dict.fromkeys(mean["dataset"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for offset, (share, marker) in zip(
        (-0.12, 0.12), zip(GOLD_SHARES[1:], ("o", "s"), strict=True), strict=True
    ):
        part = mean[mean["gold"] == share].set_index("dataset").reindex(names)
        x = np.arange(len(names)) + offset
        ax.errorbar(x, part["mean"], yerr=[part["mean"] - part["min"], part["max"] - part["mean"]],
                    fmt=marker, capsize=2, label=f"{share:.0%} of the tasks as gold")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(names)), names, rotation=60)
    ax.set_ylabel("accuracy change on the other tasks")
    ax.set_title("Dawid-Skene (defaults): part of the truth given as gold vs none (mean, range of 3 draws)")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crowd", type=Path, default=ROOT.parent / "shared" / "data" / "crowd")
    parser.add_argument("--seeds", type=int, default=3, help="random draws of the gold tasks per share")
    parser.add_argument("--out", type=Path, default=None, help="write the gold plot here (PNG)")
    args = parser.parse_args(argv)
    if not args.crowd.exists():
        print(f"skipped: {args.crowd} is absent")
        return 0
    sets = real_sets(args.crowd)
    selection, gold = [], []
    for name, answers, truth in sets:
        selection.append(selection_row(name, answers, truth))
        gold.extend(gold_rows(name, answers, truth, args.seeds))
        print(f"  {name}: done", flush=True)
    table = pd.DataFrame(selection).set_index("dataset")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 4):
        print("\nModel selection (accuracy against truth):")
        print(table.drop(columns=["criterion"]).to_string())
        print("\nCriterion (mean held-out answer log-likelihood per candidate):")
        print(table["criterion"].to_string())
        frame = pd.DataFrame(gold)
        summary = frame.groupby(["dataset", "method", "gold"])[["without", "with gold"]].mean()
        summary["change"] = summary["with gold"] - summary["without"]
        print("\nGold (accuracy on the tasks not given as gold, without and with the gold; mean over draws):")
        print(summary.unstack(["method", "gold"])["change"].to_string())
        print(summary.to_string())
    if args.out is not None:
        plot(pd.DataFrame(gold), args.out)
        print(f"plot: {args.out}")
    met = int(table["ok"].sum())
    print(f"\nselection: target met on {met} of {len(table)} sets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
