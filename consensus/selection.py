r"""Choosing the rater model from the answers alone: cross-validated likelihood of held-out answers.

Which Dawid-Skene fits a study depends on its raters. Four dermatologists who each read every image
identify a full confusion matrix per rater; hundreds of crowd raters with a handful of answers each do
not, and there one accuracy per rater (one-coin) or matrices drawn towards the crowd's pooled one
(:class:`consensus.dawid_skene.PooledDawidSkene`) predict better. No truth is needed to tell them apart:
a rater model that describes the raters well predicts answers it has not seen.

:class:`SelectedDawidSkene` splits the answers at random into ``n_folds`` folds; for each fold it fits
every candidate on the other answers and scores each held-out answer :math:`l` of rater :math:`j` on
item :math:`i` by :math:`\log \sum_c T_{ic}\, e_j[l, c]`, the item's posterior from its remaining
answers times the rater's fitted rates (:meth:`consensus.dawid_skene.DawidSkene.answer_log_likelihood`).
The criterion is the mean over all answers; the candidate with the highest one is refitted on every
answer and used. The choice, the criterion of every candidate and its standard error are kept, so a
stored run says why it used the model it used.

The candidates are fixed in advance (:func:`default_candidates`): they are not tuned per data set.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from consensus._validate import check_columns, encode_answers
from consensus.dawid_skene import DawidSkene, OneCoinDawidSkene, PooledDawidSkene, PooledOneCoinDawidSkene


def default_candidates() -> dict[str, DawidSkene]:
    """The rater models chosen among, default settings: full and one-coin Dawid-Skene, each also with a
    prior pooled across raters (:class:`~consensus.dawid_skene.PooledDawidSkene`,
    :class:`~consensus.dawid_skene.PooledOneCoinDawidSkene`)."""
    return {
        "full": DawidSkene(),
        "one_coin": OneCoinDawidSkene(),
        "pooled": PooledDawidSkene(),
        "pooled_one_coin": PooledOneCoinDawidSkene(),
    }


@dataclass
class SelectedDawidSkene:
    """Dawid-Skene whose rater model is chosen per fit by cross-validated answer likelihood.

    Behaves as the chosen estimator after :meth:`fit` (``probas_``, ``labels_``, ``errors_``,
    ``rater_reliability`` ... are the chosen, refitted estimator's), so it can stand wherever a
    :class:`~consensus.dawid_skene.DawidSkene` does, e.g. as the base of
    :class:`~consensus.dawid_skene.MultiLabelConsensus` (one choice per label).

    Args:
        candidates: name -> unfitted estimator; default :func:`default_candidates`. Ties go to the
            first listed.
        n_folds: folds of the answers (at least 2).
        classes: the full class set, passed to every candidate; default the observed labels.
        random_state: seed of the fold assignment (and the candidates' tie breaking, if they have one).

    Attributes:
        choice_: the name of the chosen candidate.
        estimator_: the chosen candidate, fitted on every answer.
        criterion_: name -> mean held-out log-likelihood per answer (higher is better).
        criterion_se_: name -> standard error of the chosen-minus-that difference over answers
            (0 for the chosen one): how clearly the choice is ahead.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> truth = rng.integers(0, 2, 200)
        >>> rows = [(i, f"r{j}", t if rng.random() < 0.8 else 1 - t)
        ...         for i, t in enumerate(truth) for j in range(4)]
        >>> selected = SelectedDawidSkene().fit(pd.DataFrame(rows, columns=["task", "worker", "label"]))
        >>> selected.choice_ in {"full", "one_coin", "pooled", "pooled_one_coin"}
        True
    """

    candidates: Mapping[str, DawidSkene] | None = None
    n_folds: int = 5
    classes: list[Any] | None = None
    random_state: int | None = 0

    choice_: str = field(init=False, repr=False)
    estimator_: DawidSkene = field(init=False, repr=False)
    criterion_: dict[str, float] = field(init=False, repr=False)
    criterion_se_: dict[str, float] = field(init=False, repr=False)

    def _candidates(self) -> dict[str, DawidSkene]:
        found = dict(self.candidates) if self.candidates is not None else default_candidates()
        if not found:
            raise ValueError("candidates is empty: give at least one estimator")
        return found

    def fit(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> SelectedDawidSkene:
        """Score every candidate on held-out answers, choose, and refit the choice on all answers.

        Args:
            data: long table ``task``, ``worker``, ``label``.
            true_labels: gold classes of some tasks, passed to every fit (see
                :meth:`consensus.dawid_skene.DawidSkene.fit`).

        Returns:
            self, fitted.

        Raises:
            ValueError: ``n_folds`` below 2, no candidates, or any error of the candidates' ``fit``.
        """
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be at least 2, got {self.n_folds}")
        frame = check_columns(data, ("task", "worker", "label"))
        # Folds are drawn over the answers in a canonical order, so the same answers in another row
        # order (a store without ORDER BY, another export) give the same folds and the same choice.
        frame = frame.sort_values(["task", "worker", "label"], key=lambda c: c.astype(str), kind="mergesort")
        frame = frame.reset_index(drop=True)
        classes = list(encode_answers(frame, self.classes).classes)
        candidates = self._candidates()
        rng = np.random.default_rng(self.random_state)
        folds = rng.permutation(len(frame)) % self.n_folds
        scores = {name: np.zeros(len(frame)) for name in candidates}
        for fold in range(self.n_folds):
            held = folds == fold
            train = frame[~held]
            if train.empty or not held.any():
                continue
            for name, candidate in candidates.items():
                fitted = copy.deepcopy(candidate)
                fitted.classes = classes
                fitted.fit(train, true_labels)
                scores[name][held] = fitted.answer_log_likelihood(frame[held])
        criterion = {name: float(values.mean()) for name, values in scores.items()}
        choice = max(candidates, key=lambda name: (criterion[name], -list(candidates).index(name)))
        chosen = copy.deepcopy(candidates[choice])
        chosen.classes = classes
        self.estimator_ = chosen.fit(frame, true_labels)
        self.choice_ = choice
        self.criterion_ = criterion
        self.criterion_se_ = {
            name: float(np.std(scores[choice] - values, ddof=1) / np.sqrt(len(frame)))
            if len(frame) > 1
            else 0.0
            for name, values in scores.items()
        }
        return self

    def fit_predict(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> pd.Series:
        """Fit and return the chosen model's most probable class per task."""
        return self.fit(data, true_labels).estimator_.labels_

    def __getattr__(self, name: str) -> Any:
        # Fitted attributes and methods of the chosen estimator (probas_, labels_, rater_reliability, ...).
        if name.startswith("__") or name == "estimator_":
            raise AttributeError(name)
        try:
            estimator = self.__dict__["estimator_"]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no {name!r} before fit") from None
        return getattr(estimator, name)

    def selection(self) -> dict[str, Any]:
        """The choice and the criterion as plain JSON-able values (what a stored run keeps)."""
        return {
            "choice": self.choice_,
            "method": type(self.estimator_).__name__,
            "criterion": f"mean held-out answer log-likelihood, {self.n_folds}-fold",
            "scores": dict(self.criterion_),
            "se_vs_choice": dict(self.criterion_se_),
        }
