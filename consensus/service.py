"""From the store to a stored consensus: the answers, the estimators, the run saved.

This is the one place that joins the estimators (which never touch SQL) and the repository (which
never estimates); the CLI, the backend and the retraining job call it. Two kinds of run:

- :func:`run_consensus` (``bcc.xml``): one Dawid-Skene estimator per binary target (the BCC diagnosis and
  the seven patterns), the BCC model's reference; given a mask decoder, also STAPLE per image and pattern
  over the raters' painted regions (:mod:`consensus.regions`);
- :func:`run_lesion_consensus` (``lesion.xml``): Dawid-Skene over the seven-class HAM10000 diagnosis and
  STAPLE over the raters' lesion outlines of each image, the lesion pair's reference.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import stats
from sqlalchemy.orm import Session

from consensus.dawid_skene import DawidSkene, MultiLabelConsensus
from consensus.models import ConsensusRun, RunKind
from consensus.regions import (
    MaskDecoder,
    PatternRegions,
    StapleParams,
    outline_consensuses,
    pattern_region_consensuses,
)
from consensus.regions import consensus_mask as consensus_mask  # re-exported: callers found it here
from consensus.repository import (
    ANSWER_COLUMNS,
    HAM_KEY,
    answers,
    lesion_answers,
    save_consensus_run,
)
from consensus.repository.gold import gold_counts, gold_table
from consensus.repository.regions import pattern_region_answers
from consensus.selection import SelectedDawidSkene
from labeling_config import HAM_CLASSES, PATTERN_KEYS, TARGETS
from labeling_config.parse import LESION_KEY

logger = logging.getLogger(__name__)


def estimator_params(estimator: DawidSkene) -> dict[str, Any]:
    """An estimator's hyperparameters as plain JSON-able values (what a run stores)."""
    params: dict[str, Any] = {}
    for f in dataclasses.fields(estimator):
        if f.init:
            value = getattr(estimator, f.name)
            params[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return params


def selection_params(estimator: SelectedDawidSkene) -> dict[str, Any]:
    """A model-selecting estimator's settings: its folds and every candidate's class and settings."""
    candidates = estimator._candidates()
    return {
        "n_folds": estimator.n_folds,
        "random_state": estimator.random_state,
        "classes": None if estimator.classes is None else list(estimator.classes),
        "candidates": {
            name: {"method": type(c).__name__, **estimator_params(c)} for name, c in candidates.items()
        },
    }


def _gold_for(session: Session, keys: Sequence[str]) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The store's gold labels of these keys (None when there are none) and what a run records of them."""
    gold, conflicts = gold_table(session, keys)
    if gold.empty:
        return None, {"n": 0}
    sources = gold_counts(gold)
    return gold[["task", "label_key", "value"]], {"n": len(gold), "by_label": sources, "conflicts": conflicts}


def run_consensus(
    session: Session,
    estimator: DawidSkene | SelectedDawidSkene | None = None,
    label_keys: Sequence[str] = TARGETS,
    *,
    decode: MaskDecoder | None = None,
    staple_params: StapleParams | None = None,
    use_gold: bool = True,
) -> ConsensusRun:
    """Fit one estimator per label on every live answer in the store and store the run.

    With ``decode``, the patterns' painted regions are fused too: per image and pattern, STAPLE over the
    raters' masks (:func:`consensus.regions.pattern_region_consensuses`: a rater who painted gives the
    union of their regions, one who said the pattern absent an empty mask, one who said present but
    painted nothing abstains), stored as the run's masks under ``region:<pattern>`` with a summary label
    row, and per rater a pixel-pooled region sensitivity / specificity under the same key. The run's
    ``data_hash`` stays that of the answers; ``params["regions"]`` holds STAPLE's settings and the
    digest of the stored regions.

    Args:
        session: the open session (the caller commits).
        estimator: the base estimator, copied per label (default: ``SelectedDawidSkene()``, which
            chooses per label among full, one-coin and pooled-prior Dawid-Skene by held-out answer
            likelihood; the choice and the criterion go into the run's ``convergence``).
        label_keys: the labels to fit; those without any answer are skipped.
        decode: a stored region -> boolean mask (None when unreadable); None: no region consensus.
        staple_params: STAPLE's settings for the regions (default :class:`StapleParams`).
        use_gold: hold the store's gold labels (adjudications, histopathology) at their class; the
            run's ``params["gold"]`` says how many there were, by label and source.

    Returns:
        The stored run (parameters, convergence, posteriors, rater reliability, region masks).

    Raises:
        ValueError: when the store holds no answers for these labels.
    """
    table = answers(session, label_keys)
    if table.empty:
        raise ValueError(
            "the store holds no annotations: import ratings (dermassist consensus import-ratings FILE) "
            "or sync them from Label Studio first"
        )
    present = set(table["label_key"])
    keys = [k for k in label_keys if k in present]
    base = estimator if estimator is not None else SelectedDawidSkene()
    gold, gold_record = _gold_for(session, keys) if use_gold else (None, {"n": 0, "used": False})
    mlc = MultiLabelConsensus(base=base, classes={k: [0, 1] for k in keys}, label_keys=keys)  # type: ignore[arg-type]
    consensus = mlc.fit(table, true_labels=gold)
    convergence: dict[str, Any] = {}
    for key, est in consensus.estimators_.items():
        convergence[key] = {
            "n_iter": int(est.n_iter_),
            "converged": bool(est.converged_),
            "log_likelihood": float(est.log_likelihood_),
            "n_gold": int(est.n_gold_),
        }
        if isinstance(est, SelectedDawidSkene):
            convergence[key]["selection"] = est.selection()
    not_converged = [k for k, c in convergence.items() if not c["converged"]]
    if not_converged:
        logger.warning("EM reached its iteration limit without converging for %s", not_converged)
    params = selection_params(base) if isinstance(base, SelectedDawidSkene) else estimator_params(base)
    params["gold"] = gold_record
    reliability = consensus.rater_reliability()
    regions: PatternRegions | None = None
    if decode is not None:
        settings = staple_params if staple_params is not None else StapleParams()
        patterns = [k for k in label_keys if k in PATTERN_KEYS]
        regions = pattern_region_consensuses(
            pattern_region_answers(session, patterns), decode, settings, patterns
        )
        params = {**params, "regions": {**dataclasses.asdict(settings), "data_hash": regions.data_hash}}
        convergence.update(regions.convergence)
        if len(regions.reliability):
            reliability = pd.concat([reliability, regions.reliability], ignore_index=True)
        if regions.skipped:
            logger.warning(
                "region consensus left out %d mask(s): %s", len(regions.skipped), regions.skipped[:5]
            )
    run = save_consensus_run(
        session,
        method=type(base).__name__ + ("+STAPLE" if regions is not None and regions.regions else ""),
        params=params,
        answers_table=table,
        probas=consensus.probas_,
        convergence=convergence,
        reliability=reliability,
        regions=regions.regions if regions is not None else (),
    )
    logger.info(
        "consensus run %d: %d items, %d raters, %d answers, %d region masks",
        run.id, run.n_items, run.n_raters, run.n_answers, len(regions.regions) if regions is not None else 0,
    )  # fmt: skip
    return run


# ------------------------------------------------------------------------------------------------
# The lesion pair's reference: HAM10000 diagnosis (Dawid-Skene) and lesion outline (STAPLE)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LesionReference:
    """A stored lesion run, reduced to one reference per item.

    Attributes:
        run: the stored consensus run (kind ``lesion``).
        posteriors: external id x :data:`labeling_config.HAM_CLASSES`, the Dawid-Skene posteriors.
        masks: external id -> consensus mask (STAPLE of two or more outlines, a single one as it is).
        n_raters: raters who gave a HAM10000 diagnosis.
        skipped: answers or items left out, with why.
    """

    run: ConsensusRun
    posteriors: pd.DataFrame
    masks: dict[str, NDArray[np.bool_]]
    n_raters: int
    skipped: list[str]


def class_reliability(
    estimator: DawidSkene | SelectedDawidSkene, data: pd.DataFrame, level: float = 0.95
) -> pd.DataFrame:
    r"""One-vs-rest sensitivity and specificity of every rater for every class of a fitted estimator.

    For class :math:`k` the true and the observed classes are split into :math:`k` and the rest, and the
    expected counts :math:`n_j[l, c]` (the sum, over rater :math:`j`'s answers :math:`l`, of the item's
    posterior of :math:`c`) plus the estimator's pseudo-counts :math:`A[l, c]` are pooled accordingly:
    sensitivity :math:`\text{Beta}(n_{kk} + A_{kk} + 1, \sum_{l \ne k} (n_{lk} + A_{lk}) + 1)`,
    specificity
    :math:`\text{Beta}(\sum_{l \ne k, c \ne k} (n_{lc} + A_{lc}) + 1, \sum_{c \ne k} (n_{kc} + A_{kc}) + 1)`.
    The point estimates are these Betas' modes (for sensitivity the fitted Dawid-Skene rate
    :math:`e_j[k, k]`, up to the last E-step: the counts are taken at the final posteriors), the intervals
    their equal-tailed quantiles; like :meth:`DawidSkene.rater_reliability`, which this is for two classes
    and class ``1``, they condition on the item posteriors.

    Args:
        estimator: fitted on ``data``.
        data: the long answer table it was fitted on (``task``, ``worker``, ``label``).
        level: coverage of the intervals.

    Returns:
        Rows ``class, worker, sensitivity, sensitivity_low, sensitivity_high, specificity,
        specificity_low, specificity_high, n_items``, by class then rater.
    """
    probas = estimator.probas_
    classes = pd.Index(probas.columns)
    n_classes = len(classes)
    workers = pd.Index(pd.unique(data["worker"]))
    counts = np.zeros((len(workers), n_classes, n_classes))
    cells = (workers.get_indexer(pd.Index(data["worker"])), classes.get_indexer(pd.Index(data["label"])))
    np.add.at(counts, cells, probas.loc[data["task"]].to_numpy(dtype=float))
    counts += estimator.prior_counts_
    n_items = data.drop_duplicates(["task", "worker"]).groupby("worker").size().reindex(workers)
    tails = ((1 - level) / 2, (1 + level) / 2)
    frames = []
    for k, name in enumerate(classes):
        rest = np.arange(n_classes) != k
        sens = counts[:, k, k] + 1, counts[:, rest, k].sum(axis=1) + 1
        spec = counts[:, rest][:, :, rest].sum(axis=(1, 2)) + 1, counts[:, k, rest].sum(axis=1) + 1
        columns: dict[str, Any] = {"class": name, "worker": workers}
        for what, (a, b) in (("sensitivity", sens), ("specificity", spec)):
            columns[what] = (a - 1) / (a + b - 2)
            columns[f"{what}_low"] = stats.beta.ppf(tails[0], a, b)
            columns[f"{what}_high"] = stats.beta.ppf(tails[1], a, b)
        frames.append(pd.DataFrame({**columns, "n_items": n_items.to_numpy()}))
    return pd.concat(frames, ignore_index=True)


def run_lesion_consensus(
    session: Session,
    decode: MaskDecoder,
    estimator: DawidSkene | SelectedDawidSkene | None = None,
    staple_params: StapleParams | None = None,
    region_label: str = LESION_KEY,
) -> LesionReference:
    """The lesion pair's reference from every live ``lesion.xml`` answer, stored as a consensus run.

    The HAM10000 diagnosis: Dawid-Skene over every rater's choice, one confusion matrix per rater over
    the seven classes; per class and rater a one-vs-rest sensitivity / specificity
    (:func:`class_reliability`, stored under ``ham_diagnosis:<class>``). The lesion outline: per image,
    STAPLE over the raters' decoded masks (one mask taken as it is); the mask is stored with a summary
    posterior per item, and per rater a pixel-pooled sensitivity / specificity over the images STAPLE
    ran on (stored under ``lesion``, without intervals: the pixels of an image are not independent).

    Args:
        session: the open session (the caller commits).
        decode: a stored region -> boolean mask, or None when it cannot be read.
        estimator: the diagnosis' estimator, copied (default ``SelectedDawidSkene()``: the rater model
            chosen by held-out answer likelihood, recorded in the run); its classes are set to
            :data:`labeling_config.HAM_CLASSES`.
        staple_params: STAPLE's settings (default :class:`StapleParams`).
        region_label: the outline's label in the stored regions.

    Returns:
        The stored run and the reference it gives (posteriors, masks, raters, what was left out).

    Raises:
        ValueError: no HAM10000 diagnosis in the store.
    """
    table = lesion_answers(session, region_label)
    diagnoses = table[table["label_key"] == HAM_KEY]
    if diagnoses.empty:
        raise ValueError("the store holds no HAM10000 diagnosis (no lesion.xml annotation yet)")
    params = staple_params if staple_params is not None else StapleParams()
    fitted = copy.deepcopy(estimator if estimator is not None else SelectedDawidSkene())
    fitted.classes = list(HAM_CLASSES)
    data = diagnoses[["task", "worker", "value"]].rename(columns={"value": "label"}).reset_index(drop=True)
    gold, gold_record = _gold_for(session, [HAM_KEY])
    fitted.fit(data, None if gold is None else gold.set_index("task")["value"])
    posteriors = fitted.probas_.reindex(columns=list(HAM_CLASSES)).fillna(0.0)
    if not fitted.converged_:
        logger.warning("EM reached its iteration limit without converging for %s", HAM_KEY)
    by_class = class_reliability(fitted, data)
    by_class["label_key"] = HAM_KEY + ":" + by_class.pop("class").astype(str)
    outlines = outline_consensuses(table[table["label_key"] == region_label], decode, params, region_label)

    run = save_consensus_run(
        session,
        method=f"{type(fitted).__name__}+STAPLE",
        params={
            HAM_KEY: selection_params(fitted)
            if isinstance(fitted, SelectedDawidSkene)
            else estimator_params(fitted),
            region_label: dataclasses.asdict(params),
            "gold": gold_record,
        },
        answers_table=table[list(ANSWER_COLUMNS)],
        probas={HAM_KEY: posteriors},
        convergence={
            HAM_KEY: {
                "n_iter": int(fitted.n_iter_),
                "converged": bool(fitted.converged_),
                "log_likelihood": float(fitted.log_likelihood_),
                "n_gold": int(fitted.n_gold_),
                **({"selection": fitted.selection()} if isinstance(fitted, SelectedDawidSkene) else {}),
            },
            region_label: outlines.convergence,
        },
        reliability=pd.concat([f for f in (by_class, outlines.reliability) if len(f)], ignore_index=True),
        kind=RunKind.LESION,
        regions=outlines.regions,
    )
    logger.info(
        "lesion consensus run %d: %d items, %d raters, %d answers, %d masks",
        run.id, run.n_items, run.n_raters, run.n_answers, len(outlines.regions),
    )  # fmt: skip
    return LesionReference(run, posteriors, outlines.masks, int(data["worker"].nunique()), outlines.skipped)
