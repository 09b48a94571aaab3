"""Benchmark: coverage of the AI-exposure intervals when reads of one image (or lesion) are alike.

Agreement rates in a reading study are shares of reads, and the reads of one image agree or disagree
together. Simulated: ``groups`` images (or lesions), ``reads`` reads each, a true rate ``p`` = 0.7, and
per group a rate drawn from a Beta with intra-class correlation ``icc`` (beta-binomial reads). For each
setting, the share of simulated studies whose 95% interval holds ``p``, and the mean width, for
:func:`consensus.exposure.clustered_rate` (Wilson at the effective size of a bootstrap over groups) and
for the naive Wilson interval over reads (reads taken as independent).

Usage: .venv/bin/python bench/exposure_coverage.py [--reps 1000] [--boot 500] [--seed 1]
This is a benchmark script, not a timed test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consensus.exposure import bootstrap_draws, clustered_rate

SETTINGS = ((30, 4, 0.3), (100, 4, 0.3), (30, 4, 0.0), (40, 8, 0.5))


def coverage(
    groups: int, reads: int, icc: float, reps: int, boot: int, rng: np.random.Generator, p: float = 0.7
) -> tuple[float, float, float, float]:
    """Coverage and mean width of the clustered and the naive interval over ``reps`` simulated studies."""
    icc = max(icc, 1e-6)  # 0: independent reads (a Beta this tight is a point)
    a, b = p * (1 - icc) / icc, (1 - p) * (1 - icc) / icc
    hits, widths = np.zeros(2), np.zeros(2)
    for _ in range(reps):
        agree = rng.binomial(reads, rng.beta(a, b, groups)).astype(float)
        known = np.full(groups, float(reads))
        for k, weights in enumerate((bootstrap_draws(groups, boot, rng), None)):
            _, low, high = clustered_rate(agree, known, weights)
            hits[k] += low <= p <= high
            widths[k] += high - low
    return hits[0] / reps, widths[0] / reps, hits[1] / reps, widths[1] / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--boot", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| groups | reads each | ICC | clustered: coverage (width) | naive Wilson: coverage (width) |")
    print("|---|---|---|---|---|")
    for groups, reads, icc in SETTINGS:
        c, wc, n, wn = coverage(groups, reads, icc, args.reps, args.boot, rng)
        print(f"| {groups} | {reads} | {icc} | {c:.3f} ({wc:.3f}) | {n:.3f} ({wn:.3f}) |")


if __name__ == "__main__":
    main()
