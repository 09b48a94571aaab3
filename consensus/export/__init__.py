"""Study export: the consensus with its posteriors, every rater's labels, reliability, agreement.

Everything comes from one stored consensus run (the latest ``bcc.xml`` one by default), so every
exported number traces back to the run's parameters and to the answers it saw (``data_hash``). A
``lesion.xml`` run (the lesion pair's reference) exports the same way: the HAM10000 diagnosis with its
seven posteriors, every rater's choice and outline, one-vs-rest reliability per class, agreement on the
diagnosis, and the STAPLE outline's summary (posterior and area). AI exposure: per label, how often
readers agree with the pre-annotation and with the consensus, for reads that started from a prediction
and reads that did not (:mod:`consensus.exposure`), and a reader's blind and AI-assisted reads of the
same image side by side (a blind-first study in two Label Studio projects). Formats: a folder of CSV
files, one JSON document, and a self-contained HTML report with plots.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from consensus.adaptive import StoppingRule, assign_reads, next_reads
from consensus.agreement import fleiss_kappa, krippendorff_alpha, pairwise_cohen_kappa, percent_agreement
from consensus.agreement import rater_vs_consensus as rater_vs_consensus_table
from consensus.export.html import render, table_html, with_interval
from consensus.export.raters import PAGES, Overlay, page_name, shrink, write_rater_pages
from consensus.export.tables import (
    disagreements,
    gold_counts_table,
    gold_summary,
    gradcam_table,
    rater_models,
    rater_vs_gold,
    region_summary,
)
from consensus.exposure import exposure, pair_summary, paired_reads, prepare_reads
from consensus.models import ConsensusRun, Item, ModelOutput, ModelVersion, Rater, RaterReliability, RunKind
from consensus.region_export import region_masks, region_reliability, region_table
from consensus.regions import REGION_PREFIX, MaskDecoder, rater_pattern_masks
from consensus.repository import (
    ANSWER_COLUMNS,
    HAM_KEY,
    RELIABILITY_COLUMNS,
    answers,
    answers_hash,
    consensus_masks,
    consensus_probabilities,
    consensus_table,
    latest_run,
    lesion_answers,
)
from consensus.repository.exposure import exposure_reads
from consensus.repository.gold import gold_table
from consensus.repository.regions import pattern_region_answers
from labeling_config import (
    BCC_PATTERNS,
    DIAGNOSIS_KEY,
    EXCLUSION_PATTERN,
    HAM_CLASSES,
    PATTERN_KEYS,
    TARGETS,
    bcc_consistent,
)

logger = logging.getLogger(__name__)

FORMATS = ("csv", "json", "report")

#: Labels with more than two classes, and their classes (every other label is binary, or a region).
MULTICLASS: dict[str, tuple[str, ...]] = {HAM_KEY: HAM_CLASSES}


@dataclass
class Study:
    """A consensus run laid out for a study.

    Attributes:
        run: the run's id, kind, method, parameters, convergence, counts, data hash and time.
        consensus: one row per image: each label's consensus (0/1) and ``<label>_posterior``, and the
            criterion columns ``criterion_bcc`` (the consensus patterns are BCC-consistent) and
            ``criterion_agrees`` (that equals the consensus diagnosis). A multiclass label (the HAM10000
            diagnosis) gives its class, ``<label>_posterior`` (that class's) and ``<label>_p_<class>``
            per class; a region label (the lesion outline) ``<label>`` (1: the consensus mask has a
            pixel), ``<label>_posterior`` (the mean foreground posterior over the mask) and
            ``<label>_area`` (the mask's share of the image).
        ratings: one row per image, one column ``<rater>:<label>`` per rater and label (for a region
            label: 1 where the rater drew one).
        reliability: per label and rater: sensitivity / specificity with 95% intervals.
        agreement: per label: items, percent agreement, Fleiss' kappa, Krippendorff's alpha.
        pairwise: per label and rater pair: Cohen's kappa and percent agreement.
        vs_consensus: per label and rater: kappa and percent agreement with the consensus.
        answers_changed: the store's answers differ from the ones the run saw.
        models: per model version and output: status (promoted, ...), release, and where the output
            comes from (validated on real images with its figure and data, unvalidated, synthetic,
            untrained); only validated outputs are pre-annotated for the dermatologists.
        exposure: per label and arm (assisted, unassisted, their difference): agreement with the
            pre-annotation and with the consensus, with 95% intervals (:func:`consensus.exposure.exposure`).
        paired: per rater, image and label: the blind read, the AI-assisted read, the pre-annotation and
            the consensus (:func:`consensus.exposure.paired_reads`).
        pair_summary: per label, over the complete pairs: agreement of each read with the pre-annotation
            and the consensus, and how often the assisted read moved toward (or away from) the
            pre-annotation, with 95% intervals (:func:`consensus.exposure.pair_summary`).
        exposure_summary: counts of reads by exposure, of assisted reads whose prediction's labels are
            not stored, of pairs, and the model versions the readers saw.
        regions: per image and pattern with a region consensus (``region:<pattern>`` keys, which stay
            out of ``consensus`` and ``reliability``): :func:`consensus.region_export.region_table`.
        region_reliability: per pattern and rater: the pixel-pooled region sensitivity / specificity.
        gold: the store's gold labels of the run's labels (:func:`consensus.repository.gold.gold_table`).
        gold_summary: what the run held as gold (n, by label and source, conflicts) and what the store
            holds now (:func:`consensus.export.tables.gold_summary`).
        rater_vs_gold: per label and reader: sensitivity, specificity and agreement against the gold
            labels on the gold items only, with Wilson intervals
            (:func:`consensus.export.tables.rater_vs_gold`).
        rater_models: per label and candidate rater model: held-out log-likelihood per answer, the
            standard error of the difference to the chosen one (empty for a fixed estimator).
        rater_model_criteria: per label, the selection criterion's wording.
        readers: per reader: images read, answers, answers that differ from the consensus, page file.
        disagreements: every answer that differs from the consensus (rater, image, label, both values).
        overlays: per (image, pattern) of a disagreement: the consensus region and the readers' painted
            regions at thumbnail size.
        images: image id -> the store's image (path or URL) of each item.
    """

    run: dict[str, Any]
    consensus: pd.DataFrame
    ratings: pd.DataFrame
    reliability: pd.DataFrame
    agreement: pd.DataFrame
    pairwise: pd.DataFrame
    vs_consensus: pd.DataFrame
    answers_changed: bool = False
    notes: list[str] = field(default_factory=list)
    models: pd.DataFrame = field(default_factory=pd.DataFrame)
    exposure: pd.DataFrame = field(default_factory=pd.DataFrame)
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)
    pair_summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    exposure_summary: dict[str, Any] = field(default_factory=dict)
    regions: pd.DataFrame = field(default_factory=pd.DataFrame)
    region_reliability: pd.DataFrame = field(default_factory=pd.DataFrame)
    gold: pd.DataFrame = field(default_factory=pd.DataFrame)
    gold_summary: dict[str, Any] = field(default_factory=dict)
    rater_vs_gold: pd.DataFrame = field(default_factory=pd.DataFrame)
    rater_models: pd.DataFrame = field(default_factory=pd.DataFrame)
    rater_model_criteria: dict[str, str] = field(default_factory=dict)
    readers: pd.DataFrame = field(default_factory=pd.DataFrame)
    disagreements: pd.DataFrame = field(default_factory=pd.DataFrame)
    overlays: dict[tuple[str, str], Overlay] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)


def _run_dict(run: ConsensusRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "kind": run.kind.value,
        "created_at": run.created_at.isoformat(),
        "method": run.method,
        "params": run.params,
        "convergence": run.convergence,
        "n_items": run.n_items,
        "n_raters": run.n_raters,
        "n_answers": run.n_answers,
        "data_hash": run.data_hash,
    }


def _run_answers(session: Session, run: ConsensusRun, keys: list[str]) -> tuple[pd.DataFrame, str]:
    """The store's current answers in the run's terms (``task, worker, label_key, value``) and their hash."""
    if run.kind is RunKind.LESION:
        table = lesion_answers(session)[list(ANSWER_COLUMNS)]
        digest = answers_hash(table)
        # An outline's value is a digest of the stored region: the rater columns show that one was drawn.
        outline = table["label_key"] != HAM_KEY
        return table.assign(value=table["value"].where(~outline, 1)).drop_duplicates(), digest
    table = answers(session, keys)
    return table, answers_hash(table)


def build_study(
    session: Session,
    run_id: int | None = None,
    kind: RunKind = RunKind.BCC,
    decode: MaskDecoder | None = None,
) -> Study:
    """Lay out a stored run (default: the latest of ``kind``) for export.

    Args:
        session: the open session.
        run_id: the run; default the latest of ``kind``.
        kind: which latest run.
        decode: a stored painted region -> boolean mask (the backend's Label Studio RLE decoder); with
            it, the readers' pages show each reader's own region on the images they disagreed on.

    Raises:
        ValueError: no consensus run in the store, or no run with that id.
    """
    if run_id is None:
        run = latest_run(session, kind)
        if run is None and kind is RunKind.LESION:
            raise ValueError(
                "no lesion consensus run in the store: it is built when the lesion pair retrains"
            )
        if run is None:
            raise ValueError("no consensus run in the store: run `dermassist consensus run` first")
    else:
        run = session.get(ConsensusRun, run_id)
        if run is None:
            raise ValueError(f"no consensus run with id {run_id}")
    long = consensus_table(session, run)
    # The pattern regions (``region:<pattern>``) have their own tables, not consensus.csv's columns.
    long = long[~long["label_key"].str.startswith(REGION_PREFIX)]
    keys = [k for k in TARGETS if k in set(long["label_key"])] + sorted(set(long["label_key"]) - set(TARGETS))
    values = long.pivot(index="task", columns="label_key", values="value")[keys]
    posteriors = long.pivot(index="task", columns="label_key", values="posterior")[keys]
    consensus = pd.DataFrame(index=values.index)
    masked: set[str] = set()  # region labels: their agreement is not a kappa's business
    for key in keys:
        value = pd.Series(values[key])
        if key in MULTICLASS:
            consensus[key] = value
            consensus[f"{key}_posterior"] = posteriors[key]
            probabilities = consensus_probabilities(session, run, key).reindex(columns=list(MULTICLASS[key]))
            for cls in MULTICLASS[key]:
                consensus[f"{key}_p_{cls}"] = probabilities[cls].reindex(consensus.index)
            continue
        consensus[key] = pd.to_numeric(value, errors="coerce").astype("Int64")
        # The posterior of the positive class, whichever class won.
        consensus[f"{key}_posterior"] = np.where(value == "1", posteriors[key], 1 - posteriors[key])
        masks = consensus_masks(session, run, key)
        if masks:
            masked.add(key)
            area = pd.Series({task: float(mask.mean()) for task, mask in masks.items()}, dtype=float)
            consensus[f"{key}_area"] = area.reindex(consensus.index)
    if set(PATTERN_KEYS) <= set(keys) and DIAGNOSIS_KEY in keys:
        present = consensus[list(PATTERN_KEYS)].fillna(0).astype(int)
        consensus["criterion_bcc"] = [
            bcc_consistent({str(k): v for k, v in row.items()}) for row in present.to_dict("records")
        ]
        consensus["criterion_agrees"] = consensus["criterion_bcc"].astype(int) == consensus[
            DIAGNOSIS_KEY
        ].fillna(-1)
    consensus.index.name = "image_id"

    table, digest = _run_answers(session, run, keys)
    changed = digest != run.data_hash
    notes = []
    if changed:
        notes.append(
            f"the store's answers changed after run {run.id}: rater columns and agreement show the current "
            "answers, the consensus and reliability those of the run; run the consensus again to align them"
        )
    ratings = table.assign(column=table["worker"] + ":" + table["label_key"]).pivot(
        index="task", columns="column", values="value"
    )
    ratings.index.name = "image_id"

    agreement_rows, pairwise_frames, versus_frames = [], [], []
    for key in keys:
        data = table[table["label_key"] == key].rename(columns={"value": "label"})[
            ["task", "worker", "label"]
        ]
        if data.empty or key in masked:
            continue
        classes: list[Any] = list(MULTICLASS.get(key, [0, 1]))
        agreement_rows.append({
            "label_key": key,
            "n_items": int(data["task"].nunique()),
            "n_answers": len(data),
            "percent_agreement": _maybe(percent_agreement, data, classes),
            "fleiss_kappa": _maybe(fleiss_kappa, data, classes),
            "krippendorff_alpha": _maybe(krippendorff_alpha, data, classes),
        })  # fmt: skip
        pairwise_frames.append(pairwise_cohen_kappa(data, classes).assign(label_key=key))
        reference = pd.Series(consensus[key]).dropna()
        reference = reference if key in MULTICLASS else reference.astype(int)
        versus_frames.append(rater_vs_consensus_table(data, reference, classes).assign(label_key=key))

    rel_rows = session.execute(
        select(RaterReliability, Rater.name)
        .join(Rater, RaterReliability.rater_id == Rater.id)
        .where(RaterReliability.run_id == run.id, ~RaterReliability.label_key.startswith(REGION_PREFIX))
        .order_by(RaterReliability.label_key, Rater.name)
    ).all()
    reliability = pd.DataFrame(
        [
            {
                "label_key": r.label_key,
                "rater": name,
                **{c: getattr(r, c) for c in RELIABILITY_COLUMNS},
                "n_items": r.n_items,
            }
            for r, name in rel_rows
        ]
    )

    def stack(frames: list[pd.DataFrame]) -> pd.DataFrame:
        if not frames:
            return pd.DataFrame()
        out = pd.concat(frames, ignore_index=True)
        return out[["label_key", *[c for c in out.columns if c != "label_key"]]]

    exposure_table, paired, summary = ai_exposure(session, consensus, keys)
    gold, conflicts = gold_table(session, [k for k in keys if k not in masked])
    models_table, criteria = rater_models(run.convergence or {})
    differ = disagreements(table, consensus, [k for k in keys if k not in masked])
    return Study(
        regions=region_table(session, run),
        region_reliability=region_reliability(session, run),
        gold=gold,
        gold_summary=gold_summary(_run_dict(run), gold, conflicts),
        rater_vs_gold=rater_vs_gold(table, gold),
        rater_models=models_table,
        rater_model_criteria=criteria,
        readers=_readers(table, differ),
        disagreements=differ,
        overlays=_overlays(session, run, differ, decode),
        images={
            e: i
            for e, i in session.execute(select(Item.external_id, Item.image).order_by(Item.external_id))
            if i
        },
        exposure=exposure_table,
        paired=paired,
        pair_summary=pair_summary(paired),
        exposure_summary=summary,
        models=model_outputs(session),
        run=_run_dict(run),
        consensus=consensus,
        ratings=ratings,
        reliability=reliability,
        agreement=pd.DataFrame(agreement_rows),
        pairwise=stack(pairwise_frames),
        vs_consensus=stack(versus_frames),
        answers_changed=changed,
        notes=notes,
    )


def _readers(table: pd.DataFrame, differ: pd.DataFrame) -> pd.DataFrame:
    """Per reader (sorted): images read, answers, answers that differ from the consensus, page file."""
    if table.empty:
        return pd.DataFrame(columns=["rater", "images", "answers", "disagreements", "page"])
    grouped = table.groupby("worker", sort=True).agg(images=("task", "nunique"), answers=("task", "size"))
    counts = differ.groupby("rater").size() if not differ.empty else pd.Series(dtype=int)
    grouped["disagreements"] = counts.reindex(grouped.index).fillna(0).astype(int)
    grouped["page"] = [f"{PAGES}/{page_name(str(r))}" for r in grouped.index]
    return grouped.rename_axis("rater").reset_index()


def _overlays(
    session: Session, run: ConsensusRun, differ: pd.DataFrame, decode: MaskDecoder | None
) -> dict[tuple[str, str], Overlay]:
    """The regions, at thumbnail size, of each (image, pattern) some reader disagreed on: the run's
    consensus region, and with ``decode`` every reader's painted one."""
    wanted = {
        (i, k) for i, k in zip(differ["image_id"], differ["label_key"], strict=True) if k in PATTERN_KEYS
    }
    if not wanted:
        return {}
    out: dict[tuple[str, str], Overlay] = {}
    for image, by_pattern in region_masks(session, run).items():
        for pattern, mask in by_pattern.items():
            if (image, pattern) in wanted:
                out[(image, pattern)] = Overlay(consensus=shrink(mask))
    if decode is not None:
        patterns = sorted({k for _, k in wanted})
        answered = pattern_region_answers(session, patterns)
        # Decode only the regions of the pairs shown (a study's other strokes need not be read).
        shown = [(t, k) in wanted for t, k in zip(answered["task"], answered["label_key"], strict=True)]
        painted, _ = rater_pattern_masks(answered[shown], decode)
        for pair, per_rater in painted.items():
            if pair not in wanted:
                continue
            overlay = out.setdefault(pair, Overlay())
            overlay.raters = {w: shrink(m) for w, m in per_rater if m is not None}
    return out


def ai_exposure(
    session: Session, consensus: pd.DataFrame, keys: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The exposure table, the paired reads and their counts, for the run's labels that readers answer
    with a value (the targets, the HAM10000 diagnosis; not the outlines)."""
    labels = [k for k in keys if k in TARGETS or k == HAM_KEY]
    reads = prepare_reads(exposure_reads(session, labels))
    paired = paired_reads(reads, consensus)
    per_read = reads.drop_duplicates(["rater", "item"])
    assisted = per_read[per_read["assisted"]]
    lacking = reads[reads["assisted"] & reads["shown"].isna()].drop_duplicates(["rater", "item"])
    summary = {
        "reads": len(per_read),
        "assisted": len(assisted),
        "unassisted": int((~per_read["assisted"]).sum()),
        "blind": int(per_read["blind"].sum()),
        "assisted_without_prediction_labels": len(lacking),
        "model_versions": sorted(str(v) for v in assisted["model_version"].dropna().unique()),
        "pairs": len(paired.loc[paired["paired"], ["rater", "image"]].drop_duplicates()),
    }
    return exposure(reads, consensus, labels), paired, summary


def model_outputs(session: Session) -> pd.DataFrame:
    """Every model version's outputs and their provenance, served version first."""
    rows = session.execute(
        select(ModelVersion, ModelOutput)
        .join(ModelOutput, ModelOutput.model_version_id == ModelVersion.id)
        .order_by(ModelVersion.id, ModelOutput.id)
    ).all()
    frame = pd.DataFrame(
        [
            {
                "version": v.version,
                "status": v.status.value,
                "release": v.release or "",
                "output": o.output,
                "provenance": o.status,
                "figure": "" if o.value is None else f"{o.metric} {o.value:.3f}",
                "positives": o.n_positive,
                "images": o.n_images,
                "data": o.data or "",
            }
            for v, o in rows
        ]
    )
    if frame.empty:
        return frame
    return frame.sort_values("status", key=lambda c: c != "promoted", kind="stable").reset_index(drop=True)


def _maybe(statistic: Any, data: pd.DataFrame, classes: list[int]) -> float:
    """A statistic, or NaN where the data cannot give it (e.g. no item with two ratings)."""
    try:
        return float(statistic(data, classes))
    except ValueError as exc:
        logger.info("%s not computed: %s", statistic.__name__, exc)
        return float("nan")


def write_csv(study: Study, out: str | Path) -> list[Path]:
    """Write the study as CSV files into the folder ``out``; returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "consensus.csv": study.consensus.join(study.ratings, how="outer"),
        "rater_reliability.csv": study.reliability,
        "agreement.csv": study.agreement,
        "pairwise_kappa.csv": study.pairwise,
        "rater_vs_consensus.csv": study.vs_consensus,
        "exposure.csv": study.exposure,
        "paired_reads.csv": study.paired,
        "paired_summary.csv": study.pair_summary,
    }
    # Written where the run has them: pattern regions, gold labels, a rater model chosen per label.
    optional = {
        "region_consensus.csv": study.regions,
        "region_reliability.csv": study.region_reliability,
        "gold_labels.csv": study.gold,
        "rater_vs_gold.csv": study.rater_vs_gold,
        "rater_models.csv": study.rater_models,
    }
    files.update({name: frame for name, frame in optional.items() if not frame.empty})
    written = []
    for name, frame in files.items():
        path = folder / name
        frame.to_csv(path, index=name == "consensus.csv", lineterminator="\n")
        written.append(path)
    run_file = folder / "run.json"
    run_file.write_text(
        json.dumps({**study.run, "notes": study.notes, "gold": study.gold_summary}, indent=2) + "\n",
        encoding="utf-8",
    )
    return [*written, run_file]


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    clean = frame.astype(object).where(frame.notna(), None)
    return [{str(k): v for k, v in r.items()} for r in clean.to_dict("records")]


def to_json(study: Study) -> dict[str, Any]:
    """The study as one JSON-able document."""
    consensus = study.consensus.join(study.ratings, how="outer").reset_index()
    return {
        "run": study.run,
        "notes": study.notes,
        "images": _records(consensus),
        "rater_reliability": _records(study.reliability),
        "agreement": _records(study.agreement),
        "pairwise_kappa": _records(study.pairwise),
        "rater_vs_consensus": _records(study.vs_consensus),
        "gold": {**study.gold_summary, "labels": _records(study.gold)},
        "rater_vs_gold": _records(study.rater_vs_gold),
        "rater_models": _records(study.rater_models),
        "regions": _records(study.regions),
        "region_reliability": _records(study.region_reliability),
        "disagreements": _records(study.disagreements),
        "exposure": {
            **study.exposure_summary,
            "by_label": _records(study.exposure),
            "pairs_by_label": _records(study.pair_summary),
            "paired_reads": _records(study.paired),
        },
    }


def write_json(study: Study, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(study), indent=2, default=str) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _reliability_plot(study: Study) -> str | None:
    import matplotlib.pyplot as plt

    rel = study.reliability
    if rel.empty:
        return None
    present = set(rel["label_key"])
    keys = [k for k in TARGETS if k in present] + sorted(present - set(TARGETS))
    raters = sorted(rel["rater"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(keys) * len(raters) / 2 + 2.5), sharey=True)
    for ax, what in zip(axes, ("sensitivity", "specificity"), strict=True):
        y = 0.0
        ticks, names = [], []
        for key in keys:
            for j, rater in enumerate(raters):
                row = rel[(rel["label_key"] == key) & (rel["rater"] == rater)]
                if row.empty:
                    continue
                r = row.iloc[0]
                # A rate without an interval (a pixel-pooled STAPLE rate) is drawn as a point.
                # The point estimate can lie just outside its interval (1.0 beside a Beta upper bound of
                # 0.999 where a rater never erred): draw the bar to the interval, never a negative one.
                below, above = np.clip(
                    np.nan_to_num([r[what] - r[f"{what}_low"], r[f"{what}_high"] - r[what]]), 0, None
                )
                ax.errorbar(r[what], y, xerr=[[below], [above]], fmt="o", color=f"C{j}",
                            label=rater if y < len(raters) else None, ms=4)  # fmt: skip
                y += 1
            ticks.append(y - len(raters) / 2 - 0.5)
            names.append(key)
            y += 1
        ax.set_yticks(ticks, names)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.02)
        ax.set_title(f"{what} with 95% interval")
        ax.grid(axis="x", alpha=0.3)
    axes[1].legend(loc="lower left", fontsize=8)
    return _png(fig)


def _agreement_plot(study: Study) -> str | None:
    import matplotlib.pyplot as plt

    pw = study.pairwise
    if pw.empty:
        return None
    key = DIAGNOSIS_KEY if DIAGNOSIS_KEY in set(pw["label_key"]) else pw["label_key"].iloc[0]
    sub = pw[pw["label_key"] == key]
    raters = sorted(set(sub["worker_a"]) | set(sub["worker_b"]))
    position = {name: i for i, name in enumerate(raters)}
    kappa = np.eye(len(raters))
    for a, b, k in zip(sub["worker_a"], sub["worker_b"], sub["kappa"], strict=True):
        kappa[position[a], position[b]] = kappa[position[b], position[a]] = k
    matrix = pd.DataFrame(kappa, index=raters, columns=raters)
    fig, ax = plt.subplots(figsize=(1.1 * len(raters) + 2, 1.1 * len(raters) + 1))
    image = ax.imshow(matrix.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis")
    for (a, b), v in np.ndenumerate(matrix.to_numpy(dtype=float)):
        ax.text(b, a, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w", fontsize=9)
    ax.set_xticks(range(len(raters)), raters, rotation=45)
    ax.set_yticks(range(len(raters)), raters)
    ax.set_title(f"Cohen's kappa between raters: {key}")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def _prevalence_plot(study: Study) -> str | None:
    import matplotlib.pyplot as plt

    keys = [k for k in TARGETS if k in study.consensus.columns]
    share = [float(study.consensus[k].astype(float).mean()) for k in keys]
    colors = ["black"] + ["C0"] * (len(keys) - 1)
    for key, classes in MULTICLASS.items():  # one bar per class
        if key in study.consensus.columns:
            found = study.consensus[key].dropna()
            keys += [f"{key}: {c}" for c in classes]
            share += [float((found == c).mean()) if len(found) else 0.0 for c in classes]
            colors += ["C1"] * len(classes)
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(range(len(keys)), share, color=colors)
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right")
    ax.set_ylabel("share of images")
    ax.set_title("Prevalence in the consensus")
    return _png(fig)


def calibration(study: Study, truth: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Posterior vs observed frequency against known truth (index image_id, columns labels), pooled."""
    rows = []
    for key in [k for k in TARGETS if k in study.consensus.columns and k in truth.columns]:
        joined = study.consensus[[f"{key}_posterior"]].join(truth[[key]], how="inner").dropna()
        rows.append(pd.DataFrame({"p": joined[f"{key}_posterior"], "y": joined[key].astype(float)}))
    if not rows:
        return pd.DataFrame(columns=["bin", "mean_posterior", "observed", "n"])
    data = pd.concat(rows)
    data["bin"] = np.clip((data["p"] * bins).astype(int), 0, bins - 1)
    grouped = data.groupby("bin").agg(mean_posterior=("p", "mean"), observed=("y", "mean"), n=("y", "size"))
    return grouped.reset_index()


def _calibration_plot(table: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.plot(table["mean_posterior"], table["observed"], "o-")
    for r in table.itertuples():
        ax.annotate(
            str(r.n), (r.mean_posterior, r.observed), fontsize=7, xytext=(3, -8), textcoords="offset points"
        )
    ax.set(
        xlabel="consensus posterior", ylabel="share truly positive", title="Posterior calibration (vs truth)"
    )
    return _png(fig)


def write_report(
    study: Study,
    path: str | Path,
    truth: pd.DataFrame | None = None,
    gradcam: pd.DataFrame | None = None,
    images: Mapping[str, str | Path] | None = None,
    rater_pages: bool = True,
    reads_rule: StoppingRule | None = None,
) -> Path:
    """A self-contained HTML page: the run, agreement, reliability against each reference, the rater
    model chosen per label, gold, regions, criterion consistency, AI exposure, plots, and an index of the
    readers' pages.

    Args:
        study: from :func:`build_study`.
        path: the HTML file to write.
        truth: optional known truth (index image_id, columns labels; e.g. a synthetic labels.csv) for
            a calibration curve of the posteriors.
        gradcam: optional Grad-CAM agreement summary (``dermassist consensus gradcam-agreement``'s CSV)
            for the regions section.
        images: image id -> local image file for the readers' pages' thumbnails (default the store's).
        rater_pages: also write one page per reader into ``raters/`` beside the report
            (:func:`consensus.export.raters.write_rater_pages`), which the report's index links to.
        reads_rule: the adaptive-reads section's stopping rule (default :class:`StoppingRule`).
    """
    import matplotlib

    matplotlib.use("Agg")
    figures = [f for f in (_reliability_plot(study), _agreement_plot(study), _prevalence_plot(study)) if f]
    calibration_html = None
    if truth is not None:
        table = calibration(study, truth)
        if not table.empty:
            figures.append(_calibration_plot(table))
            calibration_html = table_html(table)
    criterion = None
    if "criterion_agrees" in study.consensus.columns:
        agrees = study.consensus["criterion_agrees"]
        by_dx = study.consensus.groupby(DIAGNOSIS_KEY)["criterion_agrees"].mean()
        criterion = {
            "patterns": ", ".join(BCC_PATTERNS),
            "exclusion": EXCLUSION_PATTERN,
            "all": f"{agrees.mean():.1%}",
            "n": len(agrees),
            "bcc": f"{by_dx.get(1, float('nan')):.1%}",
            "non_bcc": f"{by_dx.get(0, float('nan')):.1%}",
        }
    if rater_pages:
        write_rater_pages(study, Path(path).parent / PAGES, images)
    page = render(
        "report.html",
        rater_model=_rater_model_section(study),
        gold=_gold_section(study),
        adaptive=adaptive_section(study, reads_rule),
        regions=_regions_section(study, gradcam),
        readers=study.readers.to_dict("records") if rater_pages else [],
        run=study.run,
        params=json.dumps(study.run["params"]),
        notes=study.notes,
        agreement=Markup(table_html(study.agreement)),
        criterion=criterion,
        reliability=Markup(table_html(study.reliability)),
        reliability_reference=_consensus_reference(study),
        vs_consensus=Markup(table_html(study.vs_consensus)),
        calibration=Markup(calibration_html) if calibration_html else None,
        models=Markup(table_html(study.models)) if not study.models.empty else None,
        exposure=study.exposure_summary,
        exposure_table=Markup(table_html(study.exposure)),
        pairs_table=Markup(table_html(study.pair_summary)),
        figures=figures,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _consensus_reference(study: Study) -> str:
    """How the report names the consensus reference of the run's reliability."""
    if study.gold_summary.get("run", {}).get("used"):
        return "consensus (Dawid-Skene, with the gold items held at their gold class)"
    return "consensus (Dawid-Skene)"


def _rater_model_section(study: Study) -> dict[str, Any]:
    """The rater model per label: a wide table of the candidates' held-out log-likelihoods, the criteria,
    and the labels fitted by a fixed estimator."""
    convergence = study.run.get("convergence") or {}
    # The Dawid-Skene labels fitted without a choice (STAPLE's region entries have no log-likelihood).
    fixed = [
        str(k)
        for k, entry in convergence.items()
        if isinstance(entry, Mapping) and "log_likelihood" in entry and k not in study.rater_model_criteria
    ]
    table = study.rater_models
    wide = pd.DataFrame()
    if not table.empty:
        rows = []
        for key, group in table.groupby("label_key", sort=False):
            row: dict[str, Any] = {"label": key, "chosen": group.loc[group["chosen"], "candidate"].iloc[0]}
            for r in group.to_dict("records"):
                score = f"{r['heldout_loglik_per_answer']:.4f}"
                se = r["se_of_difference_to_choice"]
                row[r["candidate"]] = f"{score} (chosen)" if r["chosen"] else f"{score} (SE {se:.4f})"
            rows.append(row)
        wide = pd.DataFrame(rows)
    method = str(study.run.get("method", "")).removesuffix("+STAPLE")
    return {
        "table": Markup(table_html(wide)) if not wide.empty else None,
        "criteria": sorted(set(study.rater_model_criteria.values())),
        "fixed": fixed,
        "method": method,
    }


def adaptive_section(
    study: Study, rule: StoppingRule | None = None, shown: int = 50
) -> dict[str, Any] | None:
    """The adaptive-reads queue of the diagnosis (:mod:`consensus.adaptive`): the images whose consensus
    is not yet sure or that have too few reads, each with the reader to ask next (the least loaded of
    those who have not read it, the most reliable first). None without a BCC consensus."""
    rule = rule if rule is not None else StoppingRule()
    column = f"{DIAGNOSIS_KEY}_posterior"
    if column not in study.consensus.columns or study.ratings.empty:
        return None
    p = pd.to_numeric(study.consensus[column], errors="coerce").dropna().astype(float)
    probas = pd.DataFrame({0: 1.0 - p, 1: p})
    reads = [c for c in study.ratings.columns if str(c).endswith(f":{DIAGNOSIS_KEY}")]
    wide = study.ratings[reads].copy()
    wide.columns = pd.Index([str(c).rsplit(":", 1)[0] for c in reads])
    answers = (
        wide.rename_axis("task")
        .reset_index()
        .melt(id_vars="task", var_name="worker", value_name="label")
        .dropna(subset=["label"])
    )
    rel = study.reliability
    rel = rel[rel["label_key"] == DIAGNOSIS_KEY] if not rel.empty else rel
    readers = (
        rel.set_index("rater")[["sensitivity", "specificity"]].mean(axis=1)
        if not rel.empty
        else pd.Series(dtype=float)
    )
    queue = assign_reads(next_reads(probas, answers, readers, rule))
    per_reader = queue.groupby("reader").size().rename("images").reset_index() if len(queue) else queue
    return {
        "rule": f"posterior \u2265 {rule.confidence:g} after \u2265 {rule.min_reads} reads",
        "open": len(queue),
        "read": len(probas),
        "per_reader": Markup(table_html(per_reader)) if len(queue) else None,
        "queue": Markup(table_html(queue.head(shown))) if len(queue) else None,
        "more": max(0, len(queue) - shown),
        "table": queue,
    }


def _gold_section(study: Study) -> dict[str, Any]:
    """What the run held as gold, and the readers against it."""
    summary = study.gold_summary or {"run": {"n": 0}, "store": {"n": 0}}
    versus = study.rater_vs_gold
    shown = pd.DataFrame()
    if not versus.empty:
        intervals = {
            rate: [
                with_interval(*v)
                for v in zip(versus[rate], versus[f"{rate}_low"], versus[f"{rate}_high"], strict=True)
            ]
            for rate in ("sensitivity", "specificity", "agreement")
        }
        shown = pd.DataFrame({
            "label": versus["label_key"], "rater": versus["rater"], "reference": versus["reference"],
            "n": versus["n_items"], "gold +": versus["n_positive"], "gold -": versus["n_negative"],
            **intervals,
        })  # fmt: skip
    return {
        "run": summary["run"],
        "store": summary["store"],
        "changed": summary["run"].get("n") != summary["store"].get("n"),
        "counts": Markup(table_html(gold_counts_table(summary))) if summary["run"].get("n") else None,
        "versus": Markup(table_html(shown)) if not shown.empty else None,
    }


GRADCAM_CAPTION = "regions of patterns the consensus says are present; IoU at \u2265 0.5 of the map's maximum"


def _regions_section(study: Study, gradcam: pd.DataFrame | None) -> dict[str, Any]:
    """The pattern regions: per pattern, per pattern and rater, and the Grad-CAM agreement when given."""
    return {
        "any": not study.regions.empty,
        "summary": Markup(table_html(region_summary(study.regions))),
        "reliability": Markup(table_html(study.region_reliability)),
        "gradcam": Markup(table_html(gradcam_table(gradcam))) if gradcam is not None else None,
        "caption": GRADCAM_CAPTION,
    }
