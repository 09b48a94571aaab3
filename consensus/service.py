"""From the store to a stored consensus: the answers, one Dawid-Skene estimator per label, the run saved.

This is the one place that joins the estimators (which never touch SQL) and the repository (which
never estimates); the CLI, the backend and the retraining job call it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from consensus.dawid_skene import DawidSkene, MultiLabelConsensus
from consensus.models import ConsensusRun
from consensus.repository import answers, save_consensus_run
from labeling_config import TARGETS

logger = logging.getLogger(__name__)


def estimator_params(estimator: DawidSkene) -> dict[str, Any]:
    """An estimator's hyperparameters as plain JSON-able values (what a run stores)."""
    params: dict[str, Any] = {}
    for f in dataclasses.fields(estimator):
        if f.init:
            value = getattr(estimator, f.name)
            params[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return params


def run_consensus(
    session: Session, estimator: DawidSkene | None = None, label_keys: Sequence[str] = TARGETS
) -> ConsensusRun:
    """Fit one estimator per label on every live answer in the store and store the run.

    Args:
        session: the open session (the caller commits).
        estimator: the base estimator, copied per label (default: ``DawidSkene()``, smoothed).
        label_keys: the labels to fit; those without any answer are skipped.

    Returns:
        The stored run (parameters, convergence, posteriors, rater reliability).

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
    base = estimator if estimator is not None else DawidSkene()
    consensus = MultiLabelConsensus(base=base, classes={k: [0, 1] for k in keys}, label_keys=keys).fit(table)
    convergence = {
        key: {
            "n_iter": int(est.n_iter_),
            "converged": bool(est.converged_),
            "log_likelihood": float(est.log_likelihood_),
        }
        for key, est in consensus.estimators_.items()
    }
    not_converged = [k for k, c in convergence.items() if not c["converged"]]
    if not_converged:
        logger.warning("EM reached n_iter=%d without converging for %s", base.n_iter, not_converged)
    run = save_consensus_run(
        session,
        method=type(base).__name__,
        params=estimator_params(base),
        answers_table=table,
        probas=consensus.probas_,
        convergence=convergence,
        reliability=consensus.rater_reliability(),
    )
    logger.info(
        "consensus run %d: %d items, %d raters, %d answers", run.id, run.n_items, run.n_raters, run.n_answers
    )
    return run
