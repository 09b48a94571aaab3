"""Which items a senior dermatologist should adjudicate: the disputed ones, per label.

An item is disputed for a label when its consensus posterior is uncertain (the most probable class's
posterior lies within ``[low, high)``) or when its raters have no majority (the most frequent answer
ties with another). Gold items (already adjudicated, or with histopathology) are never disputed. The
rule is pure: it reads the consensus posteriors and the answers, and returns one row per (item, label)
with why it was selected, so the queue a coordinator sees can be traced to the run that made it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import pandas as pd

#: Columns of :func:`disputed_items`' result.
DISPUTED_COLUMNS: tuple[str, ...] = (
    "task",
    "label_key",
    "value",
    "posterior",
    "n_answers",
    "votes",
    "reason",
)


@dataclass(frozen=True)
class DisputeRule:
    """What makes an item disputed for one label.

    Args:
        low: a most-probable posterior at or above this ...
        high: ... and below this counts as uncertain (binary: 0.5 <= p < 0.9 by default).
        no_majority: also select items whose raters split evenly between the top answers (2-2).
        min_answers: ignore items with fewer answers than this (nothing to adjudicate yet).
    """

    low: float = 0.0
    high: float = 0.9
    no_majority: bool = True
    min_answers: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(
                f"the posterior bounds must satisfy 0 <= low < high <= 1, got {self.low}, {self.high}"
            )
        if self.min_answers < 1:
            raise ValueError(f"min_answers must be at least 1, got {self.min_answers}")


def disputed_items(
    posteriors: Mapping[str, pd.DataFrame],
    answers: pd.DataFrame,
    rule: DisputeRule | None = None,
    gold: Iterable[tuple[str, str]] = (),
) -> pd.DataFrame:
    """The (item, label) pairs to adjudicate.

    Args:
        posteriors: label key -> task × class posteriors (a run's ``probas_`` per label).
        answers: long table ``task``, ``worker``, ``label_key``, ``value`` (the answers of that run).
        rule: the selection rule (default :class:`DisputeRule`).
        gold: (task, label key) pairs that already have a gold label; they are left out.

    Returns:
        Rows :data:`DISPUTED_COLUMNS`, sorted by task then label key: the consensus ``value`` and its
        ``posterior``, the number of answers, the answer counts as text (``"1:2 0:2"``) and the
        ``reason`` (``uncertain``, ``no majority`` or both, joined by ``+``).
    """
    rule = rule if rule is not None else DisputeRule()
    known = {(str(t), str(k)) for t, k in gold}
    rows = []
    for key, probas in posteriors.items():
        part = answers[answers["label_key"] == key]
        if part.empty or probas.empty:
            continue
        counts = part.groupby(["task", "value"]).size().unstack(fill_value=0)
        for task, row in probas.iterrows():
            if (str(task), str(key)) in known or task not in counts.index:
                continue
            votes = counts.loc[cast(Any, task)]
            votes = votes[votes > 0].sort_values(ascending=False, kind="stable")
            n_answers = int(votes.sum())
            if n_answers < rule.min_answers:
                continue
            best = row.idxmax()
            posterior = float(row.max())
            reasons = []
            if rule.low <= posterior < rule.high:
                reasons.append("uncertain")
            if rule.no_majority and len(votes) > 1 and votes.iloc[0] == votes.iloc[1]:
                reasons.append("no majority")
            if reasons:
                shown = " ".join(f"{v}:{int(n)}" for v, n in votes.items())
                rows.append((task, key, best, posterior, n_answers, shown, "+".join(reasons)))
    frame = pd.DataFrame(rows, columns=list(DISPUTED_COLUMNS))
    return frame.sort_values(["task", "label_key"], key=lambda c: c.astype(str)).reset_index(drop=True)
