r"""Dawid-Skene EM consensus: one reference label per item from any number of raters, with rater reliability.

The model (Dawid & Skene 1979, "Maximum Likelihood Estimation of Observer Error-Rates Using the EM
Algorithm", J. R. Stat. Soc. C 28(1):20-28, doi:10.2307/2346806). Item :math:`i` has a latent true class
:math:`z_i \in \{1..K\}` with prior :math:`\pi_c = P(z_i = c)`; rater :math:`j` answers :math:`l` with
probability :math:`e_j[l, c] = P(y_{ij} = l \mid z_i = c)` (column :math:`c` of rater :math:`j`'s
confusion matrix sums to one), independently of the other raters given :math:`z_i`. A rater who did not
rate an item simply contributes no factor, so raters may be missing anywhere and one rater may have one
answer. The marginal log-likelihood of the answers is

.. math::

    \log L(\pi, e) = \sum_i \log \sum_c \pi_c \prod_{(j, l) \in A_i} e_j[l, c]

where :math:`A_i` are item :math:`i`'s answers (a repeated (item, rater) row counts as another answer,
as in crowd-kit).

Smoothing. We maximise the posterior (MAP) rather than the likelihood, with Dirichlet priors on
:math:`\pi` and on every confusion column: Dirichlet(:math:`\beta + 1`) and Dirichlet(:math:`A + 1`),
so that :math:`\beta` (per class) and :math:`A[l, c] = s + d (K - 1) [l = c]` (per cell; ``smoothing``
:math:`s`, ``diag_smoothing`` :math:`d`) act as pseudo-counts added to the expected counts. The objective is

.. math::

    \log L(\pi, e) + \sum_c \beta \log \pi_c + \sum_j \sum_{l, c} A[l, c] \log e_j[l, c],

the prior counted once per parameter and the likelihood once per item (crowd-kit's stopping quantity adds
the log-prior once per *answer*, which is why its default stops after two iterations on many sets).
With four raters the confusion matrices are identified only weakly: every column of every rater is
estimated from the handful of items of that true class, and a rater who never disagreed with the other
three would get error rate 0, i.e. infinite weight, from the likelihood alone. The pseudo-counts keep
every rate off 0 and 1; the diagonal part says "a rater does better than chance", which is what lets
many sparse raters (one to five answers each) be weighed like a majority vote instead of by noise.

EM. Start from the soft majority vote :math:`T_{ic}` (share of item :math:`i`'s answers saying
:math:`c`), then alternate

* **M-step** (closed form): :math:`\pi_c \propto \sum_i T_{ic} + \beta`,
  :math:`e_j[l, c] \propto \sum_{i: y_{ij} = l} T_{ic} + A[l, c]` (normalised over :math:`l`);
* **E-step** (log space, so hundreds of answers per item do not underflow):
  :math:`\log T_{ic} = \log \pi_c + \sum_{(j, l) \in A_i} \log e_j[l, c] - \log Z_i`, where
  :math:`\log Z_i` (a log-sum-exp) is item :math:`i`'s term of :math:`\log L`;

and stop when the objective per answer improves by less than ``tol`` or after ``n_iter`` E-steps. Both
steps are sparse products over integer codes: ``X @ log_e`` and ``X.T @ T`` with ``X`` the item ×
(rater, answer) count matrix, so there is no Python loop over answers.

``OneCoinDawidSkene`` ties each rater's matrix to one accuracy (errors spread evenly over the other
classes): one parameter per rater instead of :math:`K(K - 1)`, for few or sparse raters.
``MultiLabelConsensus`` runs one independent estimator per label key (diagnosis and each pattern).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import sparse, stats

from consensus._validate import Encoded, check_columns, encode_answers

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Floor for probabilities before a log, as crowd-kit: keeps log(0) out without moving any real estimate.
_EPS = 1e-10
#: Posteriors this close to the item's maximum count as tied (broken with ``random_state``).
_TIE = 1e-12


def _safe_log(values: FloatArray) -> FloatArray:
    """``log`` with 0 mapped to ``log(_EPS)``: used where a zero never meets a non-zero weight."""
    return np.asarray(np.log(np.maximum(values, _EPS)), dtype=np.float64)


def _incidence(enc: Encoded) -> sparse.csr_matrix:
    """Item × (rater, answer) count matrix: column ``worker * K + label``; repeated rows add up."""
    n_classes = len(enc.classes)
    cols = enc.worker * n_classes + enc.label
    ones = np.ones(enc.n_answers, dtype=np.float64)
    shape = (len(enc.tasks), len(enc.workers) * n_classes)
    return sparse.csr_matrix((ones, (enc.task, cols)), shape=shape)


def _vote_counts(enc: Encoded) -> FloatArray:
    """Item × class answer counts."""
    n_classes = len(enc.classes)
    flat = np.bincount(enc.task * n_classes + enc.label, minlength=len(enc.tasks) * n_classes)
    return flat.reshape(len(enc.tasks), n_classes).astype(np.float64)


def _argmax_ties(probas: FloatArray, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    """Row-wise argmax; rows with several (near-)equal maxima pick one of them at random."""
    best = probas.max(axis=1, keepdims=True)
    keys = np.where(probas >= best - _TIE, rng.random(probas.shape), -1.0)
    return np.asarray(keys.argmax(axis=1))


def _class_prior(class_counts: FloatArray, beta: float) -> FloatArray:
    """MAP class prior from the expected class counts and the pseudo-count ``beta``."""
    priors = np.clip(class_counts + beta, _EPS, None)
    return np.asarray(priors / priors.sum())


def _one_coin(accuracy: FloatArray, n_classes: int) -> FloatArray:
    """One-coin confusion matrices ``[worker, observed, true]``: accuracy on the diagonal, the rest even."""
    accuracy = np.clip(accuracy, _EPS, 1 - _EPS)
    off = (1 - accuracy) / (n_classes - 1)
    errors = np.repeat(off[:, None, None], n_classes, axis=1).repeat(n_classes, axis=2)
    diag = np.arange(n_classes)
    errors[:, diag, diag] = accuracy[:, None]
    return np.asarray(errors)


def _gold_codes(
    enc: Encoded, true_labels: pd.Series | None
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Row codes of the gold tasks that have answers, and their class codes (both empty without gold)."""
    empty = np.zeros(0, dtype=np.intp)
    if true_labels is None or len(true_labels) == 0:
        return empty, empty
    if not isinstance(true_labels, pd.Series):
        raise ValueError(
            f"true_labels must be a pandas Series indexed by task, got {type(true_labels).__name__}"
        )
    if true_labels.isna().any():
        raise ValueError(f"{int(true_labels.isna().sum())} gold label(s) are missing (NaN or None)")
    if true_labels.index.has_duplicates:
        repeated = true_labels.index[true_labels.index.duplicated()].unique().tolist()[:5]
        raise ValueError(f"true_labels gives some tasks twice, e.g. {repeated}")
    codes = enc.classes.get_indexer(pd.Index(true_labels.to_numpy()))
    if np.any(codes < 0):
        unknown = sorted({str(v) for v in true_labels.to_numpy()[codes < 0]})
        raise ValueError(f"gold label(s) {unknown} are not among the classes {list(enc.classes)}")
    rows = enc.tasks.get_indexer(true_labels.index)
    keep = rows >= 0
    return np.asarray(rows[keep], dtype=np.intp), np.asarray(codes[keep], dtype=np.intp)


def majority_vote_proba(data: pd.DataFrame, classes: Sequence[Hashable] | None = None) -> pd.DataFrame:
    """Soft majority vote: each item's share of answers per class.

    Args:
        data: long table with columns ``task``, ``worker``, ``label``.
        classes: the full class set (columns of the result); default the observed labels.

    Returns:
        DataFrame task × label whose rows sum to one.

    Raises:
        ValueError: as :func:`consensus._validate.encode_answers`.
    """
    enc = encode_answers(data, classes)
    counts = _vote_counts(enc)
    return pd.DataFrame(counts / counts.sum(axis=1, keepdims=True), index=enc.tasks, columns=enc.classes)


def majority_vote(
    data: pd.DataFrame, classes: Sequence[Hashable] | None = None, random_state: int | None = 0
) -> pd.Series:
    """Majority vote per item, ties broken at random with ``random_state``.

    crowd-kit's ``MajorityVote`` gives every tie to the smallest label, which biases a binary pattern
    towards "absent"; here a tie is a seeded coin flip.

    Args:
        data: long table with columns ``task``, ``worker``, ``label``.
        classes: the full class set; default the observed labels.
        random_state: seed of the numpy Generator that breaks ties.

    Returns:
        Series indexed by task, named ``agg_label``.

    Raises:
        ValueError: as :func:`consensus._validate.encode_answers`.

    Examples:
        >>> df = pd.DataFrame({"task": [1, 1, 1, 2], "worker": ["a", "b", "c", "a"], "label": [0, 1, 1, 0]})
        >>> majority_vote(df).tolist()
        [1, 0]
    """
    enc = encode_answers(data, classes)
    codes = _argmax_ties(_vote_counts(enc), np.random.default_rng(random_state))
    return pd.Series(enc.classes.take(codes), index=enc.tasks, name="agg_label")


@dataclass
class DawidSkene:
    """Dawid-Skene EM with Dirichlet smoothing (MAP), for K classes and any number of raters.

    See the module docstring for the model, the objective, and the E and M steps.

    Args:
        n_iter: maximum number of EM iterations (E-steps).
        tol: stop when the objective (log-likelihood plus log-prior, divided by the number of answers)
            improves by less than this; ``-inf`` runs all ``n_iter`` iterations.
        smoothing: Dirichlet pseudo-count added to every cell of every rater's confusion matrix.
        diag_smoothing: extra pseudo-count on the diagonal *per other class*: the diagonal cell of a
            K-class matrix gets ``diag_smoothing * (K - 1)`` more, so the prior odds of the right answer
            against any one wrong answer stay the same whatever K (a belief that raters beat chance).
        prior_smoothing: Dirichlet pseudo-count added to every class of the class prior.
        classes: the full class set, e.g. ``[0, 1]`` for a pattern nobody marked; default the observed
            labels (then at least two must occur).
        random_state: seed of the numpy Generator that breaks exact ties between classes.

    With ``smoothing = diag_smoothing = prior_smoothing = 0`` this is plain maximum-likelihood
    Dawid-Skene, the same estimates as crowd-kit's ``DawidSkene`` at the same iteration count (an
    answer a rater never gave keeps probability 0, as there). The defaults (0.1 on every cell,
    2 × (K − 1) more on the diagonal, 1 per class) put a prior accuracy of about 0.95 worth about
    2 (K − 1) pseudo-answers on every column. That is nothing next to a column estimated from hundreds
    of items (at 5,000 items a rate moves by < 0.002), keeps four raters on a few dozen items off 0/1
    error rates, and stops raters with one to five answers from getting confusion matrices fitted to
    noise: on cf_weather (461 raters, 3.7 answers each, 5 classes) plain Dawid-Skene reaches 0.783
    accuracy, these defaults 0.897, majority vote 0.87-0.90 depending on how its 9% ties are broken.

    Attributes:
        probas_: posterior of every class, DataFrame task × label.
        labels_: most probable class per task (Series ``agg_label``).
        priors_: class prior, Series indexed by label (name ``prior``).
        errors_: confusion matrices, DataFrame indexed by (worker, label = observed) with one column per
            true label: ``errors_.loc[(w, l), c] = P(w answers l | true class c)``.
        log_likelihood_: marginal log-likelihood of the answers at the fitted parameters (no prior term).
        loss_history_: the MAP objective per answer after each iteration (increases under EM).
        n_iter_: number of EM iterations run.
        converged_: whether the tolerance was met before ``n_iter``.
        n_gold_: number of tasks whose class was given as known (``true_labels``) and used.
        prior_counts_: the Dirichlet pseudo-counts ``[observed, true]`` on every confusion column at
            the end of the fit (what :meth:`rater_reliability`'s intervals use as prior).

    Examples:
        >>> df = pd.DataFrame(
        ...     {
        ...         "task": ["a", "a", "a", "b", "b", "b", "c", "c", "c"],
        ...         "worker": ["w1", "w2", "w3"] * 3,
        ...         "label": [1, 1, 0, 0, 0, 0, 1, 1, 1],
        ...     }
        ... )
        >>> DawidSkene().fit_predict(df).tolist()
        [1, 0, 1]
        >>> ds = DawidSkene(classes=[0, 1, 2]).fit(df)
        >>> ds.probas_.shape
        (3, 3)
    """

    n_iter: int = 100
    tol: float = 1e-6
    smoothing: float = 0.1
    diag_smoothing: float = 2.0
    prior_smoothing: float = 1.0
    classes: Sequence[Hashable] | None = None
    random_state: int | None = 0

    probas_: pd.DataFrame = field(init=False, repr=False)
    labels_: pd.Series = field(init=False, repr=False)
    priors_: pd.Series = field(init=False, repr=False)
    errors_: pd.DataFrame = field(init=False, repr=False)
    log_likelihood_: float = field(init=False, repr=False)
    loss_history_: list[float] = field(init=False, repr=False)
    n_iter_: int = field(init=False, repr=False)
    converged_: bool = field(init=False, repr=False)
    n_gold_: int = field(init=False, repr=False)
    prior_counts_: FloatArray = field(init=False, repr=False)
    _counts: FloatArray = field(init=False, repr=False)
    _encoded: Encoded = field(init=False, repr=False)

    def _check_hyperparameters(self) -> None:
        if self.n_iter < 1:
            raise ValueError(f"n_iter must be at least 1, got {self.n_iter}")
        for name in ("smoothing", "diag_smoothing", "prior_smoothing"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite pseudo-count >= 0, got {value}")

    def pseudo_counts(self, n_classes: int) -> FloatArray:
        """The confusion-matrix pseudo-counts ``A[observed, true]`` for ``n_classes`` classes."""
        diagonal = self.diag_smoothing * (n_classes - 1) * np.eye(n_classes)
        return self.smoothing * np.ones((n_classes, n_classes)) + diagonal

    def _m_step(
        self, counts: FloatArray, class_counts: FloatArray, alpha: FloatArray, beta: float, used: BoolArray
    ) -> tuple[FloatArray, FloatArray]:
        """MAP parameters from expected counts (pure).

        Args:
            counts: expected counts ``[worker, observed, true]`` (sum over a rater's answers of the
                posterior of each true class).
            class_counts: expected number of items of each true class.
            alpha: pseudo-counts ``[observed, true]`` added to every rater's counts.
            beta: pseudo-count added to every class of the prior.
            used: ``[worker, observed]``: whether the rater ever gave that answer.

        Returns:
            ``(priors, errors)``: the class prior ``(K,)`` and confusion matrices ``[worker, observed,
            true]`` whose columns sum to one.
        """
        priors = _class_prior(class_counts, beta)
        # The floor goes only on answers the rater gave: without pseudo-counts an answer never given
        # keeps probability 0 (its maximum-likelihood value, as in crowd-kit), and a true class the
        # rater never met gets a column spread evenly over the answers the rater did give.
        errors = counts + alpha
        np.maximum(errors, np.where(used[:, :, None], _EPS, 0.0), out=errors)
        errors /= errors.sum(axis=1, keepdims=True)
        return priors, errors

    @staticmethod
    def _e_step(
        incidence: sparse.csr_matrix, log_priors: FloatArray, log_errors: FloatArray
    ) -> tuple[FloatArray, float]:
        """Posterior of every item's class and the marginal log-likelihood (pure).

        Args:
            incidence: item × (worker * K + observed) answer counts.
            log_priors: ``log pi``, shape ``(K,)``.
            log_errors: ``log e`` flattened to ``(workers * K, K)``: row ``worker * K + observed``.

        Returns:
            ``(probas, log_likelihood)``: item × class posteriors and ``sum_i log Z_i``.
        """
        joint = np.asarray(incidence @ log_errors) + log_priors
        # Subtract each row's maximum before exp so that items with many answers do not underflow.
        top = joint.max(axis=1, keepdims=True)
        np.subtract(joint, top, out=joint)
        np.exp(joint, out=joint)
        norm = joint.sum(axis=1, keepdims=True)
        joint /= norm
        return joint, float(top.sum() + np.log(norm).sum())

    @staticmethod
    def _log_prior(priors: FloatArray, errors: FloatArray, alpha: FloatArray, beta: float) -> float:
        """Log Dirichlet density (up to a constant) of the parameters: counted once per parameter."""
        value = beta * float(np.log(priors).sum()) if beta else 0.0
        if np.any(alpha):
            # Cells with a zero pseudo-count may hold probability 0 (an answer never given); 0 * log 0 = 0.
            value += float(np.einsum("lc,wlc->", alpha, _safe_log(errors)))
        return value

    def fit(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> DawidSkene:
        """Fit the model to a long answer table with EM.

        Args:
            data: DataFrame with columns ``task``, ``worker``, ``label`` (one row per answer).
            true_labels: known classes of some tasks (gold: adjudicated, histopathology), a Series
                indexed by task. Their posteriors are held at the known class in every step, so they
                estimate the raters' confusion matrices as labelled data (crowd-kit's ``true_labels``);
                ``log_likelihood_`` then counts them at their known class. Tasks without answers are
                ignored (``n_gold_`` counts those used).

        Returns:
            self, fitted.

        Raises:
            ValueError: a missing column, an empty table, NaN ids or labels, a label not in
                ``classes``, one observed class without ``classes``, a gold label that is not a class
                or is missing, or bad hyperparameters.
        """
        self._check_hyperparameters()
        enc = encode_answers(data, self.classes)
        n_classes, n_workers = len(enc.classes), len(enc.workers)
        incidence = _incidence(enc)
        incidence_t = incidence.T.tocsr()
        alpha = self.pseudo_counts(n_classes)
        beta = float(self.prior_smoothing)
        gold_rows, gold_codes = _gold_codes(enc, true_labels)

        used = np.asarray(incidence.sum(axis=0)).reshape(n_workers, n_classes) > 0
        votes = _vote_counts(enc)
        probas = votes / votes.sum(axis=1, keepdims=True)
        probas[gold_rows] = np.eye(n_classes)[gold_codes]
        history: list[float] = []
        converged = False
        for _ in range(self.n_iter):
            counts = np.asarray(incidence_t @ probas).reshape(n_workers, n_classes, n_classes)
            priors, errors = self._m_step(counts, probas.sum(axis=0), alpha, beta, used)
            log_errors = _safe_log(errors).reshape(n_workers * n_classes, n_classes)
            probas, log_likelihood = self._e_step(incidence, np.log(priors), log_errors)
            if len(gold_rows):
                # A gold item's term is its joint at the known class: log Z_i + log T_i[gold].
                log_likelihood += float(_safe_log(probas[gold_rows, gold_codes]).sum())
                probas[gold_rows] = np.eye(n_classes)[gold_codes]
            objective = log_likelihood + self._log_prior(priors, errors, self._prior_counts(alpha), beta)
            history.append(objective / enc.n_answers)
            if len(history) > 1 and history[-1] - history[-2] < self.tol:
                converged = True
                break
        if not converged:
            logger.info("Dawid-Skene did not reach tol=%g in %d iterations", self.tol, self.n_iter)

        self._encoded = enc
        self._counts = counts  # the expected counts behind errors_ (rater_reliability's Beta posteriors)
        self.probas_ = pd.DataFrame(probas, index=enc.tasks, columns=enc.classes)
        codes = _argmax_ties(probas, np.random.default_rng(self.random_state))
        self.labels_ = pd.Series(enc.classes.take(codes), index=enc.tasks, name="agg_label")
        self.priors_ = pd.Series(priors, index=enc.classes, name="prior")
        rows = pd.MultiIndex.from_product([enc.workers, enc.classes], names=["worker", "label"])
        self.errors_ = pd.DataFrame(
            errors.reshape(n_workers * n_classes, n_classes), index=rows, columns=enc.classes
        )
        self.log_likelihood_ = log_likelihood
        self.loss_history_ = history
        self.n_iter_ = len(history)
        self.converged_ = converged
        self.n_gold_ = len(gold_rows)
        self.prior_counts_ = self._prior_counts(alpha)
        return self

    def fit_predict(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> pd.Series:
        """Fit and return the most probable class per task (see :meth:`fit`)."""
        return self.fit(data, true_labels).labels_

    def fit_predict_proba(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> pd.DataFrame:
        """Fit and return the class posteriors, task × label (see :meth:`fit`)."""
        return self.fit(data, true_labels).probas_

    def _prior_counts(self, alpha: FloatArray) -> FloatArray:
        """The confusion-matrix pseudo-counts in force after the last M-step (fixed here: ``alpha``)."""
        return alpha

    def _unseen_errors(self) -> FloatArray:
        """The confusion matrix ``[observed, true]`` of a rater the fit never saw: the prior's mean.

        Pseudo-counts of zero (plain maximum likelihood) give every answer the same probability.
        """
        counts = self.prior_counts_
        if not np.all(counts.sum(axis=0) > 0):
            return np.full(counts.shape, 1.0 / counts.shape[0])
        return np.asarray(counts / counts.sum(axis=0, keepdims=True))

    def answer_log_likelihood(self, data: pd.DataFrame) -> FloatArray:
        r"""Log predictive probability of each answer in ``data`` under the fitted model.

        For answer :math:`l` of rater :math:`j` on task :math:`i`:
        :math:`\log \sum_c T_{ic}\, e_j[l, c]`, with :math:`T_i` the fitted posterior of the task
        (the class prior for a task the fit never saw) and :math:`e_j` the fitted confusion matrix (the
        prior's mean for a rater the fit never saw). On answers held out of the fit this is the
        cross-validation criterion of :class:`consensus.selection.SelectedDawidSkene`.

        Args:
            data: long table ``task``, ``worker``, ``label``; labels must be among the fitted classes.

        Returns:
            One log probability per row of ``data``, in its order.

        Raises:
            ValueError: a label that is not one of the fitted classes.
            AttributeError: the estimator is not fitted.
        """
        frame = check_columns(data, ("task", "worker", "label"))
        classes = self.probas_.columns
        labels = classes.get_indexer(pd.Index(frame["label"]))
        if np.any(labels < 0):
            unknown = sorted({str(v) for v in pd.Index(frame["label"])[labels < 0]})
            raise ValueError(f"label(s) {unknown} are not among the fitted classes {list(classes)}")
        n_classes = len(classes)
        task_rows = self.probas_.index.get_indexer(pd.Index(frame["task"]))
        posteriors = np.where(
            (task_rows >= 0)[:, None], self.probas_.to_numpy()[task_rows], self.priors_.to_numpy()[None, :]
        )
        workers = self._encoded.workers
        worker_rows = workers.get_indexer(pd.Index(frame["worker"]))
        errors = self.errors_.to_numpy().reshape(len(workers), n_classes, n_classes)
        rows = np.where(worker_rows >= 0, worker_rows, 0)
        answer_rates = errors[rows, labels, :]  # [answer, true class]
        unseen = worker_rows < 0
        answer_rates[unseen] = self._unseen_errors()[labels[unseen], :]
        return np.asarray(np.log(np.maximum((posteriors * answer_rates).sum(axis=1), _EPS)))

    def _beta_parameters(
        self, positive: int, negative: int, alpha: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Beta posterior parameters ``(a, b)`` of sensitivity and of specificity for every rater.

        A Dirichlet(A + 1) prior on a confusion column gives, conditional on the posteriors ``T``, a
        Beta(n_pp + A_pp + 1, n_np + A_np + 1) posterior on the sensitivity, whose mode is the MAP
        estimate in ``errors_``.
        """
        counts = self._counts
        sens_a = counts[:, positive, positive] + alpha[positive, positive] + 1
        sens_b = counts[:, negative, positive] + alpha[negative, positive] + 1
        spec_a = counts[:, negative, negative] + alpha[negative, negative] + 1
        spec_b = counts[:, positive, negative] + alpha[positive, negative] + 1
        return sens_a, sens_b, spec_a, spec_b

    def rater_reliability(self, positive: Hashable | None = None, level: float = 0.95) -> pd.DataFrame:
        """Each rater's sensitivity and specificity with credible intervals (binary labels only).

        The point estimates are the fitted (MAP) rates in ``errors_``. The intervals are equal-tailed
        quantiles of the Beta posterior of each rate given the expected counts (the posterior-weighted
        numbers of true positives, false negatives, ...) and the smoothing pseudo-counts as prior
        (Beta(1, 1) per rate when smoothing is off). They condition on the estimated item posteriors, so
        they leave out the uncertainty of the other raters' parameters and are somewhat narrow.

        Args:
            positive: the positive class; default the last class (``1`` of ``[0, 1]``).
            level: coverage of the intervals.

        Returns:
            DataFrame with columns ``worker``, ``sensitivity``, ``sensitivity_low``,
            ``sensitivity_high``, ``specificity``, ``specificity_low``, ``specificity_high``,
            ``n_items`` (distinct items the rater labelled), ``n_positive`` and ``n_negative`` (expected
            numbers of truly positive / negative items among the rater's answers).

        Raises:
            ValueError: the estimator has more than two classes, ``positive`` is not a class, or
                ``level`` is not in (0, 1).
            AttributeError: the estimator is not fitted.
        """
        enc = self._encoded
        classes = enc.classes
        if len(classes) != 2:
            raise ValueError(
                f"sensitivity / specificity need a binary label; this one has {len(classes)} classes "
                f"{list(classes)}: read errors_ instead"
            )
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        pos = len(classes) - 1 if positive is None else int(classes.get_indexer(pd.Index([positive]))[0])
        if pos < 0:
            raise ValueError(f"positive={positive!r} is not one of the classes {list(classes)}")
        neg = 1 - int(pos)
        errors = self.errors_.to_numpy().reshape(len(enc.workers), 2, 2)
        sens_a, sens_b, spec_a, spec_b = self._beta_parameters(int(pos), neg, self.prior_counts_)
        tails = ((1 - level) / 2, (1 + level) / 2)
        pairs = np.unique(enc.task * len(enc.workers) + enc.worker)
        n_items = np.bincount(pairs % len(enc.workers), minlength=len(enc.workers))
        return pd.DataFrame(
            {
                "worker": enc.workers,
                "sensitivity": errors[:, pos, pos],
                "sensitivity_low": stats.beta.ppf(tails[0], sens_a, sens_b),
                "sensitivity_high": stats.beta.ppf(tails[1], sens_a, sens_b),
                "specificity": errors[:, neg, neg],
                "specificity_low": stats.beta.ppf(tails[0], spec_a, spec_b),
                "specificity_high": stats.beta.ppf(tails[1], spec_a, spec_b),
                "n_items": n_items,
                "n_positive": self._counts[:, :, pos].sum(axis=1),
                "n_negative": self._counts[:, :, neg].sum(axis=1),
            }
        )


@dataclass
class OneCoinDawidSkene(DawidSkene):
    r"""Dawid-Skene with one accuracy per rater ("one coin"): errors spread evenly over the other classes.

    Rater :math:`j`'s confusion matrix is :math:`e_j[c, c] = a_j` and
    :math:`e_j[l, c] = (1 - a_j) / (K - 1)` for :math:`l \ne c`. The M-step pools the expected counts:
    :math:`a_j = (\sum_c n_j[c, c] + \operatorname{tr} A) / (\sum_{l, c} n_j[l, c] + \sum A)`; the
    E-step is the Dawid-Skene one. One parameter per rater instead of :math:`K(K - 1)`, which is the
    better-identified model when each rater labels few items (four raters, small studies). In
    :meth:`rater_reliability` sensitivity equals specificity equals the accuracy.

    Examples:
        >>> df = pd.DataFrame(
        ...     {"task": [1, 1, 1, 2, 2, 2], "worker": ["a", "b", "c"] * 2, "label": [1, 1, 0, 0, 0, 1]}
        ... )
        >>> OneCoinDawidSkene().fit_predict(df).tolist()
        [1, 0]
    """

    def _m_step(
        self, counts: FloatArray, class_counts: FloatArray, alpha: FloatArray, beta: float, used: BoolArray
    ) -> tuple[FloatArray, FloatArray]:
        """MAP prior and one-coin confusion matrices from expected counts (pure); see the class docstring."""
        n_classes = counts.shape[1]
        diag = np.arange(n_classes)
        correct = counts[:, diag, diag].sum(axis=1) + np.trace(alpha)
        total = counts.sum(axis=(1, 2)) + alpha.sum()
        return _class_prior(class_counts, beta), _one_coin(correct / np.maximum(total, _EPS), n_classes)

    def _beta_parameters(
        self, positive: int, negative: int, alpha: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Beta posterior of the one accuracy, returned for sensitivity and for specificity alike."""
        counts = self._counts
        correct = counts[:, positive, positive] + counts[:, negative, negative] + np.trace(alpha) + 1
        off_diagonal = alpha.sum() - np.trace(alpha)
        wrong = counts[:, positive, negative] + counts[:, negative, positive] + off_diagonal + 1
        return correct, wrong, correct, wrong


def _dirichlet_multinomial_strength(
    counts: FloatArray, mean: FloatArray, bounds: tuple[float, float]
) -> float:
    r"""The concentration :math:`m` that maximises the Dirichlet-multinomial likelihood of the counts.

    Every rater's column ``counts[j, :, c]`` is taken as drawn from a multinomial whose rates follow
    Dirichlet(:math:`m \cdot` ``mean[:, c]``); the log marginal likelihood
    :math:`\sum_{j, c} [\log\Gamma(m) - \log\Gamma(m + N_{jc}) + \sum_l \log\Gamma(m\,\mu_{lc} + n_{jlc})
    - \log\Gamma(m\,\mu_{lc})]` is maximised over :math:`\log m` within ``bounds`` (Minka 2000,
    "Estimating a Dirichlet distribution"). Expected (fractional) counts are used as they are.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import gammaln

    totals = counts.sum(axis=1)  # [worker, true]
    seen = totals > 1e-9
    if not np.any(seen):
        return float(bounds[1])

    def negative(log_m: float) -> float:
        m = np.exp(log_m)
        shape = m * mean[None, :, :]
        column = gammaln(m) - gammaln(m + totals) + (gammaln(shape + counts) - gammaln(shape)).sum(axis=1)
        return -float(column[seen].sum())

    found = minimize_scalar(negative, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(found.x))


@dataclass
class PooledDawidSkene(DawidSkene):
    r"""Dawid-Skene whose raters' confusion matrices share a prior estimated from all raters together.

    A hierarchical (empirical Bayes) Dawid-Skene: column :math:`c` of rater :math:`j`'s matrix has the
    prior Dirichlet(:math:`m\,\mu_c`), where :math:`\mu` is the pooled confusion matrix (every rater's
    expected counts added up, plus the base pseudo-counts ``A``) and the strength :math:`m` is the
    Dirichlet-multinomial maximum-likelihood concentration of the raters' columns around it
    (:func:`_dirichlet_multinomial_strength`), both re-estimated at every M-step:
    :math:`e_j[l, c] \propto n_j[l, c] + A[l, c] + m\,\mu_{lc}` (the base pseudo-counts ``A`` of
    :class:`DawidSkene` stay: the belief that raters beat chance holds for the crowd too).
    A rater with a handful of answers is drawn to how
    the crowd errs (including its systematic confusions, which one-coin cannot express), a rater with
    hundreds keeps their own matrix, and how strongly raters are pooled is read from how much they
    differ, not set by hand. For many sparse raters (crowdsourcing) this sits between full Dawid-Skene,
    which fits noise, and majority vote.

    Args:
        strength_bounds: the range searched for :math:`m` (pseudo-answers per confusion column).
        (the others as :class:`DawidSkene`; ``smoothing`` and ``diag_smoothing`` smooth :math:`\mu`)

    Attributes:
        pool_strength_: the fitted :math:`m`.
        pooled_errors_: the fitted :math:`\mu`, DataFrame observed × true.
    """

    strength_bounds: tuple[float, float] = (0.5, 1000.0)

    pool_strength_: float = field(init=False, repr=False)
    pooled_errors_: pd.DataFrame = field(init=False, repr=False)
    _pooled: FloatArray = field(init=False, repr=False)

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        low, high = self.strength_bounds
        if not (np.isfinite(low) and np.isfinite(high) and 0 < low <= high):
            raise ValueError(f"strength_bounds must be 0 < low <= high, finite, got {self.strength_bounds}")

    def _m_step(
        self, counts: FloatArray, class_counts: FloatArray, alpha: FloatArray, beta: float, used: BoolArray
    ) -> tuple[FloatArray, FloatArray]:
        """MAP prior and confusion matrices under the pooled prior, re-estimated from ``counts``."""
        priors = _class_prior(class_counts, beta)
        pooled = counts.sum(axis=0) + alpha
        pooled = np.maximum(pooled, _EPS)
        mean = pooled / pooled.sum(axis=0, keepdims=True)
        strength = _dirichlet_multinomial_strength(counts, mean, self.strength_bounds)
        self._pooled = strength * mean + alpha
        self.pool_strength_ = strength
        errors = counts + self._pooled[None, :, :]
        errors /= errors.sum(axis=1, keepdims=True)
        return priors, errors

    def _prior_counts(self, alpha: FloatArray) -> FloatArray:
        r"""The pseudo-counts :math:`A + m\,\mu` of the last M-step."""
        return self._pooled

    def fit(self, data: pd.DataFrame, true_labels: pd.Series | None = None) -> PooledDawidSkene:
        """Fit as :meth:`DawidSkene.fit`; also sets ``pool_strength_`` and ``pooled_errors_``."""
        super().fit(data, true_labels)
        classes = self.probas_.columns
        mean = self._pooled - self.pseudo_counts(len(classes))
        mean /= mean.sum(axis=0, keepdims=True)
        self.pooled_errors_ = pd.DataFrame(mean, index=pd.Index(classes, name="label"), columns=classes)
        return self


@dataclass
class PooledOneCoinDawidSkene(OneCoinDawidSkene):
    r"""One-coin Dawid-Skene whose raters' accuracies share a Beta prior estimated from all raters.

    Rater :math:`j`'s accuracy has the prior Beta(:math:`m \bar a, m (1 - \bar a)`), where
    :math:`\bar a` is the pooled accuracy and :math:`m` the Beta-binomial maximum-likelihood
    concentration of the raters' (expected) correct and wrong counts, both re-estimated at every M-step:
    :math:`a_j = (n^{correct}_j + m \bar a) / (n_j + m)`. Raters with few answers are drawn to the
    crowd's accuracy (with :math:`m \to \infty` every rater is equally good and the consensus is a
    majority vote weighted by the class prior); raters with many keep their own.

    Args:
        strength_bounds: the range searched for :math:`m`.

    Attributes:
        pool_strength_: the fitted :math:`m`.
        pooled_accuracy_: the fitted :math:`\bar a`.
    """

    strength_bounds: tuple[float, float] = (0.5, 1000.0)

    pool_strength_: float = field(init=False, repr=False)
    pooled_accuracy_: float = field(init=False, repr=False)
    _pooled: FloatArray = field(init=False, repr=False)

    def _m_step(
        self, counts: FloatArray, class_counts: FloatArray, alpha: FloatArray, beta: float, used: BoolArray
    ) -> tuple[FloatArray, FloatArray]:
        """MAP prior and one-coin matrices under the pooled Beta prior on the accuracies."""
        n_classes = counts.shape[1]
        diag = np.arange(n_classes)
        correct = counts[:, diag, diag].sum(axis=1)
        wrong = counts.sum(axis=(1, 2)) - correct
        pooled = (correct.sum() + np.trace(alpha)) / (correct.sum() + wrong.sum() + alpha.sum())
        pooled = float(np.clip(pooled, 1e-6, 1 - 1e-6))
        binary = np.stack([correct, wrong], axis=1)[:, :, None]  # [worker, (correct, wrong), 1]
        strength = _dirichlet_multinomial_strength(
            binary, np.array([[pooled], [1 - pooled]]), self.strength_bounds
        )
        self.pool_strength_, self.pooled_accuracy_ = strength, pooled
        self._pooled = strength / n_classes * _one_coin(np.array([pooled]), n_classes)[0]
        accuracy = (correct + strength * pooled) / (correct + wrong + strength)
        return _class_prior(class_counts, beta), _one_coin(accuracy, n_classes)

    def _prior_counts(self, alpha: FloatArray) -> FloatArray:
        r"""The pooled pseudo-counts: :math:`m \bar a` correct and :math:`m (1 - \bar a)` wrong per rater."""
        return self._pooled


#: Columns of the long table :class:`MultiLabelConsensus` takes.
MULTI_LABEL_COLUMNS: tuple[str, str, str, str] = ("task", "worker", "label_key", "value")


def _ordered_keys(present: Iterable[Hashable], preferred: Sequence[str]) -> list[Hashable]:
    """Keys in ``preferred`` order first (the schema's head order), then the others as they appear."""
    present = list(dict.fromkeys(present))
    first = [k for k in preferred if k in present]
    return first + [k for k in present if k not in first]


def _gold_by_key(true_labels: pd.DataFrame | None, keys: Sequence[str]) -> dict[str, pd.Series]:
    """A long gold table (``task``, ``label_key``, ``value``) split into one Series per label key."""
    if true_labels is None or len(true_labels) == 0:
        return {}
    frame = check_columns(true_labels, ("task", "label_key", "value"))
    unknown = sorted(set(frame["label_key"].astype(str)) - set(keys))
    if unknown:
        raise ValueError(f"gold label key(s) {unknown} are not among the fitted label keys {list(keys)}")
    return {
        str(key): pd.Series(part["value"].to_numpy(), index=pd.Index(part["task"]), name="label")
        for key, part in frame.groupby("label_key", sort=False)
    }


@dataclass
class MultiLabelConsensus:
    """One independent Dawid-Skene estimator per label key (the diagnosis and each pattern).

    Input is one long table with columns ``task``, ``worker``, ``label_key`` and ``value``: one row per
    (item, rater, label), e.g. ``("img_7", "derm2", "ulceration", 1)``. Rows with the same ``label_key``
    form that label's answer table (``value`` becomes crowd-kit's ``label``), which is fitted by its own
    deep copy of ``base``, created inside :meth:`fit` (crowd-kit's ``aggregators_`` is a class-level
    dict shared by every instance).

    Args:
        base: the estimator to copy for every label (not fitted itself).
        classes: per label key, the full class set (e.g. ``{"spoke_wheel": [0, 1]}`` so a pattern nobody
            marked still fits); keys not listed use ``base.classes``.
        label_keys: the label keys to fit, in this order; default every key in the data, those of
            :data:`labeling_config.TARGETS` first in head order. A listed key absent from the data is an
            error.

    Attributes:
        estimators_: label key -> fitted estimator.
        labels_: DataFrame task × label key of consensus labels (missing where a task has no answer for
            a key).
        probas_: label key -> that estimator's ``probas_``.

    Examples:
        >>> df = pd.DataFrame(
        ...     {
        ...         "task": [1, 1, 1, 2, 2, 2] * 2,
        ...         "worker": ["a", "b", "c"] * 4,
        ...         "label_key": ["bcc"] * 6 + ["ulceration"] * 6,
        ...         "value": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ...     }
        ... )
        >>> mlc = MultiLabelConsensus(classes={"ulceration": [0, 1]}).fit(df)
        >>> mlc.labels_.to_dict("list")
        {'bcc': [1, 0], 'ulceration': [0, 0]}
    """

    base: DawidSkene = field(default_factory=DawidSkene)
    classes: Mapping[str, Sequence[Hashable]] | None = None
    label_keys: Sequence[str] | None = None

    estimators_: dict[str, DawidSkene] = field(init=False, repr=False)
    labels_: pd.DataFrame = field(init=False, repr=False)
    probas_: dict[str, pd.DataFrame] = field(init=False, repr=False)

    def fit(self, data: pd.DataFrame, true_labels: pd.DataFrame | None = None) -> MultiLabelConsensus:
        """Fit one estimator per label key.

        Args:
            data: DataFrame with columns ``task``, ``worker``, ``label_key``, ``value``.
            true_labels: gold labels, a long table ``task``, ``label_key``, ``value`` (one row per task
                and key); each key's rows go to its estimator's ``fit`` as ``true_labels``.

        Returns:
            self, fitted.

        Raises:
            ValueError: a missing column, an empty table, a NaN label key, a listed key with no rows,
                a gold label key that is not fitted, or any error of the per-key estimator (the message
                names the key).
        """
        # Imported here so that the schema is needed only for the default order.
        from labeling_config import TARGETS

        frame = check_columns(data, MULTI_LABEL_COLUMNS)
        if frame["label_key"].isna().any():
            raise ValueError(f"{int(frame['label_key'].isna().sum())} row(s) have no label_key (NaN or None)")
        present = pd.unique(frame["label_key"])
        if self.label_keys is None:
            keys = [str(k) for k in _ordered_keys(present, TARGETS)]
        else:
            keys = list(self.label_keys)
            absent = [k for k in keys if k not in set(present)]
            if absent:
                raise ValueError(f"label key(s) {absent} have no rows in data (present: {list(present)})")
        answers = frame.rename(columns={"value": "label"})
        groups = dict(tuple(answers.groupby("label_key", sort=False)[["task", "worker", "label"]]))
        gold = _gold_by_key(true_labels, keys)
        estimators: dict[str, DawidSkene] = {}
        for key in keys:
            estimator = copy.deepcopy(self.base)
            if self.classes is not None and key in self.classes:
                estimator.classes = list(self.classes[key])
            try:
                estimator.fit(groups[key], gold.get(key))
            except ValueError as err:
                raise ValueError(f"label {key!r}: {err}") from err
            estimators[key] = estimator
        self.estimators_ = estimators
        self.probas_ = {key: est.probas_ for key, est in estimators.items()}
        self.labels_ = pd.DataFrame({key: est.labels_ for key, est in estimators.items()})
        self.labels_.index.name = "task"
        return self

    def fit_predict(self, data: pd.DataFrame, true_labels: pd.DataFrame | None = None) -> pd.DataFrame:
        """Fit and return the consensus labels, task × label key (see :meth:`fit`)."""
        return self.fit(data, true_labels).labels_

    def rater_reliability(self, level: float = 0.95) -> pd.DataFrame:
        """Sensitivity / specificity with intervals of each binary label, with a ``label_key`` column.

        Args:
            level: coverage of the intervals.

        Returns:
            The rows of :meth:`DawidSkene.rater_reliability` for each binary label key (multiclass keys
            are left out), with ``label_key`` as first column.
        """
        frames = [
            est.rater_reliability(level=level).assign(label_key=key)
            for key, est in self.estimators_.items()
            if len(est.priors_) == 2
        ]
        if not frames:
            return pd.DataFrame()
        out = pd.concat(frames, ignore_index=True)
        return out[["label_key", *[c for c in out.columns if c != "label_key"]]]
