"""Adaptive reads: which image still needs a reader, and which reader, so no read is wasted.

A study that has every image read by every dermatologist spends most reads on images the first two
readers already agree on. With the Dawid-Skene posterior (which weighs each reader by their estimated
reliability) an image can stop once its consensus is confident: :class:`StoppingRule` says an image is
done when its most probable class has posterior >= ``confidence`` after at least ``min_reads`` reads (or
when it has ``max_reads``). :func:`next_reads` turns a fitted consensus into a queue: every open image
with the readers who have not read it yet, the most reliable first. :func:`replay` measures the rule on
a recorded multi-reader set: the reads of each image are revealed one round at a time, in a random order
or (``order="reliable"``, after ``random_reads`` random reads) the read of the reader the consensus so far
rates most reliable first (:func:`reader_accuracy`), the consensus is refitted after each round, and an image
stops when the rule says so; the reads used and the accuracy of the final consensus are compared with
those of collecting every read.
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

    The default, p >= 0.999 after >= 3 reads, kept the accuracy of every read (within one image) on
    both DermX dermatologist sets while saving 56% and 53% of their reads; looser rules (p >= 0.95 after
    >= 2) saved ~70% and lost 1-2.4 points (``bench/adaptive_reads.py``, docs/RESULTS.md).

    Args:
        confidence: the consensus posterior of its most probable class that is enough ...
        min_reads: ... once it has at least this many reads;
        max_reads: an image with this many reads is done whatever its posterior (None: no cap).
    """

    confidence: float = 0.999
    min_reads: int = 3
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


def reader_accuracy(fitted: Any) -> pd.Series:
    """Each reader's estimated accuracy under a fitted Dawid-Skene-like estimator.

    ``sum_c priors_[c] * errors_.loc[(reader, c), c]``: the probability that the reader answers the true
    class of an image drawn from the fitted class prior (the diagonal of their confusion matrix,
    weighted by how common each class is). It reads only the fit (``errors_`` and ``priors_``), so it
    never looks at truth.

    Args:
        fitted: a fitted estimator with ``errors_`` (indexed by (worker, observed) x true) and
            ``priors_``.

    Returns:
        Reader -> accuracy (name ``accuracy``).
    """
    errors: pd.DataFrame = fitted.errors_
    priors: pd.Series = fitted.priors_
    classes = list(errors.columns)
    workers = errors.index.get_level_values(0).unique()
    matrices = errors.to_numpy().reshape(len(workers), len(classes), len(classes))  # [worker, observed, true]
    diagonal = np.einsum("wcc->wc", matrices)
    weights = priors.reindex(classes).to_numpy()
    return pd.Series(diagonal @ weights, index=workers, name="accuracy")


ORDERS = ("random", "reliable")


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
    order: str = "random",
    reliability: Callable[[Any], pd.Series] = reader_accuracy,
    random_reads: int = 1,
) -> Replay:
    """Replay a recorded set with the stopping rule, one more read per open image and round.

    The first round reveals one read per image, chosen at random. Each later round reveals one more
    read of every image that is still open and has one left: with ``order="random"`` the next read in
    a random order drawn per image; with ``order="reliable"`` the recorded read of the reader the
    current fit estimates as the most reliable (``reliability`` of the fitted estimator; readers the
    fit has not seen yet get the mean of those it has; ties go to the random order). The choice uses
    only the reads revealed so far, never truth nor the labels of unrevealed reads. After each round the
    estimator (copied) is refitted on every revealed read and the images the rule calls done close. It
    ends when no open image has a read left.

    Args:
        answers: long table ``task``, ``worker``, ``label`` (every recorded read).
        estimator: an unfitted Dawid-Skene-like estimator (``fit(data)`` then ``probas_``); copied.
        rule: the stopping rule.
        random_state: seed of the read order.
        fit: how to fit (default ``copy.deepcopy(estimator).fit(data).probas_``); only with
            ``order="random"``, as the reliable order needs the fitted estimator.
        order: ``"random"`` or ``"reliable"``.
        reliability: fitted estimator -> reader -> reliability, higher better (``order="reliable"``);
            default :func:`reader_accuracy`.
        random_reads: with ``order="reliable"``, how many reads per image are revealed in the random
            order before the choice by reliability starts (at least 1: one read per image says nothing
            about who is reliable; 2 gives the first fit pairs of readers to compare).

    Returns:
        The reads used, the final consensus and how many rounds it took.

    Raises:
        ValueError: an unknown ``order``, or ``fit`` given with ``order="reliable"``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if random_reads < 1:
        raise ValueError(f"random_reads must be at least 1, got {random_reads}")
    if fit is not None and order != "random":
        raise ValueError("order='reliable' needs the fitted estimator: leave fit=None")
    rule = rule if rule is not None else StoppingRule()
    frame = check_columns(answers, ("task", "worker", "label"))[["task", "worker", "label"]]
    frame = frame.reset_index(drop=True)
    classes = sorted(pd.unique(frame["label"]).tolist())

    def default_fit(est: Any, data: pd.DataFrame) -> Any:
        fitted = copy.deepcopy(est)
        if getattr(fitted, "classes", None) is None:
            fitted.classes = classes
        return fitted.fit(data)

    rng = np.random.default_rng(random_state)
    shuffle = pd.Series(rng.random(len(frame)), index=frame.index)
    rank = shuffle.groupby(frame["task"]).rank(method="first").astype(int) - 1  # 0 = the first read shown
    ranks = rank.to_numpy()
    tasks = frame["task"]
    workers = frame["worker"]
    open_tasks = set(tasks)
    revealed_mask = np.zeros(len(frame), dtype=bool)
    rounds = 0
    probas = pd.DataFrame()
    scores = pd.Series(dtype=float)  # reader -> reliability, from the latest fit
    while True:
        candidate = tasks.isin(open_tasks).to_numpy() & ~revealed_mask
        if order == "random" or rounds < random_reads:
            step = candidate & (ranks == rounds)
        else:
            score = workers.map(scores).astype(float).fillna(float(scores.mean())).to_numpy()
            pool = pd.DataFrame({"task": tasks, "key": -score, "rank": ranks})[candidate]
            chosen = pool.sort_values(["key", "rank"], kind="stable").drop_duplicates("task").index
            step = np.zeros(len(frame), dtype=bool)
            step[chosen.to_numpy()] = True
        if not step.any():
            break
        revealed_mask |= step
        rounds += 1
        revealed = frame[revealed_mask]
        if fit is not None:
            probas = fit(estimator, revealed)
        else:
            fitted = default_fit(estimator, revealed)
            probas = fitted.probas_
            if order == "reliable":
                scores = reliability(fitted)
        reads = revealed.groupby("task").size()
        done = rule.done(probas, reads)
        open_tasks = {t for t in open_tasks if not bool(done.get(t, False))}
    revealed = frame[revealed_mask]
    labels = probas.idxmax(axis=1).rename("agg_label")
    return Replay(int(revealed_mask.sum()), len(frame), rounds, labels, revealed.reset_index(drop=True))
