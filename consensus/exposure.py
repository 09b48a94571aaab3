"""AI exposure: do readers anchor on the pre-annotation?

A reading study with AI pre-annotation must report, per label, how often readers agree with what the
model showed them and with the reference standard, for reads that started from a prediction
(*assisted*) and reads that did not (*unassisted*). If assisted readers agree with the model far more
often than unassisted readers do, while agreeing no better with the consensus, they anchor.

Input: one row per read and label (:data:`READ_COLUMNS`): who read (``rater``), what (``item``), the
label, the value the reader gave, the pre-annotation's value for that image (``prediction``; missing
where unknown: for an unassisted read, what the model says about the same image where it is known),
whether the read started from a prediction (``assisted``) and, optionally, the ``group`` the item
belongs to (its lesion or patient, :func:`consensus.groups.lesion_group`; default the item itself).

The rates are ratios over reads; reads of one image (or lesion, or patient) are not independent, so
the uncertainty is estimated by a cluster bootstrap that resamples groups (Davison & Hinkley 1997,
"Bootstrap Methods and their Application", sec. 3.8). Each rate's 95% interval is the Wilson score
interval (Wilson 1927, doi:10.1080/01621459.1927.10502953) at the effective sample size
``n / deff``, where the design effect ``deff`` is the bootstrap variance over the binomial variance
(at least 1): the approach of Korn & Graubard (1998, Survey Methodology 24:193-201) for proportions
from clustered data. It always contains the estimate, stays inside [0, 1] (a 100% agreement still
gets an interval below 1) and narrows as groups are added. The difference between the arms gets
Newcombe's hybrid score interval built from the two arms' intervals (Newcombe 1998, method 10, with the
clustered limits); it treats the arms as independent, which the same images read in both arms (reads
of one image agree alike) make conservative.

A blind-first, then AI-assisted study reads each image twice, in two Label Studio projects:
:func:`paired_reads` puts a reader's two reads of an image side by side. A read is *blind* when it
did not start from a prediction and nothing in its project did (the project showed no prediction);
a read without a prediction in a project where others started from one is neither blind nor
assisted for the pairing (the reader may have seen the prediction), though it counts as unassisted
in :func:`exposure`.

Pure: numpy and pandas only, no SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

READ_COLUMNS: tuple[str, ...] = ("rater", "item", "label_key", "value", "prediction", "assisted")

ASSISTED = "assisted"
UNASSISTED = "unassisted"
DIFFERENCE = "assisted - unassisted"

#: What a read is compared with: the pre-annotation and the consensus.
REFERENCES: tuple[str, ...] = ("prediction", "consensus")

EXPOSURE_COLUMNS: tuple[str, ...] = (
    "label_key",
    "arm",
    "n_reads",
    "n_items",
    "n_groups",
    *(
        column
        for reference in REFERENCES
        for column in (
            f"n_with_{reference}",
            f"agree_{reference}",
            f"agree_{reference}_low",
            f"agree_{reference}_high",
        )
    ),
)

FloatArray = npt.NDArray[np.float64]


def wilson_interval(p: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed on ``n`` (possibly effective) trials.

    Returns ``(nan, nan)`` for ``n <= 0``.
    """
    if not n > 0 or np.isnan(p):
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # Rounding can leave the bound a hair past p at p = 0 or 1.
    return float(min(max(centre - half, 0.0), p)), float(max(min(centre + half, 1.0), p))


def bootstrap_draws(n_groups: int, n_boot: int, rng: np.random.Generator) -> FloatArray:
    """How many times each group is drawn in each bootstrap replicate (``n_boot x n_groups``): the
    ``weights`` of :func:`clustered_rate`."""
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(float)


def clustered_rate(
    agree: FloatArray, known: FloatArray, weights: FloatArray | None, level: float = 0.95
) -> tuple[float, float, float]:
    """A rate ``sum(agree) / sum(known)`` over groups, with its Wilson interval at the effective size.

    Args:
        agree: per group, how many reads agree.
        known: per group, how many reads could be compared.
        weights: bootstrap draws of the groups (``n_boot x n_groups``), or None for no bootstrap
            (independent reads).
        level: the interval's coverage.

    Returns:
        The rate and its interval; NaN for all three when no read could be compared.
    """
    total = float(known.sum())
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    p = float(agree.sum()) / total
    deff = 1.0
    if weights is not None and len(known) > 1 and 0 < p < 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            replicates = (weights @ agree) / (weights @ known)
        replicates = replicates[np.isfinite(replicates)]
        if len(replicates) > 1:
            deff = max(1.0, float(np.var(replicates, ddof=1)) / (p * (1 - p) / total))
    low, high = wilson_interval(p, total / deff, level)
    return p, low, high


def _check(reads: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in READ_COLUMNS if c not in reads.columns]
    if missing:
        raise ValueError(f"the reads table lacks the column(s) {missing}; it has {list(reads.columns)}")
    table = reads.copy()
    if "group" not in table.columns:
        table["group"] = table["item"]
    table["group"] = table["group"].where(table["group"].notna(), table["item"])
    if table["value"].isna().any():
        raise ValueError("a read without a value: absent answers are absent rows")
    bad = table.loc[~table["assisted"].isin([True, False]), "assisted"]
    if len(bad):
        raise ValueError(f"assisted must be True or False; found {sorted(map(repr, set(bad)))[:5]}")
    table["assisted"] = table["assisted"].astype(bool)
    return table


def _consensus_long(consensus: pd.DataFrame | None, labels: Sequence[str]) -> pd.Series:
    """The consensus as a Series indexed by ``(item, label_key)``."""
    if consensus is None or consensus.empty:
        return pd.Series(dtype=object, index=pd.MultiIndex.from_tuples([], names=["item", "label_key"]))
    present = [k for k in labels if k in consensus.columns]
    frame = consensus[present].astype(object)
    frame.index = frame.index.map(str)
    long = pd.Series(frame.stack(future_stack=True)).dropna()
    long.index = long.index.set_names(["item", "label_key"])
    return long


def _same(a: pd.Series, b: pd.Series) -> pd.Series:
    """Element-wise equality of two value columns (0 / 1, or class codes), NaN where either is missing."""
    known = a.notna() & b.notna()
    equal = a.astype(str).str.removesuffix(".0") == b.astype(str).str.removesuffix(".0")
    return equal.astype(float).where(known)


def exposure(
    reads: pd.DataFrame,
    consensus: pd.DataFrame | None = None,
    labels: Sequence[str] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    random_state: int | None = 0,
) -> pd.DataFrame:
    """Per label and arm: agreement with the pre-annotation and with the consensus, with intervals.

    Args:
        reads: one row per read and label (:data:`READ_COLUMNS`, optionally ``group`` and
            ``reference_item``: the item whose consensus the read is compared with, default its own).
        consensus: the reference standard, one row per item (index: the reads' ``item``), one column
            per label (e.g. ``Study.consensus``); None: no consensus columns.
        labels: which labels, in which order (default: the reads' own, in order of appearance).
        n_boot: bootstrap replicates (0: reads taken as independent, plain Wilson intervals).
        level: the intervals' coverage.
        random_state: the bootstrap's seed.

    Returns:
        :data:`EXPOSURE_COLUMNS`: per label, a row per arm (``assisted``, ``unassisted``: counts, rates
        with intervals; a rate with nothing to compare is NaN) and a row ``assisted - unassisted``
        (the differences of the rates, with Newcombe's intervals).

    Raises:
        ValueError: a column is missing, a read has no value, or ``assisted`` is not boolean.

    Examples:
        >>> reads = pd.DataFrame({"rater": ["a", "b"], "item": ["x", "x"], "label_key": "bcc",
        ...                       "value": [1, 0], "prediction": [1, 1], "assisted": [True, False]})
        >>> exposure(reads, n_boot=0)[["arm", "agree_prediction"]].to_dict("records")[:2]
        [{'arm': 'assisted', 'agree_prediction': 1.0}, {'arm': 'unassisted', 'agree_prediction': 0.0}]
    """
    table = _check(reads)
    table["item"] = table["item"].astype(str)
    order = list(labels) if labels is not None else list(dict.fromkeys(table["label_key"]))
    table = table[table["label_key"].isin(order)]
    reference = _consensus_long(consensus, order)
    compared = table["reference_item"].astype(str) if "reference_item" in table.columns else table["item"]
    keys = pd.MultiIndex.from_arrays([compared, table["label_key"]])
    table["consensus"] = reference.reindex(keys).to_numpy()
    for name in REFERENCES:
        table[f"agree_{name}"] = _same(table["value"], table[name])
    rng = np.random.default_rng(random_state)
    rows: list[dict[str, object]] = []
    for key in order:
        subset = table[table["label_key"] == key]
        if subset.empty:
            continue
        groups = pd.Index(pd.unique(subset["group"]))
        weights = bootstrap_draws(len(groups), n_boot, rng) if n_boot > 0 else None
        for arm, assisted in ((ASSISTED, True), (UNASSISTED, False)):
            reads_ = subset[subset["assisted"] == assisted]
            row: dict[str, object] = {
                "label_key": key,
                "arm": arm,
                "n_reads": len(reads_),
                "n_items": int(reads_["item"].nunique()),
                "n_groups": int(reads_["group"].nunique()),
            }
            for name in REFERENCES:
                s, n = _group_sums(reads_[f"agree_{name}"], reads_["group"], groups)
                row[f"n_with_{name}"] = int(n.sum())
                rate = _rate(s, n, weights, level)
                row[f"agree_{name}"], row[f"agree_{name}_low"], row[f"agree_{name}_high"] = rate
            rows.append(row)
        rows.append(_difference(key, rows[-2:]))
    counts = [c for c in EXPOSURE_COLUMNS if c.startswith("n_")]
    return pd.DataFrame(rows, columns=list(EXPOSURE_COLUMNS)).astype(dict.fromkeys(counts, "Int64"))


def _group_sums(agree: pd.Series, group_of: pd.Series, groups: pd.Index) -> tuple[FloatArray, FloatArray]:
    """Per group (in ``groups``' order): how many reads agree, and how many could be compared
    (``agree`` is 1 / 0, NaN where there is nothing to compare with)."""
    by_group = pd.DataFrame({"agree": agree.fillna(0), "known": agree.notna().astype(float)})
    totals = by_group.groupby(group_of).sum().reindex(groups, fill_value=0.0)
    return totals["agree"].to_numpy(float), totals["known"].to_numpy(float)


def _rate(
    s: FloatArray, n: FloatArray, weights: FloatArray | None, level: float
) -> tuple[float, float, float]:
    """:func:`clustered_rate` over the groups that have something to compare (a group without any is
    no draw of this rate)."""
    seen = n > 0
    return clustered_rate(s[seen], n[seen], weights[:, seen] if weights is not None else None, level)


def _difference(key: str, arms: list[dict[str, object]]) -> dict[str, object]:
    """The row ``assisted - unassisted``: differences of the rates, with Newcombe's interval built from
    the two arms' intervals (Newcombe 1998, "Interval estimation for the difference between independent
    proportions", Statistics in Medicine 17:873-890, method 10)."""
    row: dict[str, object] = {"label_key": key, "arm": DIFFERENCE}
    for name in REFERENCES:
        a, u = (
            tuple(float(arm[f"agree_{name}{end}"]) for end in ("", "_low", "_high"))  # type: ignore[arg-type]
            for arm in arms
        )
        estimate = a[0] - u[0]
        low = estimate - float(np.hypot(a[0] - a[1], u[2] - u[0]))
        high = estimate + float(np.hypot(a[2] - a[0], u[0] - u[1]))
        row[f"agree_{name}"], row[f"agree_{name}_low"], row[f"agree_{name}_high"] = estimate, low, high
    return row


def prepare_reads(stored: pd.DataFrame) -> pd.DataFrame:
    """The store's reads (:data:`consensus.repository.exposure.STORED_READ_COLUMNS`) ready for
    :func:`exposure` and :func:`paired_reads`.

    Adds ``assisted`` (the read started from a prediction), ``blind`` (it did not, and nothing in its
    project did) and ``prediction``: for an assisted read what its prediction showed (where the store
    lacks it, what the same prediction showed another reader); for any other read what the model says
    about the same image (the newest prediction of that image that is known), so that unassisted
    readers' agreement with the model can be measured too. And ``reference_item``: the item whose
    consensus a read is compared with, a blind item of the same image where there is one (its
    consensus comes from blind reads only), else the read's own.
    """
    table = stored.copy()
    table["assisted"] = table["parent_prediction"].notna()
    exposed = set(table.loc[table["assisted"], "project"].map(_project))
    table["blind"] = ~table["assisted"] & ~table["project"].map(_project).isin(exposed)
    shown = table[table["assisted"] & table["shown"].notna()]
    by_prediction = shown.drop_duplicates(["parent_prediction", "label_key"]).set_index(
        ["parent_prediction", "label_key"]
    )["shown"]
    newest = (
        shown.sort_values("parent_prediction", ascending=False)
        .drop_duplicates(["image", "label_key"])
        .set_index(["image", "label_key"])["shown"]
    )
    blind_items = (
        table[table["blind"]].sort_values("item").drop_duplicates("image").set_index("image")["item"]
    )
    table["reference_item"] = table["image"].map(blind_items).fillna(table["item"])
    same_prediction = by_prediction.reindex(
        pd.MultiIndex.from_arrays([table["parent_prediction"], table["label_key"]])
    )
    same_image = newest.reindex(pd.MultiIndex.from_arrays([table["image"], table["label_key"]]))
    table["prediction"] = np.where(
        table["assisted"],
        table["shown"].where(
            table["shown"].notna(), pd.Series(same_prediction.to_numpy(), index=table.index)
        ),
        same_image.to_numpy(),
    )
    return table


def _project(value: Any) -> int | None:
    """A project id as a set member (None and NaN are one: reads without a project)."""
    return None if pd.isna(value) else int(value)


PAIRED_COLUMNS: tuple[str, ...] = (
    "rater", "image", "label_key", "blind_value", "assisted_value", "prediction", "consensus",
    "paired", "blind_item", "assisted_item", "consensus_item", "blind_project", "assisted_project",
    "model_version",
)  # fmt: skip


def paired_reads(reads: pd.DataFrame, consensus: pd.DataFrame | None = None) -> pd.DataFrame:
    """A reader's blind and AI-assisted reads of the same image, side by side (:data:`PAIRED_COLUMNS`).

    One row per (rater, image, label) that has a blind or an assisted read (``paired``: it has both;
    where a reader has two reads of one kind, the newer counts). ``prediction`` is what the assisted
    read was shown (else what the model says about the image), ``consensus`` the reference of the
    blind read's item (built from blind reads), else the one the assisted read is compared with
    (``reference_item``: another reader's blind item of the image, else the assisted read's own).

    Args:
        reads: from :func:`prepare_reads`.
        consensus: one row per item, one column per label (e.g. ``Study.consensus``).
    """
    keys = ["rater", "image", "label_key"]
    ordered = reads.sort_values("updated_at", kind="stable", na_position="first")
    sides = []
    for side, chosen in (("blind", ordered["blind"]), ("assisted", ordered["assisted"])):
        part = ordered[chosen].drop_duplicates(keys, keep="last")
        columns = {
            "value": f"{side}_value",
            "item": f"{side}_item",
            "project": f"{side}_project",
            "prediction": f"{side}_prediction",
            "reference_item": f"{side}_reference",
        }
        kept = [*keys, *columns] + (["model_version"] if side == "assisted" else [])
        sides.append(part[kept].rename(columns=columns))
    pairs = sides[0].merge(sides[1], on=keys, how="outer")
    pairs["prediction"] = pairs["assisted_prediction"].where(
        pairs["assisted_prediction"].notna(), pairs["blind_prediction"]
    )
    pairs["paired"] = pairs["blind_value"].notna() & pairs["assisted_value"].notna()
    pairs["consensus_item"] = pairs["blind_item"].where(
        pairs["blind_item"].notna(), pairs["assisted_reference"]
    )
    reference = _consensus_long(consensus, list(dict.fromkeys(pairs["label_key"])))
    pairs["consensus"] = reference.reindex(
        pd.MultiIndex.from_arrays([pairs["consensus_item"].astype(str), pairs["label_key"]])
    ).to_numpy()
    return pairs.sort_values(keys).reset_index(drop=True)[list(PAIRED_COLUMNS)]


#: Per label, what the pairs show (:func:`pair_summary`).
PAIR_MEASURES: tuple[str, ...] = (
    "blind_agree_prediction",  # the blind read equals the pre-annotation (it was not shown)
    "assisted_agree_prediction",  # the assisted read equals the pre-annotation it was shown
    "toward_prediction",  # of pairs whose blind read differs from the pre-annotation: the assisted equals it
    "away_from_prediction",  # of pairs whose blind read equals the pre-annotation: the assisted differs
    "blind_agree_consensus",
    "assisted_agree_consensus",
)


def pair_summary(
    paired: pd.DataFrame, n_boot: int = 2000, level: float = 0.95, random_state: int | None = 0
) -> pd.DataFrame:
    """Per label, over the complete pairs of :func:`paired_reads`: how often each read agrees with the
    pre-annotation and the consensus, and how often the assisted read moved toward the pre-annotation
    (or away from it), each with its interval (:func:`clustered_rate`, groups = images).

    Returns:
        ``label_key, n_pairs, n_images`` and, per measure of :data:`PAIR_MEASURES`, ``n_<measure>``
        (the pairs it is a share of), the share, ``_low`` and ``_high``.
    """
    pairs = paired[paired["paired"]] if not paired.empty else paired
    rng = np.random.default_rng(random_state)
    rows: list[dict[str, object]] = []
    for key in dict.fromkeys(pairs.get("label_key", pd.Series(dtype=object))):
        sub = pairs[pairs["label_key"] == key]
        blind_hit = _same(sub["blind_value"], sub["prediction"])
        assisted_hit = _same(sub["assisted_value"], sub["prediction"])
        measures = {
            "blind_agree_prediction": blind_hit,
            "assisted_agree_prediction": assisted_hit,
            "toward_prediction": assisted_hit.where(blind_hit == 0),
            "away_from_prediction": (1 - assisted_hit).where(blind_hit == 1),
            "blind_agree_consensus": _same(sub["blind_value"], sub["consensus"]),
            "assisted_agree_consensus": _same(sub["assisted_value"], sub["consensus"]),
        }
        groups = pd.Index(pd.unique(sub["image"]))
        weights = bootstrap_draws(len(groups), n_boot, rng) if n_boot > 0 else None
        row: dict[str, object] = {"label_key": key, "n_pairs": len(sub), "n_images": len(groups)}
        for name, hits in measures.items():
            s, n = _group_sums(hits, sub["image"], groups)
            row[f"n_{name}"] = int(n.sum())
            row[name], row[f"{name}_low"], row[f"{name}_high"] = _rate(s, n, weights, level)
        rows.append(row)
    columns = ["label_key", "n_pairs", "n_images"]
    columns += [c for m in PAIR_MEASURES for c in (f"n_{m}", m, f"{m}_low", f"{m}_high")]
    return pd.DataFrame(rows, columns=columns)
