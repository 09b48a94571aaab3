"""The study's tables beside the consensus: gold labels and the readers against them, the rater model
chosen per label, the regions' summary, and each reader's disagreements with the consensus.

Readers' sensitivity and specificity are stated against one named reference at a time: the gold labels
(an adjudicator's reading, histopathology) on the gold items only (:func:`rater_vs_gold`, each row's
``reference`` says ``gold (n items)``), or the Dawid-Skene consensus (the run's reliability). They are
never pooled into one figure.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import pandas as pd

from consensus.export.html import with_interval
from consensus.exposure import wilson_interval
from consensus.repository.gold import gold_counts
from labeling_config import PATTERN_KEYS

#: Columns of :func:`rater_vs_gold`.
VS_GOLD_COLUMNS: tuple[str, ...] = (
    "label_key",
    "rater",
    "reference",
    "n_items",
    "n_positive",
    "n_negative",
    *(
        f"{rate}{end}"
        for rate in ("sensitivity", "specificity", "agreement")
        for end in ("", "_low", "_high")
    ),
)
#: Columns of :func:`rater_models`.
RATER_MODEL_COLUMNS: tuple[str, ...] = (
    "label_key",
    "candidate",
    "chosen",
    "heldout_loglik_per_answer",
    "se_of_difference_to_choice",
)
#: Columns of :func:`disagreements`.
DISAGREEMENT_COLUMNS: tuple[str, ...] = (
    "rater",
    "image_id",
    "label_key",
    "rater_value",
    "consensus",
    "posterior",
)


def _rate(hits: int, n: int) -> tuple[float, float, float]:
    """A proportion with its Wilson 95% interval; NaN for none observed."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = hits / n
    low, high = wilson_interval(p, n)
    return p, low, high


def gold_reference(n_items: int) -> str:
    """How a table names the gold reference of one label."""
    return f"gold ({n_items} items)"


def rater_vs_gold(table: pd.DataFrame, gold: pd.DataFrame) -> pd.DataFrame:
    """Each reader against the gold labels, on the gold items only.

    Args:
        table: the answers, ``task, worker, label_key, value``.
        gold: :func:`consensus.repository.gold.gold_table`'s table (``task, label_key, value, ...``).

    Returns:
        One row per label and reader who read a gold item (:data:`VS_GOLD_COLUMNS`): sensitivity
        (of the gold positives, the share the reader called positive), specificity and agreement with
        Wilson 95% intervals; a multiclass label (the HAM10000 diagnosis) gives agreement only.
        ``reference`` names the gold and its number of items for the label.

    Examples:
        >>> answers = pd.DataFrame({"task": ["a", "b", "a", "b"], "worker": ["r1", "r1", "r2", "r2"],
        ...                         "label_key": "bcc", "value": [1, 0, 0, 0]})
        >>> gold = pd.DataFrame({"task": ["a", "b"], "label_key": "bcc", "value": [1, 0]})
        >>> rater_vs_gold(answers, gold)[["rater", "sensitivity", "agreement"]].values.tolist()
        [['r1', 1.0, 1.0], ['r2', 0.0, 0.5]]
    """
    if gold.empty or table.empty:
        return pd.DataFrame(columns=list(VS_GOLD_COLUMNS))
    joined = table.merge(
        gold[["task", "label_key", "value"]].rename(columns={"value": "gold"}), on=["task", "label_key"]
    )
    rows = []
    for key, by_key in joined.groupby("label_key", sort=True):
        n_gold = int(gold.loc[gold["label_key"] == key, "task"].nunique())
        binary = set(by_key["gold"]) | set(by_key["value"]) <= {0, 1}
        for worker, group in by_key.groupby("worker", sort=True):
            said, truth = group["value"].to_numpy(), group["gold"].to_numpy()
            row: dict[str, Any] = {"label_key": key, "rater": worker, "reference": gold_reference(n_gold),
                                   "n_items": len(group)}  # fmt: skip
            if binary:
                positive, negative = truth == 1, truth == 0
                row["n_positive"], row["n_negative"] = int(positive.sum()), int(negative.sum())
                for rate, hits, n in (
                    ("sensitivity", int((said[positive] == 1).sum()), int(positive.sum())),
                    ("specificity", int((said[negative] == 0).sum()), int(negative.sum())),
                ):
                    row[rate], row[f"{rate}_low"], row[f"{rate}_high"] = _rate(hits, n)
            agree = int(sum(str(a) == str(b) for a, b in zip(said, truth, strict=True)))
            row["agreement"], row["agreement_low"], row["agreement_high"] = _rate(agree, len(group))
            rows.append(row)
    frame = pd.DataFrame(rows).reindex(columns=list(VS_GOLD_COLUMNS))
    return frame.astype({"n_items": int})


def gold_summary(run: Mapping[str, Any], gold: pd.DataFrame, conflicts: int) -> dict[str, Any]:
    """What the run held as gold (``params["gold"]``: n, by label and source, conflicts) and what the store
    holds now for the run's labels (the same unless gold labels changed after the run)."""
    held = dict((run.get("params") or {}).get("gold") or {"n": 0})
    now = dict(gold_counts(gold)) if not gold.empty else {}
    return {
        "run": {"n": int(held.get("n", 0)), "by_label": held.get("by_label", {}),
                "conflicts": int(held.get("conflicts", 0)), "used": bool(held.get("n", 0))},
        "store": {"n": len(gold), "by_label": now, "conflicts": conflicts},
    }  # fmt: skip


def gold_counts_table(summary: Mapping[str, Any]) -> pd.DataFrame:
    """Per label and source: the gold labels the run held."""
    by_label: Mapping[str, Mapping[str, int]] = summary["run"]["by_label"]
    return pd.DataFrame(
        [(k, s, n) for k in sorted(by_label) for s, n in sorted(by_label[k].items())],
        columns=["label_key", "source", "gold_labels"],
    )


def rater_models(convergence: Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rater model chosen per label from a run's ``convergence``.

    Returns:
        ``(table, criteria)``: one row per label and candidate model (:data:`RATER_MODEL_COLUMNS`; the
        held-out answer log-likelihood per answer, higher is better, and the standard error of its
        difference to the chosen one's), labels in the run's order; and per label the criterion's wording.
        Labels fitted without a choice (a fixed estimator) give no rows.
    """
    rows, criteria = [], {}
    for key, entry in convergence.items():
        selection = entry.get("selection") if isinstance(entry, Mapping) else None
        if not isinstance(selection, Mapping):
            continue
        criteria[str(key)] = str(selection.get("criterion", ""))
        se = selection.get("se_vs_choice") or {}
        for candidate, score in (selection.get("scores") or {}).items():
            rows.append({
                "label_key": key, "candidate": candidate, "chosen": candidate == selection.get("choice"),
                "heldout_loglik_per_answer": score, "se_of_difference_to_choice": se.get(candidate),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=list(RATER_MODEL_COLUMNS)), criteria


def region_summary(regions: pd.DataFrame) -> pd.DataFrame:
    """Per pattern: images with a (non-empty) consensus region, their mean area share and mean posterior."""
    columns = ["pattern", "images_with_region", "mean_area", "mean_posterior"]
    found = regions[regions["area"] > 0] if not regions.empty else regions
    if found.empty:
        return pd.DataFrame(columns=columns)
    grouped = found.groupby("pattern", sort=False).agg(
        images_with_region=("image_id", "nunique"),
        mean_area=("area", "mean"),
        mean_posterior=("posterior", "mean"),
    )
    order = {k: i for i, k in enumerate(PATTERN_KEYS)}
    out = grouped.reset_index()[columns]
    return out.sort_values("pattern", key=lambda c: c.map(order).fillna(len(order)), kind="stable")


def gradcam_table(gradcam: pd.DataFrame) -> pd.DataFrame:
    """The Grad-CAM agreement summary (``dermassist consensus gradcam-agreement``) as the report shows it:
    each figure beside its 95% interval, energy inside beside the area share (its chance level)."""

    def cell(row: Mapping[Hashable, Any], figure: str) -> str:
        return with_interval(row.get(figure), row.get(f"{figure}_low"), row.get(f"{figure}_high"), 3)

    rows = [
        {
            "model_version": row.get("model_version", ""),
            "pattern": row.get("pattern", ""),
            "n_images": row.get("n_images", ""),
            "energy inside [95% CI]": cell(row, "energy_inside"),
            "area share (chance)": cell(row, "area"),
            "pointing [95% CI]": cell(row, "pointing"),
            "IoU [95% CI]": cell(row, "iou"),
            **({"intervals resample": row["resampled"]} if "resampled" in row else {}),
        }
        for row in gradcam.to_dict("records")
    ]
    return pd.DataFrame(rows)


def disagreements(table: pd.DataFrame, consensus: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Every answer that differs from the consensus (:data:`DISAGREEMENT_COLUMNS`), sorted by rater, label
    (in ``keys``' order) and image; ``posterior`` is the consensus posterior of the positive class (of
    the consensus class for a multiclass label)."""
    frames = []
    for key in keys:
        if key not in consensus.columns or f"{key}_posterior" not in consensus.columns:
            continue
        reference = consensus[[key, f"{key}_posterior"]].dropna(subset=[key])
        said = table[table["label_key"] == key]
        joined = said.merge(reference, left_on="task", right_index=True)
        differ = joined[[str(a) != str(b) for a, b in zip(joined["value"], joined[key], strict=True)]]
        frames.append(
            pd.DataFrame(
                {
                    "rater": differ["worker"],
                    "image_id": differ["task"],
                    "label_key": key,
                    "rater_value": differ["value"].astype(str),
                    "consensus": differ[key].astype(str),
                    "posterior": differ[f"{key}_posterior"].astype(float),
                }
            )
        )
    if not frames:
        return pd.DataFrame(columns=list(DISAGREEMENT_COLUMNS))
    out = pd.concat(frames, ignore_index=True)
    order = {k: i for i, k in enumerate(keys)}
    out["_order"] = out["label_key"].map(order)
    out = out.sort_values(["rater", "_order", "image_id"], kind="stable").drop(columns="_order")
    return out.reset_index(drop=True)[list(DISAGREEMENT_COLUMNS)]
