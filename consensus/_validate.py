"""Validation and integer encoding of long answer tables, shared by the consensus estimators.

Every estimator in :mod:`consensus` takes crowd-kit's long format: one row per answer with the columns
``task``, ``worker`` and ``label``; a missing answer is an absent row. The checks here run before any
arithmetic so that a bad table fails with a ``ValueError`` that names the problem (crowd-kit lets a
``KeyError`` escape, or silently treats NaN as a class).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

ANSWER_COLUMNS: tuple[str, str, str] = ("task", "worker", "label")

#: How many offending rows an error message quotes.
_SHOWN = 5

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Encoded:
    """A validated answer table as integer codes (one entry per answer) plus the decoding indexes.

    Attributes:
        task: task code of each answer, in ``range(len(tasks))``.
        worker: worker code of each answer, in ``range(len(workers))``.
        label: class code of each answer, in ``range(len(classes))``.
        tasks: task ids in code order (first appearance in the table).
        workers: worker ids in code order (first appearance in the table).
        classes: class values in code order (sorted where the values sort, else as given).
    """

    task: IntArray
    worker: IntArray
    label: IntArray
    tasks: pd.Index
    workers: pd.Index
    classes: pd.Index

    @property
    def n_answers(self) -> int:
        """Number of answers (rows), repeated (task, worker) rows included."""
        return int(self.task.shape[0])


def _rows(mask: pd.Series) -> str:
    """``"N answer(s) ... e.g. at row(s) [...]"`` fragment for an error message."""
    index = mask.index[mask.to_numpy()]
    shown = ", ".join(repr(i) for i in index[:_SHOWN])
    more = ", ..." if len(index) > _SHOWN else ""
    return f"{len(index)} answer(s), e.g. at row(s) [{shown}{more}]"


def check_columns(data: object, columns: Sequence[str]) -> pd.DataFrame:
    """Check that ``data`` is a non-empty DataFrame holding ``columns``.

    Args:
        data: the table to check.
        columns: the column names it must have.

    Returns:
        ``data`` itself, typed as a DataFrame.

    Raises:
        TypeError: ``data`` is not a pandas DataFrame.
        ValueError: a column is missing (all missing ones are named) or the table has no rows.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(
            f"expected a pandas DataFrame with columns {list(columns)}, got {type(data).__name__}"
        )
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise ValueError(
            f"data is missing column(s) {missing}; expected a long table with columns "
            f"{', '.join(columns)} (one row per answer), got {list(data.columns)}"
        )
    if len(data) == 0:
        raise ValueError("data is empty: there are no answers to aggregate")
    return data


def check_no_missing(data: pd.DataFrame, column: str, what: str) -> None:
    """Raise if ``column`` holds NaN / None.

    Args:
        data: the answer table.
        column: the column to check.
        what: how the message names the column's content (``"task id"``, ``"label"``).

    Raises:
        ValueError: naming how many rows and which ones.
    """
    missing = data[column].isna()
    if missing.any():
        hint = (
            "; drop those rows (a missing answer is an absent row, not a NaN label)"
            if column == "label"
            else "; every answer needs one"
        )
        raise ValueError(f"{_rows(missing)} have no {what} (NaN or None in column {column!r}){hint}")


def resolve_classes(
    labels: pd.Series, classes: Sequence[Hashable] | None, single_class_ok: bool = False
) -> pd.Index:
    """The class set: ``classes`` when given (checked), else the observed label values.

    Args:
        labels: the label column (no NaN).
        classes: the full class set, or None to use the observed values.
        single_class_ok: accept a single observed class (agreement statistics are defined there,
            an estimator has nothing to estimate).

    Returns:
        The classes, sorted when not given and the values sort.

    Raises:
        ValueError: ``classes`` repeats a value or names fewer than two, a label is not in
            ``classes``, or (without ``classes``) only one class is observed.
    """
    if classes is not None:
        index = pd.Index(list(classes))
        if index.has_duplicates or len(index) < 2:
            raise ValueError(f"classes must name at least two distinct values, got {list(classes)}")
        unknown = pd.Index(pd.unique(labels))
        unknown = unknown[index.get_indexer(unknown) < 0]
        if len(unknown):
            shown = unknown[:_SHOWN].tolist() + (["..."] if len(unknown) > _SHOWN else [])
            raise ValueError(f"label value(s) {shown} are not in classes {index.tolist()}")
        return index
    observed = pd.Index(pd.unique(labels))
    with contextlib.suppress(TypeError):  # mixed types that do not order: keep first appearance
        observed = observed.sort_values()
    if len(observed) < 2 and not single_class_ok:
        raise ValueError(
            f"only one class ({observed.tolist()[0]!r}) is observed, so there is nothing to estimate; pass "
            f"classes=[...] with the full class set (e.g. classes=[0, 1] for a binary label nobody marked)"
        )
    return observed


def encode_answers(
    data: object, classes: Sequence[Hashable] | None = None, single_class_ok: bool = False
) -> Encoded:
    """Validate a long answer table and encode it as integer codes.

    Args:
        data: a DataFrame with columns ``task``, ``worker``, ``label`` (others are ignored).
        classes: the full class set, or None to use the observed label values.
        single_class_ok: accept a table where only one class is observed (and no ``classes``).

    Returns:
        The integer codes and decoding indexes.

    Raises:
        TypeError: ``data`` is not a DataFrame.
        ValueError: missing columns, an empty table, NaN task / worker ids or labels, labels not in
            ``classes``, or only one observed class without ``classes`` (unless ``single_class_ok``).
    """
    frame = check_columns(data, ANSWER_COLUMNS)
    check_no_missing(frame, "task", "task id")
    check_no_missing(frame, "worker", "worker id")
    check_no_missing(frame, "label", "label")
    class_index = resolve_classes(frame["label"], classes, single_class_ok)
    task_codes, tasks = pd.factorize(frame["task"])
    worker_codes, workers = pd.factorize(frame["worker"])
    label_codes = class_index.get_indexer(pd.Index(frame["label"]))
    return Encoded(
        task=task_codes.astype(np.int64, copy=False),
        worker=worker_codes.astype(np.int64, copy=False),
        label=label_codes.astype(np.int64, copy=False),
        tasks=pd.Index(tasks, name="task"),
        workers=pd.Index(workers, name="worker"),
        classes=class_index.rename("label"),
    )
