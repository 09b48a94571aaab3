"""Gold labels in Dawid-Skene, the pooled-prior rater models, and choosing the rater model by held-out answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from consensus.dawid_skene import (
    DawidSkene,
    MultiLabelConsensus,
    OneCoinDawidSkene,
    PooledDawidSkene,
    PooledOneCoinDawidSkene,
)
from consensus.selection import SelectedDawidSkene, default_candidates

from .test_dawid_skene import PLAIN, accuracy, crowd_set, four_raters, multiclass_raters


def sparse_crowd(n_items: int, n_raters: int, per_item: int, accuracy_range: tuple[float, float], seed: int):
    """Binary answers from many one-coin raters, ``per_item`` distinct raters per item."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n_items) < 0.4).astype(int)
    acc = rng.uniform(*accuracy_range, n_raters)
    rows = []
    for i, t in enumerate(truth):
        for j in rng.choice(n_raters, per_item, replace=False):
            rows.append((i, f"w{j}", t if rng.random() < acc[j] else 1 - t))
    return pd.DataFrame(rows, columns=["task", "worker", "label"]), pd.Series(truth)


# --- gold labels ------------------------------------------------------------------------------------


def test_gold_items_keep_their_known_class_and_count():
    answers, truth = four_raters(400, seed=3)
    gold = truth.iloc[:40]
    ds = DawidSkene().fit(answers, true_labels=gold)
    assert ds.n_gold_ == 40
    np.testing.assert_array_equal(ds.labels_.loc[gold.index].to_numpy(), gold.to_numpy())
    assert np.allclose(ds.probas_.loc[gold.index].max(axis=1), 1.0)
    # A gold task that has no answers is ignored; without gold nothing is counted.
    extra = pd.concat([gold, pd.Series([1], index=[10_000])])
    assert DawidSkene().fit(answers, true_labels=extra).n_gold_ == 40
    assert DawidSkene().fit(answers).n_gold_ == 0


def test_gold_that_contradicts_the_raters_moves_their_estimates():
    """Four raters who always say 1 on half the items that are truly 0: only gold can reveal it."""
    rng = np.random.default_rng(0)
    truth = np.array([1] * 100 + [0] * 100)
    said = np.where((truth == 0) & (np.arange(200) % 2 == 0), 1, truth)
    rows = [
        (i, f"d{j}", int(said[i]) if rng.random() < 0.95 else 1 - int(said[i]))
        for i in range(200)
        for j in range(4)
    ]
    answers = pd.DataFrame(rows, columns=["task", "worker", "label"])
    gold_index = np.arange(0, 200, 5)
    gold = pd.Series(truth[gold_index], index=gold_index)
    without = DawidSkene().fit(answers).rater_reliability()
    with_gold = DawidSkene().fit(answers, true_labels=gold).rater_reliability()
    # The true specificity is about 0.5; the raters' agreement alone says about 0.96.
    assert without["specificity"].mean() > 0.9
    assert with_gold["specificity"].mean() < without["specificity"].mean() - 0.15


def test_plain_em_with_gold_equals_crowd_kit_true_labels():
    crowdkit = pytest.importorskip("crowdkit.aggregation")
    answers, truth = multiclass_raters(300, 3, (0.8, 0.6, 0.55, 0.7), seed=4)
    gold = truth.iloc[::4]
    theirs = crowdkit.DawidSkene(n_iter=30, tol=-math.inf).fit_predict_proba(answers, true_labels=gold)
    ours = DawidSkene(n_iter=30, tol=-math.inf, **PLAIN).fit_predict_proba(answers, true_labels=gold)
    theirs = theirs.reindex(index=ours.index, columns=ours.columns)
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("gold", "message"),
    [
        (pd.Series([7], index=[0]), "not among the classes"),
        (pd.Series([np.nan], index=[0]), "missing"),
        (pd.Series([0, 1], index=[0, 0]), "twice"),
        ([0, 1], "pandas Series"),
    ],
)
def test_bad_gold_is_a_clear_error(gold, message):
    answers, _ = four_raters(50, seed=1)
    with pytest.raises(ValueError, match=message):
        DawidSkene().fit(answers, true_labels=gold)


def test_multi_label_consensus_takes_gold_per_label():
    answers, truth = four_raters(200, seed=5)
    long = pd.concat(
        [answers.assign(label_key="bcc"), answers.assign(label_key="ulceration", label=1 - answers["label"])]
    ).rename(columns={"label": "value"})
    gold = pd.DataFrame({"task": truth.index[:20], "label_key": "ulceration", "value": 1 - truth.iloc[:20]})
    mlc = MultiLabelConsensus().fit(long, true_labels=gold)
    assert mlc.estimators_["ulceration"].n_gold_ == 20
    assert mlc.estimators_["bcc"].n_gold_ == 0
    with pytest.raises(ValueError, match="label key"):
        MultiLabelConsensus().fit(long, true_labels=gold.assign(label_key="spoke_wheel"))


# --- held-out answer likelihood ------------------------------------------------------------------------


def test_answer_log_likelihood_is_the_posterior_weighted_rate():
    answers, _ = four_raters(200, seed=2)
    ds = DawidSkene().fit(answers)
    row = answers.iloc[[7]]
    task, worker, label = row.iloc[0]
    expected = float((ds.probas_.loc[task] * ds.errors_.loc[(worker, label)]).sum())
    assert ds.answer_log_likelihood(row)[0] == pytest.approx(math.log(expected))
    # An unseen task uses the class prior; an unseen rater the prior's mean confusion matrix.
    unseen = pd.DataFrame({"task": [-1], "worker": ["nobody"], "label": [1]})
    mean = ds.prior_counts_ / ds.prior_counts_.sum(axis=0)
    assert ds.answer_log_likelihood(unseen)[0] == pytest.approx(math.log(float(ds.priors_ @ mean[1])))
    with pytest.raises(ValueError, match="not among the fitted classes"):
        ds.answer_log_likelihood(unseen.assign(label=5))


# --- pooled priors ------------------------------------------------------------------------------------


def test_pooled_strength_is_large_for_alike_raters_and_small_for_different_ones():
    alike, _ = four_raters(2000, seed=0, sens=(0.85,) * 4, spec=(0.9,) * 4)
    unlike, _ = four_raters(2000, seed=0, sens=(0.98, 0.6, 0.95, 0.55), spec=(0.6, 0.98, 0.55, 0.97))
    assert PooledDawidSkene().fit(alike).pool_strength_ > 100
    assert PooledDawidSkene().fit(unlike).pool_strength_ < 20
    assert PooledOneCoinDawidSkene().fit(alike).pool_strength_ > 100


def test_pooled_models_beat_full_dawid_skene_on_many_sparse_raters():
    answers, truth = sparse_crowd(600, 300, 5, (0.6, 0.9), seed=1)
    full = accuracy(DawidSkene(**PLAIN).fit_predict(answers), truth)
    for estimator in (PooledDawidSkene(), PooledOneCoinDawidSkene()):
        assert accuracy(estimator.fit_predict(answers), truth) > full + 0.01


@pytest.mark.parametrize("estimator", [PooledDawidSkene, PooledOneCoinDawidSkene])
def test_pooled_models_report_reliability_with_intervals(estimator):
    answers, _ = four_raters(500, seed=6)
    table = estimator().fit(answers).rater_reliability()
    assert len(table) == 4
    assert (
        (table["sensitivity_low"] <= table["sensitivity"])
        & (table["sensitivity"] <= table["sensitivity_high"])
    ).all()


# --- choosing the rater model ---------------------------------------------------------------------------


def test_selection_prefers_a_pooled_or_one_coin_model_for_many_sparse_raters():
    answers, truth = sparse_crowd(600, 300, 5, (0.6, 0.9), seed=2)
    selected = SelectedDawidSkene().fit(answers)
    assert selected.choice_ in {"one_coin", "pooled", "pooled_one_coin"}
    assert selected.criterion_[selected.choice_] > selected.criterion_["full"]
    assert accuracy(selected.labels_, truth) >= accuracy(DawidSkene(**PLAIN).fit_predict(answers), truth)


def test_selection_prefers_per_rater_matrices_when_raters_err_differently():
    """Four raters with opposite biases on 3,000 items: pooling them throws information away."""
    answers, _ = four_raters(3000, seed=3, sens=(0.98, 0.6, 0.95, 0.55), spec=(0.6, 0.98, 0.55, 0.97))
    candidates = {"one_coin": OneCoinDawidSkene(), "full": DawidSkene()}
    selected = SelectedDawidSkene(candidates=candidates).fit(answers)
    assert selected.choice_ == "full"
    assert selected.criterion_se_["one_coin"] > 0 and selected.criterion_se_["full"] == 0


def test_selection_behaves_as_the_chosen_estimator_and_records_why():
    answers, _ = four_raters(300, seed=4)
    selected = SelectedDawidSkene(random_state=1).fit(answers)
    chosen = type(default_candidates()[selected.choice_])
    assert isinstance(selected.estimator_, chosen)
    pd.testing.assert_frame_equal(selected.probas_, selected.estimator_.probas_)
    assert len(selected.rater_reliability()) == 4
    record = selected.selection()
    assert record["choice"] == selected.choice_ and set(record["scores"]) == set(default_candidates())
    # The same seed gives the same folds, hence the same criterion, whatever the rows' order.
    again = SelectedDawidSkene(random_state=1).fit(answers.sample(frac=1.0, random_state=3))
    assert again.criterion_ == selected.criterion_ and again.choice_ == selected.choice_


def test_selection_errors_are_clear():
    answers, _ = four_raters(50, seed=1)
    with pytest.raises(ValueError, match="n_folds"):
        SelectedDawidSkene(n_folds=1).fit(answers)
    with pytest.raises(ValueError, match="empty"):
        SelectedDawidSkene(candidates={}).fit(answers)
    with pytest.raises(AttributeError, match="before fit"):
        _ = SelectedDawidSkene().probas_


def test_selection_as_the_base_of_multi_label_consensus_chooses_per_label():
    crowd, _ = sparse_crowd(300, 150, 5, (0.6, 0.9), seed=3)
    four, _ = four_raters(300, seed=3, sens=(0.98, 0.6, 0.95, 0.55), spec=(0.6, 0.98, 0.55, 0.97))
    long = pd.concat([crowd.assign(label_key="a"), four.assign(label_key="b")]).rename(
        columns={"label": "value"}
    )
    mlc = MultiLabelConsensus(base=SelectedDawidSkene()).fit(long)
    assert set(mlc.estimators_) == {"a", "b"}
    assert all(hasattr(est, "choice_") for est in mlc.estimators_.values())


@pytest.mark.parametrize("dataset", ["dermx_ak", "dermx_dx", "temp"])
def test_selection_on_real_sets_matches_the_better_of_crowd_kit_ds_and_majority_vote(dataset):
    crowdkit = pytest.importorskip("crowdkit.aggregation")
    folder = crowd_set(dataset)
    answers = pd.read_csv(folder / "answers.csv")
    truth = pd.read_csv(folder / "truth.csv").set_index("task")["label"]
    target = max(
        accuracy(crowdkit.DawidSkene().fit_predict(answers), truth),
        accuracy(crowdkit.MajorityVote().fit_predict(answers), truth),
    )
    assert accuracy(SelectedDawidSkene().fit_predict(answers), truth) >= target - 0.005
