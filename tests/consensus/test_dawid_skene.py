"""Dawid-Skene EM: recovery on synthetic raters, calibration, crowd-kit equivalence, real crowd sets, bad input."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from consensus.dawid_skene import (
    DawidSkene,
    MultiLabelConsensus,
    OneCoinDawidSkene,
    majority_vote,
    majority_vote_proba,
)

ROOT = Path(__file__).resolve().parents[2]


def crowd_set(name: str) -> Path:
    """A folder of ../shared/data/crowd, or skip saying where it was looked for (as conftest.shared_path)."""
    shared = Path(os.environ.get("DERMASSIST_SHARED", ROOT.parent / "shared")).resolve()
    path = shared / "data" / "crowd" / name
    if not path.exists():
        pytest.skip(f"{path} is absent (set DERMASSIST_SHARED to the folder holding data/)")
    return path


SENS = (0.92, 0.85, 0.80, 0.88)
SPEC = (0.95, 0.90, 0.85, 0.75)


def four_raters(
    n_items: int,
    seed: int,
    sens: tuple[float, ...] = SENS,
    spec: tuple[float, ...] = SPEC,
    prevalence: float = 0.3,
    missing: float = 0.15,
) -> tuple[pd.DataFrame, pd.Series]:
    """Binary answers of raters with known sensitivity / specificity; each rater skips ~15% of items."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n_items) < prevalence).astype(int)
    frames = []
    answered_any = np.zeros(n_items, bool)
    for j, (se, sp) in enumerate(zip(sens, spec, strict=True)):
        answered = rng.random(n_items) >= missing
        if j == len(sens) - 1:
            answered |= ~answered_any  # every item keeps at least one answer
        answered_any |= answered
        p_positive = np.where(truth == 1, se, 1 - sp)
        label = (rng.random(n_items) < p_positive).astype(int)
        items = np.flatnonzero(answered)
        frames.append(pd.DataFrame({"task": items, "worker": f"derm{j + 1}", "label": label[items]}))
    answers = pd.concat(frames, ignore_index=True)
    return answers, pd.Series(truth, name="label").rename_axis("task")


def multiclass_raters(
    n_items: int, n_classes: int, accuracies: tuple[float, ...], seed: int
) -> tuple[pd.DataFrame, pd.Series]:
    """K-class answers: rater j is right with its accuracy, else confuses with the next class."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(
        n_classes, size=n_items, p=np.linspace(2, 1, n_classes) / np.linspace(2, 1, n_classes).sum()
    )
    frames = []
    for j, acc in enumerate(accuracies):
        right = rng.random(n_items) < acc
        wrong = np.where(
            rng.random(n_items) < 0.7, (truth + 1) % n_classes, rng.integers(0, n_classes, n_items)
        )
        frames.append(
            pd.DataFrame({"task": np.arange(n_items), "worker": j, "label": np.where(right, truth, wrong)})
        )
    return pd.concat(frames, ignore_index=True), pd.Series(truth)


def accuracy(labels: pd.Series, truth: pd.Series) -> float:
    truth = truth[truth.index.isin(labels.index)]
    return float((labels.reindex(truth.index) == truth).mean())


PLAIN = {"smoothing": 0.0, "diag_smoothing": 0.0, "prior_smoothing": 0.0}


# --- recovery and calibration on synthetic four-rater data -------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_sensitivity_and_specificity_of_four_raters(seed):
    answers, truth = four_raters(5000, seed)
    ds = DawidSkene().fit(answers)
    rel = ds.rater_reliability().set_index("worker").loc[[f"derm{j}" for j in (1, 2, 3, 4)]]
    np.testing.assert_allclose(rel["sensitivity"], SENS, atol=0.03)
    np.testing.assert_allclose(rel["specificity"], SPEC, atol=0.03)

    # Against the rates measured with the true labels (no sampling noise): the estimator's own error.
    joined = answers.join(truth.rename("true"), on="task")
    pos = joined[joined["true"] == 1].groupby("worker")["label"].mean()
    neg = 1 - joined[joined["true"] == 0].groupby("worker")["label"].mean()
    np.testing.assert_allclose(rel["sensitivity"], pos.loc[rel.index], atol=0.015)
    np.testing.assert_allclose(rel["specificity"], neg.loc[rel.index], atol=0.015)
    # The 95% intervals hold the point estimate, and most hold the true value.
    assert (rel["sensitivity_low"] <= rel["sensitivity"]).all() and (
        rel["sensitivity"] <= rel["sensitivity_high"]
    ).all()
    covered = np.r_[
        (rel["sensitivity_low"] <= SENS) & (np.array(SENS) <= rel["sensitivity_high"]),
        (rel["specificity_low"] <= SPEC) & (np.array(SPEC) <= rel["specificity_high"]),
    ]
    assert covered.mean() >= 0.75
    assert ds.converged_
    assert accuracy(ds.labels_, truth) > accuracy(majority_vote(answers), truth)


def test_posteriors_are_calibrated():
    answers, truth = four_raters(20000, seed=5)
    p = DawidSkene().fit_predict_proba(answers)[1]
    y = truth.reindex(p.index).to_numpy()
    bins = np.minimum((p.to_numpy() * 10).astype(int), 9)
    gaps, weights = [], []
    for b in range(10):
        in_bin = bins == b
        if in_bin.sum() >= 200:
            gap = abs(p.to_numpy()[in_bin].mean() - y[in_bin].mean())
            assert gap < 0.05, (
                f"bin {b / 10:.1f}-{(b + 1) / 10:.1f}: |mean posterior - positive rate| = {gap:.3f}"
            )
            gaps.append(gap)
            weights.append(in_bin.sum())
    assert len(gaps) >= 4  # the posteriors are spread, not just 0 and 1
    assert np.average(gaps, weights=weights) < 0.02  # expected calibration error


def test_seven_class_diagnosis_beats_majority_vote():
    answers, truth = multiclass_raters(3000, 7, (0.85, 0.75, 0.65, 0.7), seed=3)
    ds = DawidSkene().fit(answers)
    assert list(ds.probas_.columns) == list(range(7))
    assert accuracy(ds.labels_, truth) > accuracy(majority_vote(answers), truth) + 0.02
    # Each rater's "confuse with the next class" habit is learned: P(c+1 | c) is the largest error.
    errors = ds.errors_.loc[0].to_numpy()  # observed × true for rater 0
    for c in range(7):
        column = errors[:, c].copy()
        column[c] = -1
        assert column.argmax() == (c + 1) % 7


def test_one_coin_recovers_accuracies():
    accs = (0.9, 0.8, 0.7, 0.6)
    answers, _ = four_raters(5000, seed=4, sens=accs, spec=accs, prevalence=0.5, missing=0.0)
    oc = OneCoinDawidSkene().fit(answers)
    rel = oc.rater_reliability().set_index("worker")
    np.testing.assert_allclose(rel["sensitivity"].to_numpy(), accs, atol=0.03)
    np.testing.assert_array_equal(rel["sensitivity"], rel["specificity"])
    errors = oc.errors_.to_numpy().reshape(4, 2, 2)
    np.testing.assert_allclose(errors[:, 0, 0], errors[:, 1, 1])


# --- the EM itself -----------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [DawidSkene, OneCoinDawidSkene])
@pytest.mark.parametrize("hyper", [{}, PLAIN, {"smoothing": 1.0, "diag_smoothing": 0.0}])
def test_objective_never_decreases(estimator, hyper):
    answers, _ = multiclass_raters(800, 4, (0.8, 0.6, 0.5, 0.7, 0.4), seed=8)
    ds = estimator(n_iter=60, tol=-math.inf, **hyper).fit(answers)
    history = np.array(ds.loss_history_)
    assert len(history) == ds.n_iter_ == 60 and not ds.converged_
    assert (np.diff(history) >= -1e-9).all(), "EM must not decrease its MAP objective"


def test_log_likelihood_matches_a_direct_computation():
    answers, _ = four_raters(300, seed=9)
    ds = DawidSkene().fit(answers)
    # sum_i log sum_c pi_c prod_answers e[w, l, c], one item at a time.
    expected = 0.0
    for _, item in answers.groupby("task"):
        likelihood = ds.priors_.to_numpy().copy()
        for worker, label in zip(item["worker"], item["label"], strict=True):
            likelihood *= ds.errors_.loc[(worker, label)].to_numpy()
        expected += math.log(likelihood.sum())
    assert ds.log_likelihood_ == pytest.approx(expected, rel=1e-9)


def test_fitted_attributes_have_crowd_kit_shapes():
    answers, _ = four_raters(200, seed=10)
    ds = DawidSkene().fit(answers)
    assert ds.probas_.shape == (answers["task"].nunique(), 2)
    np.testing.assert_allclose(ds.probas_.sum(axis=1), 1.0)
    assert ds.errors_.index.names == ["worker", "label"] and list(ds.errors_.columns) == [0, 1]
    np.testing.assert_allclose(ds.errors_.groupby(level="worker").sum().to_numpy(), 1.0)
    assert ds.priors_.sum() == pytest.approx(1.0) and ds.priors_.name == "prior"
    assert ds.labels_.index.equals(ds.probas_.index)
    assert (ds.labels_ == ds.probas_.idxmax(axis=1)).all()
    assert ds.fit_predict(answers).equals(ds.labels_)
    with pytest.raises(AttributeError):
        _ = DawidSkene().labels_


def test_ties_are_broken_by_random_state_not_by_label_order():
    # 400 items where two raters disagree and nothing else is known: every posterior is a tie.
    n = 400
    answers = pd.DataFrame(
        {
            "task": np.repeat(np.arange(n), 2),
            "worker": np.tile(["a", "b"], n),
            "label": np.tile([0, 1], n),
        }
    )
    first = DawidSkene(random_state=1).fit_predict(answers)
    again = DawidSkene(random_state=1).fit_predict(answers)
    other = DawidSkene(random_state=2).fit_predict(answers)
    assert first.equals(again)
    assert not first.equals(other)
    assert 0.35 < first.mean() < 0.65  # crowd-kit would give every tie to label 0
    mv = majority_vote(answers, random_state=1)
    assert 0.35 < mv.mean() < 0.65 and mv.equals(majority_vote(answers, random_state=1))


def test_sparse_raters_missing_answers_and_a_rater_with_one_answer():
    answers, truth = four_raters(500, seed=11)
    extra = pd.DataFrame({"task": [3], "worker": ["visitor"], "label": [int(truth[3])]})
    ds = DawidSkene().fit(pd.concat([answers, extra], ignore_index=True))
    rel = ds.rater_reliability().set_index("worker")
    assert rel.loc["visitor", "n_items"] == 1
    # One answer moves the smoothed rates only a little from the prior, never to 0 or 1.
    assert 0.5 < rel.loc["visitor", "sensitivity"] < 1 and 0.5 < rel.loc["visitor", "specificity"] < 1
    assert rel.loc["visitor", "sensitivity_high"] - rel.loc["visitor", "sensitivity_low"] > 0.3


def test_smoothing_keeps_four_raters_off_zero_one_error_rates():
    # 30 items, four raters who never disagree: maximum likelihood says error rate 0.
    answers = pd.DataFrame(
        {
            "task": np.repeat(np.arange(30), 4),
            "worker": np.tile(list("abcd"), 30),
            "label": np.repeat(np.arange(30) % 3 == 0, 4).astype(int),
        }
    )
    plain = DawidSkene(**PLAIN).fit(answers)
    smoothed = DawidSkene().fit(answers)
    assert plain.rater_reliability()["sensitivity"].max() > 1 - 1e-6
    rel = smoothed.rater_reliability()
    assert (rel["sensitivity"] < 1 - 1e-3).all() and (rel["specificity"] < 1 - 1e-3).all()
    # Four agreeing votes make an item very likely, not certain: plain ML leaves ~1e-40 for the other class.
    assert plain.probas_.to_numpy().min() < 1e-20 < 1e-12 < smoothed.probas_.to_numpy().min()


@pytest.mark.parametrize(
    ("classes", "expected_columns"),
    [([0, 1], [0, 1]), ([1, 0], [1, 0]), ([0, 1, 2], [0, 1, 2])],
)
def test_classes_nobody_marked(classes, expected_columns):
    answers = pd.DataFrame(
        {"task": np.repeat(np.arange(20), 4), "worker": np.tile(list("abcd"), 20), "label": 0}
    )
    ds = DawidSkene(classes=classes).fit(answers)
    assert list(ds.probas_.columns) == expected_columns
    assert (ds.labels_ == 0).all()
    assert (ds.probas_[0] > 0.9).all()
    assert np.isfinite(ds.errors_.to_numpy()).all()


def test_repeated_task_worker_rows_count_as_answers():
    base = pd.DataFrame({"task": [1, 1, 1, 2, 2, 2], "worker": list("abcabc"), "label": [0, 0, 1, 1, 1, 0]})
    doubled = pd.concat([base, base.iloc[[2]]], ignore_index=True)  # rater c says 1 twice on task 1
    p_single = DawidSkene(**PLAIN, n_iter=1).fit(base).probas_.loc[1, 1]
    p_double = DawidSkene(**PLAIN, n_iter=1).fit(doubled).probas_.loc[1, 1]
    assert p_double > p_single


def test_majority_vote_proba_rows_are_vote_shares():
    answers = pd.DataFrame({"task": [1, 1, 1, 2], "worker": list("abca"), "label": ["x", "y", "y", "x"]})
    proba = majority_vote_proba(answers)
    assert proba.loc[1].tolist() == pytest.approx([1 / 3, 2 / 3]) and proba.loc[2].tolist() == [1.0, 0.0]


# --- crowd-kit equivalence with smoothing off ---------------------------------------------------------


def _crowdkit_ds(answers: pd.DataFrame, n_iter: int) -> pd.DataFrame:
    crowdkit = pytest.importorskip("crowdkit.aggregation")
    return crowdkit.DawidSkene(n_iter=n_iter, tol=-math.inf).fit_predict_proba(answers)


@pytest.mark.parametrize("n_classes", [2, 5])
def test_plain_em_equals_crowd_kit_on_synthetic_data(n_classes):
    answers, _ = multiclass_raters(400, n_classes, (0.8, 0.6, 0.55, 0.7, 0.5, 0.65), seed=n_classes)
    answers = answers.sample(frac=0.8, random_state=1)  # raters missing on some items
    theirs = _crowdkit_ds(answers, n_iter=30)
    ours = DawidSkene(n_iter=30, tol=-math.inf, **PLAIN).fit_predict_proba(answers)
    theirs = theirs.reindex(index=ours.index, columns=ours.columns)
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), atol=1e-6)


# Small real sets where crowd-kit's 100 iterations take under a second each.
@pytest.mark.parametrize("dataset", ["cf_weather", "dermx_dx"])
def test_plain_em_labels_equal_crowd_kit_ds100_on_real_sets(dataset):
    answers = pd.read_csv(crowd_set(dataset) / "answers.csv")
    theirs = _crowdkit_ds(answers, n_iter=100).idxmax(axis=1)
    ours = DawidSkene(n_iter=100, tol=-math.inf, **PLAIN).fit_predict(answers)
    assert (ours == theirs.reindex(ours.index)).mean() >= 0.995


# --- accuracy on the real crowd sets with the default settings --------------------------------------

# crowd-kit 1.4.2 on this project's machines (pandas 2.3): accuracy of DawidSkene(n_iter=100, tol=-inf)
# and of MajorityVote (ties to the smallest label). bench/consensus.py measures them afresh.
CROWDKIT_DS100_AND_MV = {
    "bluebirds": (0.8981, 0.7593),
    "cf_weather": (0.7833, 0.9),
    "cf_weather_amt": (0.8367, 0.8467),
    "chexpert_test": (0.9217, 0.9217),
    "d_jn_product": (0.9397, 0.8966),
    "dermx_ak": (0.97, 0.9541),
    "dermx_dx": (0.864, 0.8428),
    "music_genre": (0.7671, 0.71),
    "rte": (0.9275, 0.9187),
    "s4_dog": (0.8426, 0.8178),
    "s4_face": (0.6404, 0.6301),
    "s4_relevance": (0.6155, 0.5357),
    "s5_adult": (0.7477, 0.7628),
    "sp": (0.915, 0.8896),
    "sp_amt": (0.944, 0.944),
    "temp": (0.9416, 0.9394),
}


@pytest.mark.parametrize("dataset", sorted(CROWDKIT_DS100_AND_MV))
def test_default_settings_match_the_better_of_ds100_and_majority_vote(dataset):
    folder = crowd_set(dataset)
    answers = pd.read_csv(folder / "answers.csv")
    truth = pd.read_csv(folder / "truth.csv").set_index("task")["label"]
    ours = accuracy(DawidSkene().fit_predict(answers), truth)  # only tasks with answers count (s5_adult)
    ds100, mv = CROWDKIT_DS100_AND_MV[dataset]
    assert ours >= max(ds100, mv) - 0.005, f"{dataset}: ours {ours:.4f}, crowd-kit DS100 {ds100}, MV {mv}"


# --- multi-label wrapper -------------------------------------------------------------------------------


def _multi_label_table() -> pd.DataFrame:
    bcc, _ = four_raters(300, seed=20)
    ulcer, _ = four_raters(300, seed=21, prevalence=0.1)
    nobody = bcc.assign(label=0)  # a pattern no rater marked
    return pd.concat(
        [
            bcc.assign(label_key="bcc"),
            ulcer.assign(label_key="ulceration"),
            nobody.assign(label_key="spoke_wheel"),
        ],
        ignore_index=True,
    ).rename(columns={"label": "value"})


def test_multi_label_fits_one_independent_estimator_per_key():
    table = _multi_label_table()
    base = DawidSkene(n_iter=50)
    first = MultiLabelConsensus(base=base, classes={"spoke_wheel": [0, 1]}).fit(table)
    second = MultiLabelConsensus(base=base, classes={"spoke_wheel": [0, 1]})
    assert list(first.estimators_) == ["bcc", "ulceration", "spoke_wheel"]  # labeling_config head order
    assert not hasattr(base, "labels_")  # the base is copied, never fitted
    assert not hasattr(second, "estimators_")  # no state shared between instances
    ids = {id(est) for est in first.estimators_.values()}
    assert len(ids) == 3 and id(base) not in ids
    for key in ("bcc", "ulceration"):
        alone = DawidSkene(n_iter=50).fit_predict(
            table[table["label_key"] == key].rename(columns={"value": "label"})
        )
        assert first.labels_[key].astype(int).sort_index().equals(alone.rename(key).sort_index())
    assert (first.labels_["spoke_wheel"] == 0).all()
    rel = first.rater_reliability()
    assert set(rel["label_key"]) == {"bcc", "ulceration", "spoke_wheel"} and len(rel) == 12


def test_multi_label_errors_name_the_label():
    table = _multi_label_table()
    with pytest.raises(ValueError, match=r"label 'spoke_wheel': only one class \(0\) is observed"):
        MultiLabelConsensus().fit(table)
    with pytest.raises(ValueError, match=r"label key\(s\) \['maple_leaf'\] have no rows"):
        MultiLabelConsensus(label_keys=["bcc", "maple_leaf"]).fit(table)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label_key'\]"):
        MultiLabelConsensus().fit(table.drop(columns="label_key"))


def test_multi_label_deep_copies_a_fitted_base_without_touching_it():
    answers, _ = four_raters(100, seed=22)
    base = DawidSkene().fit(answers)
    before = copy.deepcopy(base.labels_)
    MultiLabelConsensus(base=base, classes={"spoke_wheel": [0, 1]}).fit(_multi_label_table())
    assert base.labels_.equals(before)


# --- bad input -----------------------------------------------------------------------------------------

GOOD = pd.DataFrame({"task": [1, 1, 2, 2], "worker": ["a", "b", "a", "b"], "label": [0, 1, 1, 1]})


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (GOOD.drop(columns="label"), {}, r"missing column\(s\) \['label'\]"),
        (GOOD.drop(columns=["task", "worker"]), {}, r"missing column\(s\) \['task', 'worker'\]"),
        (GOOD.iloc[:0], {}, "data is empty"),
        (GOOD.assign(label=[0, np.nan, 1, 1]), {}, r"1 answer\(s\), e\.g\. at row\(s\) \[1\] have no label"),
        (GOOD.assign(worker=["a", None, "a", "b"]), {}, "have no worker id"),
        (GOOD.assign(worker=["a", np.nan, np.nan, "b"]), {}, r"2 answer\(s\).*no worker id"),
        (GOOD.assign(task=[1, np.nan, 2, 2]), {}, "have no task id"),
        (GOOD.assign(label=1), {}, r"only one class \(1\) is observed.*pass classes="),
        (
            GOOD.assign(label=[0, 1, 2, "x"]),
            {"classes": [0, 1]},
            r"label value\(s\) \[2, 'x'\] are not in classes \[0, 1\]",
        ),
        (GOOD, {"classes": [1]}, "at least two distinct values"),
        (GOOD, {"classes": [0, 0, 1]}, "at least two distinct values"),
        (GOOD, {"smoothing": -1.0}, "smoothing must be a finite pseudo-count"),
        (GOOD, {"n_iter": 0}, "n_iter must be at least 1"),
    ],
)
@pytest.mark.parametrize("estimator", [DawidSkene, OneCoinDawidSkene])
def test_bad_input_raises_a_value_error_naming_the_problem(estimator, data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimator(**kwargs).fit(data)


def test_not_a_dataframe_is_a_type_error():
    with pytest.raises(TypeError, match="expected a pandas DataFrame"):
        DawidSkene().fit([(1, "a", 0)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"positive": 7}, r"positive=7 is not one of the classes"), ({"level": 1.0}, "level must be in")],
)
def test_rater_reliability_bad_arguments(kwargs, message):
    ds = DawidSkene().fit(GOOD)
    with pytest.raises(ValueError, match=message):
        ds.rater_reliability(**kwargs)


def test_rater_reliability_needs_a_binary_label():
    answers, _ = multiclass_raters(50, 3, (0.8, 0.7), seed=1)
    with pytest.raises(ValueError, match="need a binary label; this one has 3 classes"):
        DawidSkene().fit(answers).rater_reliability()
