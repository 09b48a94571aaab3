"""Adaptive reads: which image still needs a reader, and which reader, so no read is wasted.

A study that has every image read by every dermatologist spends most reads on images the first two
readers already agree on. With the Dawid-Skene posterior (which weighs each reader by their estimated
reliability) an image can stop once its consensus is confident: :class:`StoppingRule` says an image is
done when its most probable class has posterior >= ``confidence`` after at least ``min_reads`` reads (or
when it has ``max_reads``). :func:`next_reads` turns a fitted consensus into a queue: every open image
with the readers who have not read it yet, the most reliable first. :func:`replay` measures the rule on
a recorded multi-reader set: the reads of each image are revealed one round at a time in a random order,
the consensus is refitted after each round, and an image stops when the rule says so; the reads used and
the accuracy of the final consensus are compared with those of collecting every read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from consensus._validate import check_columns


@dataclass(frozen=True)
class StoppingRule:
    """When an image needs no more reads.

    Args:
        confidence: the consensus posterior of its most probable class that is enough ...
        min_reads: ... once it has at least this many reads;
        max_reads: an image with this many reads is done whatever its posterior (None: no cap).
    """

    confidence: float = 0.95
    min_reads: int = 2
    max_reads: int | None = None

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence <= 1.0:
            raise ValueError(f"confidence must be in [0.5, 1], got {self.confidence}")
        if self.min_reads < 1:
            raise ValueError(f"min_reads must be at least 1, got {self.min_reads}")
        if self.max_reads is not None and self.max_reads < self.min_reads:
            raise ValueError(f"max_reads ({self.max_reads}) is below min_reads ({self.min_reads})")

    def done(self, probas: pd.DataFrame, reads: pd.Series) -> pd.Series:
        """Per task (the rows of ``probas``): whether it needs no more reads."""
        n = reads.reindex(probas.index).fillna(0).astype(int)
        confident = (probas.max(axis=1) >= self.confidence) & (n >= self.min_reads)
        if self.max_reads is not None:
            confident |= n >= self.max_reads
        return confident.rename("done")


def next_reads(
    probas: pd.DataFrame,
    answers: pd.DataFrame,
    readers: pd.Series,
    rule: StoppingRule | None = None,
) -> pd.DataFrame:
    """The adaptive-reads queue: every open image, its posterior, and who should read it next.

    Args:
        probas: task x class consensus posteriors.
        answers: long table ``task``, ``worker``, ``label`` (the reads so far).
        readers: reader -> reliability (e.g. the mean of sensitivity and specificity), higher first;
            the readers who may be asked.
        rule: the stopping rule (default :class:`StoppingRule`).

    Returns:
        One row per open task, least confident first: ``task``, ``posterior`` (of its most probable
        class), ``reads``, ``next`` (the readers who have not read it, most reliable first, comma
        separated; empty when every reader has).
    """
    rule = rule if rule is not None else StoppingRule()
    frame = check_columns(answers, ("task", "worker", "label"))
    reads = frame.drop_duplicates(["task", "worker"]).groupby("task").size()
    done = rule.done(probas, reads)
    who = frame.groupby("task")["worker"].agg(set)
    ranked = list(readers.sort_values(ascending=False, kind="stable").index)
    rows = []
    for task in probas.index[~done.to_numpy()]:
        seen = who.get(task, set())
        rows.append(
            {
                "task": task,
                "posterior": float(probas.loc[task].max()),
                "reads": int(reads.get(task, 0)),
                "next": ",".join(str(r) for r in ranked if r not in seen),
            }
        )
    table = pd.DataFrame(rows, columns=["task", "posterior", "reads", "next"])
    return table.sort_values(["posterior", "task"], kind="stable").reset_index(drop=True)


def assign_reads(queue: pd.DataFrame, per_reader: int | None = None) -> pd.DataFrame:
    """One next reader per open image of a :func:`next_reads` queue, the load spread over the readers.

    In queue order (least confident first), each image goes to the reader, among those who have not
    read it, with the fewest images assigned so far; ties go to the more reliable (the order of
    ``next``). With ``per_reader``, a reader takes at most that many and an image no reader can take
    waits for the next round. Images every reader has read get none.

    Returns:
        ``task``, ``reader``, ``posterior``, ``reads``, in queue order.
    """
    load: dict[str, int] = {}
    rows = []
    for task, posterior, reads, candidates in queue[["task", "posterior", "reads", "next"]].itertuples(
        index=False
    ):
        names = [n for n in str(candidates).split(",") if n]
        if per_reader is not None:
            names = [n for n in names if load.get(n, 0) < per_reader]
        if not names:
            continue
        reader = min(names, key=lambda n: (load.get(n, 0), names.index(n)))
        load[reader] = load.get(reader, 0) + 1
        rows.append({"task": task, "reader": reader, "posterior": posterior, "reads": reads})
    return pd.DataFrame(rows, columns=["task", "reader", "posterior", "reads"])


@dataclass(frozen=True)
class Replay:
    """What :func:`replay` found on one set."""

    reads: int  # reads used
    total: int  # reads in the set
    rounds: int
    labels: pd.Series  # the final consensus per task
    revealed: pd.DataFrame  # the reads used

    @property
    def saved(self) -> float:
        """Share of the set's reads not used."""
        return 1.0 - self.reads / self.total if self.total else 0.0


def replay(
    answers: pd.DataFrame,
    estimator: Any,
    rule: StoppingRule | None = None,
    random_state: int = 0,
    fit: Callable[[Any, pd.DataFrame], pd.DataFrame] | None = None,
) -> Replay:
    """Replay a recorded set with the stopping rule: reads revealed per image in a random order.

    Round ``r`` reveals the ``r``-th read (in a random order per image) of every image that is still
    open and has one left; the estimator (copied) is refitted on every revealed read; images the rule
    calls done close. It ends when no open image has a read left.

    Args:
        answers: long table ``task``, ``worker``, ``label`` (every recorded read).
        estimator: an unfitted Dawid-Skene-like estimator (``fit(data)`` then ``probas_``); copied.
        rule: the stopping rule.
        random_state: seed of the read order.
        fit: how to fit (default ``copy.deepcopy(estimator).fit(data).probas_``).

    Returns:
        The reads used, the final consensus and how many rounds it took.
    """
    rule = rule if rule is not None else StoppingRule()
    frame = check_columns(answers, ("task", "worker", "label")).reset_index(drop=True)
    classes = sorted(pd.unique(frame["label"]).tolist())

    def default_fit(est: Any, data: pd.DataFrame) -> pd.DataFrame:
        fitted = copy.deepcopy(est)
        if getattr(fitted, "classes", None) is None:
            fitted.classes = classes
        return fitted.fit(data).probas_  # type: ignore[no-any-return]

    fitter = fit if fit is not None else default_fit
    rng = np.random.default_rng(random_state)
    order = pd.Series(rng.random(len(frame)), index=frame.index)
    rank = order.groupby(frame["task"]).rank(method="first").astype(int) - 1  # 0 = the first read shown
    frame = frame.assign(_rank=rank)
    open_tasks = set(frame["task"])
    revealed_mask = np.zeros(len(frame), dtype=bool)
    rounds = 0
    probas = pd.DataFrame()
    while True:
        step = frame["task"].isin(open_tasks).to_numpy() & (frame["_rank"].to_numpy() == rounds)
        if not step.any():
            break
        revealed_mask |= step
        rounds += 1
        revealed = frame[revealed_mask]
        probas = fitter(estimator, revealed[["task", "worker", "label"]])
        reads = revealed.groupby("task").size()
        done = rule.done(probas, reads)
        open_tasks = {t for t in open_tasks if not bool(done.get(t, False))}
    revealed = frame[revealed_mask][["task", "worker", "label"]]
    labels = probas.idxmax(axis=1).rename("agg_label")
    return Replay(int(revealed_mask.sum()), len(frame), rounds, labels, revealed.reset_index(drop=True))
