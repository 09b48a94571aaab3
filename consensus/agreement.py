r"""Inter-rater agreement: percent agreement, Cohen's and Fleiss' kappa, Krippendorff's alpha, vs consensus.

All functions take crowd-kit's long table (``task``, ``worker``, ``label``; a missing rating is an absent
row) and are computed from integer codes with ``np.bincount``. Notation: item :math:`i` has
:math:`m_i` ratings, :math:`n_{ic}` of them in class :math:`c`; items with fewer than two ratings hold no
pair and are left out of every statistic below except the rater-vs-consensus one. A repeated
(item, rater) row counts as another rating (as crowd-kit and NLTK count it), except in
:func:`pairwise_cohen_kappa`, which needs one rating per rater and item.

* **Percent agreement**: the mean over items of the share of agreeing rater pairs,
  :math:`P_i = \sum_c n_{ic}(n_{ic} - 1) / (m_i(m_i - 1))`.
* **Cohen's kappa** (Cohen 1960, doi:10.1177/001316446002000104) for two raters on the items both rated:
  :math:`\kappa = (p_o - p_e) / (1 - p_e)` with :math:`p_e = \sum_c p^a_c p^b_c` from each rater's own
  marginals, as ``sklearn.metrics.cohen_kappa_score``.
* **Fleiss' kappa** (Fleiss 1971, doi:10.1037/h0031619): :math:`(\bar P - P_e) / (1 - P_e)` with
  :math:`\bar P` the mean of :math:`P_i` and :math:`P_e = \sum_c p_c^2`, :math:`p_c` the share of all
  ratings in class :math:`c`. Fleiss defined it for a fixed number of raters per item; with varying
  :math:`m_i` every item with at least two ratings weighs the same in :math:`\bar P` and :math:`p_c`
  pools all their ratings (the usual generalisation; identical to Fleiss' formula when :math:`m_i` is
  constant).
* **Krippendorff's alpha** (nominal; Krippendorff 2004, *Content Analysis*, ch. 11):
  :math:`\alpha = 1 - (n - 1) \sum_i (m_i^2 - \sum_c n_{ic}^2) / (m_i - 1) / (n^2 - \sum_c n_c^2)`
  over the :math:`n` pairable ratings, which is the coincidence-matrix form; it weighs items by their
  number of ratings and corrects for small samples. Equal to ``crowdkit.metrics.data.alpha_krippendorff``
  (which calls NLTK's ``AnnotationTask.alpha``), including its value 1.0 when only one class occurs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from consensus._validate import Encoded, encode_answers

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _item_counts(enc: Encoded) -> FloatArray:
    """Item × class rating counts ``n_ic``."""
    n_classes = len(enc.classes)
    flat = np.bincount(enc.task * n_classes + enc.label, minlength=len(enc.tasks) * n_classes)
    return flat.reshape(len(enc.tasks), n_classes).astype(np.float64)


def _pairable(counts: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Counts and totals of the items with at least two ratings.

    Raises:
        ValueError: no item has two ratings.
    """
    totals = counts.sum(axis=1)
    keep = totals >= 2
    if not keep.any():
        raise ValueError("no item has ratings from two raters, so agreement is undefined")
    return counts[keep], totals[keep]


def _kappa_from_tables(tables: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Cohen's kappa, observed agreement and size of a stack of ``(..., K, K)`` contingency tables.

    A table whose chance agreement is 1 (both raters used one and the same class) has kappa NaN,
    as scikit-learn gives (0 / 0), without its warning.
    """
    n = tables.sum(axis=(-2, -1))
    diag = np.trace(tables, axis1=-2, axis2=-1)
    rows, cols = tables.sum(axis=-1), tables.sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = diag / n
        expected = (rows * cols).sum(axis=-1) / n**2
        kappa = np.where(expected < 1, (observed - expected) / (1 - expected), np.nan)
    return kappa, observed, n


def percent_agreement(data: pd.DataFrame, classes: Sequence[Hashable] | None = None) -> float:
    """Mean over items of the share of rater pairs that agree (items with one rating left out).

    Args:
        data: long table with columns ``task``, ``worker``, ``label``.
        classes: the full class set (only checked against the labels); default the observed labels.

    Returns:
        A share in [0, 1].

    Raises:
        ValueError: invalid table (see :func:`consensus._validate.encode_answers`) or no item with two
            ratings.

    Examples:
        >>> df = pd.DataFrame({"task": [1, 1, 1, 2, 2], "worker": list("abcab"), "label": [0, 0, 1, 1, 1]})
        >>> round(percent_agreement(df), 4)  # item 1: 1 of 3 pairs agree; item 2: 1 of 1
        0.6667
    """
    counts, totals = _pairable(_item_counts(encode_answers(data, classes, single_class_ok=True)))
    per_item = (counts * (counts - 1)).sum(axis=1) / (totals * (totals - 1))
    return float(per_item.mean())


def fleiss_kappa(data: pd.DataFrame, classes: Sequence[Hashable] | None = None) -> float:
    """Fleiss' kappa; items with different numbers of raters handled as in the module docstring.

    Args:
        data: long table with columns ``task``, ``worker``, ``label``.
        classes: the full class set (only checked against the labels); default the observed labels.

    Returns:
        Kappa (1 = perfect agreement, 0 = chance); NaN when every rating is the same class.

    Raises:
        ValueError: invalid table or no item with two ratings.

    Examples:
        >>> df = pd.DataFrame({"task": [1, 1, 2, 2], "worker": list("abab"), "label": [0, 0, 1, 1]})
        >>> fleiss_kappa(df)
        1.0
    """
    counts, totals = _pairable(_item_counts(encode_answers(data, classes, single_class_ok=True)))
    p_bar = float(((counts * (counts - 1)).sum(axis=1) / (totals * (totals - 1))).mean())
    shares = counts.sum(axis=0) / totals.sum()
    p_e = float((shares**2).sum())
    if p_e >= 1:
        return float("nan")
    return (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha(data: pd.DataFrame, classes: Sequence[Hashable] | None = None) -> float:
    """Krippendorff's alpha for nominal data (the formula in the module docstring).

    Args:
        data: long table with columns ``task``, ``worker``, ``label``.
        classes: the full class set (only checked against the labels); default the observed labels.

    Returns:
        Alpha (1 = perfect agreement, 0 = chance); 1.0 when a single class occurs, as crowd-kit.

    Raises:
        ValueError: invalid table or no item with two ratings.

    Examples:
        >>> df = pd.DataFrame(
        ...     {"task": list("XXYYZZ"), "worker": list("ABABAB"), "label": ["y", "y", "n", "n", "y", "n"]}
        ... )
        >>> round(krippendorff_alpha(df), 4)
        0.4444
    """
    enc = encode_answers(data, classes, single_class_ok=True)
    if len(np.unique(enc.label)) == 1:
        return 1.0  # alpha is 0 / 0 here; crowd-kit (NLTK) reports perfect agreement
    counts, totals = _pairable(_item_counts(enc))
    observed = float(((totals**2 - (counts**2).sum(axis=1)) / (totals - 1)).sum())
    class_totals = counts.sum(axis=0)
    n = float(class_totals.sum())
    expected = n**2 - float((class_totals**2).sum())
    if expected == 0:
        return 1.0
    return 1.0 - (n - 1) * observed / expected


def pairwise_cohen_kappa(
    data: pd.DataFrame, classes: Sequence[Hashable] | None = None, min_items: int = 1
) -> pd.DataFrame:
    """Cohen's kappa and percent agreement of every pair of raters on the items both rated.

    Args:
        data: long table with columns ``task``, ``worker``, ``label``; one row per (task, worker).
        classes: the full class set (only checked against the labels); default the observed labels.
        min_items: leave out pairs that share fewer items.

    Returns:
        DataFrame with columns ``worker_a``, ``worker_b``, ``n_items``, ``kappa`` (NaN where both raters
        used one and the same class on the shared items), ``percent_agreement``; one row per pair
        (``worker_a`` first in the table's order). ``pivot(index="worker_a", columns="worker_b",
        values="kappa")`` gives the agreement matrix.

    Raises:
        ValueError: invalid table, or a rater rated an item twice (the pairing would be ambiguous).

    Examples:
        >>> df = pd.DataFrame(
        ...     {"task": [1, 1, 2, 2, 3, 3], "worker": list("ababab"), "label": [0, 0, 1, 1, 0, 1]}
        ... )
        >>> pairwise_cohen_kappa(df)[["worker_a", "worker_b", "n_items"]].to_dict("records")
        [{'worker_a': 'a', 'worker_b': 'b', 'n_items': 3}]
    """
    enc = encode_answers(data, classes, single_class_ok=True)
    n_workers, n_classes = len(enc.workers), len(enc.classes)
    pair_keys = enc.task * n_workers + enc.worker
    if len(np.unique(pair_keys)) != enc.n_answers:
        raise ValueError(
            "some raters rated the same task more than once; Cohen's kappa needs one rating per "
            "(task, worker): drop or resolve the duplicates first"
        )
    codes = pd.DataFrame({"task": enc.task, "worker": enc.worker, "label": enc.label})
    both = codes.merge(codes, on="task", suffixes=("_a", "_b"))
    both = both[both["worker_a"].to_numpy() < both["worker_b"].to_numpy()]
    a, b = both["worker_a"].to_numpy(), both["worker_b"].to_numpy()
    pair_codes, pairs = pd.factorize(a * n_workers + b, sort=True)
    cells = (pair_codes * n_classes + both["label_a"].to_numpy()) * n_classes + both["label_b"].to_numpy()
    tables = np.bincount(cells, minlength=len(pairs) * n_classes**2).reshape(-1, n_classes, n_classes)
    kappa, observed, n_items = _kappa_from_tables(tables.astype(np.float64))
    pairs = np.asarray(pairs, dtype=np.int64)
    out = pd.DataFrame(
        {
            "worker_a": enc.workers.take(pairs // n_workers),
            "worker_b": enc.workers.take(pairs % n_workers),
            "n_items": n_items.astype(np.int64),
            "kappa": kappa,
            "percent_agreement": observed,
        }
    )
    return out[out["n_items"] >= min_items].reset_index(drop=True)


def rater_vs_consensus(
    data: pd.DataFrame, consensus: pd.Series, classes: Sequence[Hashable] | None = None
) -> pd.DataFrame:
    """Each rater against a consensus label (e.g. ``DawidSkene().fit_predict(data)``).

    Args:
        data: long table with columns ``task``, ``worker``, ``label``.
        consensus: consensus label per task (indexed by task); tasks without one are left out.
        classes: the full class set; default the labels observed in ``data`` and ``consensus``.

    Returns:
        DataFrame with columns ``worker``, ``n_items`` (the rater's answers on tasks with a consensus),
        ``percent_agreement`` and ``kappa`` (Cohen's, rater vs consensus; NaN when undefined).

    Raises:
        ValueError: invalid table, a consensus with NaN or values outside ``classes``, or no task of
            ``data`` in ``consensus``.

    Examples:
        >>> df = pd.DataFrame({"task": [1, 1, 2, 2], "worker": list("abab"), "label": [0, 1, 1, 1]})
        >>> rater_vs_consensus(df, pd.Series({1: 0, 2: 1}))["percent_agreement"].tolist()
        [1.0, 0.5]
    """
    if not isinstance(consensus, pd.Series):
        raise TypeError(f"consensus must be a pandas Series indexed by task, got {type(consensus).__name__}")
    if consensus.isna().any():
        raise ValueError(f"consensus has {int(consensus.isna().sum())} NaN label(s)")
    if classes is None and isinstance(data, pd.DataFrame) and "label" in data.columns:
        # The class set must cover the consensus too, or a class only it uses would be unknown.
        union = _sorted_unique(pd.concat([data["label"], consensus], ignore_index=True))
        classes = list(union) if len(union) >= 2 else None
    enc = encode_answers(data, classes, single_class_ok=True)
    n_workers, n_classes = len(enc.workers), len(enc.classes)
    reference = consensus.reindex(enc.tasks)
    known = reference.notna().to_numpy()
    if not known[enc.task].any():
        raise ValueError("no task of data has a consensus label (check the consensus index)")
    ref_codes = enc.classes.get_indexer(pd.Index(reference[known]))
    if (ref_codes < 0).any():
        unknown = sorted(set(reference[known][ref_codes < 0]), key=repr)
        raise ValueError(f"consensus labels {unknown} are not in classes {list(enc.classes)}")
    task_ref = np.full(len(enc.tasks), -1, dtype=np.int64)
    task_ref[known] = ref_codes
    answer_ref = task_ref[enc.task]
    used = answer_ref >= 0
    cells = (enc.worker[used] * n_classes + enc.label[used]) * n_classes + answer_ref[used]
    tables = np.bincount(cells, minlength=n_workers * n_classes**2).reshape(-1, n_classes, n_classes)
    kappa, observed, n_items = _kappa_from_tables(tables.astype(np.float64))
    return pd.DataFrame(
        {
            "worker": enc.workers,
            "n_items": n_items.astype(np.int64),
            "percent_agreement": observed,
            "kappa": kappa,
        }
    )


def _sorted_unique(values: pd.Series) -> pd.Index:
    """Distinct non-NaN values, sorted where they sort."""
    index = pd.Index(pd.unique(values.dropna()))
    try:
        return index.sort_values()
    except TypeError:
        return index


def bootstrap_interval(
    data: pd.DataFrame,
    statistic: Callable[[pd.DataFrame], float],
    groups: Mapping[Hashable, Hashable] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    random_state: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of an agreement statistic, resampling items, or groups of items.

    Images of one lesion (or lesions of one patient) are not independent: with ``groups`` (task ->
    group, e.g. from :func:`consensus.groups.lesion_group`) whole groups are resampled, so the interval
    is not narrowed by counting one lesion several times. Tasks missing from ``groups`` are their own
    group. Deterministic for a given ``random_state``.

    Args:
        data: long table ``task``, ``worker``, ``label``.
        statistic: e.g. :func:`fleiss_kappa` or :func:`krippendorff_alpha`.
        groups: task -> group key; default every task alone.
        n_boot: bootstrap resamples.
        level: coverage.
        random_state: seed.

    Returns:
        ``(low, high)``; NaN where fewer than half of the resamples give a finite value.

    Raises:
        ValueError: ``n_boot`` below 1 or ``level`` outside (0, 1).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tasks = pd.Index(pd.unique(data["task"]))
    keys = [groups.get(t, ("task", t)) if groups is not None else ("task", t) for t in tasks]
    group_codes, _ = pd.factorize(pd.Series(keys, dtype=object))
    members = [np.flatnonzero(group_codes == g) for g in range(group_codes.max() + 1)]
    row_task = tasks.get_indexer(pd.Index(data["task"]))
    rows_of = [np.flatnonzero(row_task == t) for t in range(len(tasks))]
    rng = np.random.default_rng(random_state)
    values = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), len(members))
        picked = [t for g in drawn for t in members[g]]
        rows = np.concatenate([rows_of[t] for t in picked])
        # Each drawn copy of a task is a task of its own (else a repeated task would look like more raters).
        copy = np.repeat(np.arange(len(picked)), [len(rows_of[t]) for t in picked])
        sample = data.iloc[rows][["worker", "label"]].assign(task=copy)
        try:
            value = statistic(sample)
        except ValueError:
            continue
        if np.isfinite(value):
            values.append(value)
    if len(values) < n_boot / 2:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
