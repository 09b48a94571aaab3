"""Agreement statistics: equal to scikit-learn's Cohen's kappa and crowd-kit's Krippendorff alpha; Fleiss' kappa."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from consensus.agreement import (
    fleiss_kappa,
    krippendorff_alpha,
    pairwise_cohen_kappa,
    percent_agreement,
    rater_vs_consensus,
)

ROOT = Path(__file__).resolve().parents[2]


def crowd_answers(name: str) -> pd.DataFrame:
    """answers.csv of a ../shared/data/crowd set, or skip saying where it was looked for."""
    shared = Path(os.environ.get("DERMASSIST_SHARED", ROOT.parent / "shared")).resolve()
    path = shared / "data" / "crowd" / name / "answers.csv"
    if not path.exists():
        pytest.skip(f"{path} is absent (set DERMASSIST_SHARED to the folder holding data/)")
    return pd.read_csv(path)


def synthetic(n_items: int, n_raters: int, n_classes: int, missing: float, seed: int) -> pd.DataFrame:
    """Raters who copy a latent label with probability 0.7, else answer at random; some answers missing."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes, n_items)
    rows = []
    for j in range(n_raters):
        copy = rng.random(n_items) < 0.7
        label = np.where(copy, truth, rng.integers(0, n_classes, n_items))
        keep = rng.random(n_items) >= missing
        rows.append(pd.DataFrame({"task": np.flatnonzero(keep), "worker": f"r{j}", "label": label[keep]}))
    return pd.concat(rows, ignore_index=True)


def from_counts(counts: list[list[int]]) -> pd.DataFrame:
    """A long table from an item × category count table (raters named by position)."""
    rows = [
        (i, f"r{k}", c)
        for i, row in enumerate(counts)
        for k, c in enumerate(c for c, n in enumerate(row) for _ in range(n))
    ]
    return pd.DataFrame(rows, columns=["task", "worker", "label"])


SYNTHETIC = {
    "binary, 4 raters": (300, 4, 2, 0.0, 0),
    "binary, 4 raters, 20% missing": (300, 4, 2, 0.2, 1),
    "7 classes, 6 raters, 30% missing": (400, 6, 7, 0.3, 2),
    "3 classes, 2 raters": (200, 2, 3, 0.0, 3),
}


def _check_pairs_against_sklearn(answers: pd.DataFrame, limit: int = 300) -> int:
    table = answers.pivot(index="task", columns="worker", values="label")
    pairs = pairwise_cohen_kappa(answers)
    assert len(pairs) > 0
    checked = 0
    for row in pairs.sort_values("n_items", ascending=False).head(limit).itertuples():
        both = table[[row.worker_a, row.worker_b]].dropna()
        assert row.n_items == len(both)
        assert row.percent_agreement == pytest.approx((both[row.worker_a] == both[row.worker_b]).mean())
        a, b = both[row.worker_a], both[row.worker_b]
        if a.nunique() == 1 and b.nunique() == 1 and a.iloc[0] == b.iloc[0]:
            assert np.isnan(row.kappa)  # 0 / 0: scikit-learn warns and returns NaN
            continue
        assert row.kappa == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
        checked += 1
    return checked


@pytest.mark.parametrize("params", list(SYNTHETIC.values()), ids=list(SYNTHETIC))
def test_pairwise_cohen_kappa_equals_sklearn_on_synthetic_data(params):
    answers = synthetic(*params)
    n_raters = params[1]
    assert _check_pairs_against_sklearn(answers) == n_raters * (n_raters - 1) // 2


@pytest.mark.parametrize("dataset", ["dermx_dx", "dermx_ak", "cf_weather"])
def test_pairwise_cohen_kappa_equals_sklearn_on_real_sets(dataset):
    answers = crowd_answers(dataset)
    assert _check_pairs_against_sklearn(answers) > 0


@pytest.mark.parametrize("params", list(SYNTHETIC.values()), ids=list(SYNTHETIC))
def test_krippendorff_alpha_equals_crowd_kit_on_synthetic_data(params):
    metrics = pytest.importorskip("crowdkit.metrics.data")
    answers = synthetic(*params)
    assert krippendorff_alpha(answers) == pytest.approx(metrics.alpha_krippendorff(answers), abs=1e-12)


@pytest.mark.parametrize(
    ("dataset", "published"),
    # The value in ../shared/data/crowd/README.md, computed there with crowd-kit.
    [("dermx_dx", 0.8122), ("cf_weather", 0.5768), ("s4_dog", 0.5194), ("ds1979_anaesthesia", 0.5826)],
)
def test_krippendorff_alpha_equals_crowd_kit_on_real_sets(dataset, published):
    metrics = pytest.importorskip("crowdkit.metrics.data")
    answers = crowd_answers(dataset)
    ours = krippendorff_alpha(answers)
    assert ours == pytest.approx(metrics.alpha_krippendorff(answers), abs=1e-12)
    assert ours == pytest.approx(published, abs=5e-5)


def test_krippendorff_alpha_counts_repeated_rows_and_skips_single_ratings_as_crowd_kit():
    metrics = pytest.importorskip("crowdkit.metrics.data")
    answers = synthetic(100, 3, 3, 0.5, seed=4)
    answers = pd.concat([answers, answers.iloc[:10]], ignore_index=True)  # repeated (task, worker) rows
    assert (answers.groupby("task").size() == 1).any()
    assert krippendorff_alpha(answers) == pytest.approx(metrics.alpha_krippendorff(answers), abs=1e-12)


# Fleiss (1971) as worked on Wikipedia ("Fleiss' kappa", worked example): 10 items, 14 raters, 5 categories.
FLEISS_EXAMPLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


@pytest.mark.parametrize(
    ("counts", "kappa", "agreement"),
    [
        (FLEISS_EXAMPLE, 0.20993, 0.37802),
        ([[2, 0], [0, 2], [2, 0]], 1.0, 1.0),  # perfect agreement
        ([[1, 1], [1, 1], [1, 1], [1, 1]], -1.0, 0.0),  # two raters who always disagree, balanced classes
        # Varying numbers of raters: P_i = 1, 1/3, 1 (mean 7/9); p = (3/8, 5/8), P_e = 17/32 -> 71/135.
        ([[2, 0], [1, 2], [0, 3]], 71 / 135, 7 / 9),
    ],
)
def test_fleiss_kappa_and_percent_agreement(counts, kappa, agreement):
    answers = from_counts(counts)
    assert fleiss_kappa(answers) == pytest.approx(kappa, abs=5e-6)
    assert percent_agreement(answers) == pytest.approx(agreement, abs=5e-6)


def test_fleiss_kappa_leaves_out_items_with_one_rating():
    answers = from_counts([[2, 0], [1, 2], [0, 3]])
    lone = pd.DataFrame({"task": [99, 98], "worker": ["r0", "r0"], "label": [0, 1]})
    with_lone = pd.concat([answers, lone], ignore_index=True)
    assert fleiss_kappa(with_lone) == fleiss_kappa(answers)
    assert percent_agreement(with_lone) == percent_agreement(answers)


def test_single_class_agreement():
    answers = from_counts([[3], [2], [4]])
    assert percent_agreement(answers) == 1.0
    assert krippendorff_alpha(answers) == 1.0  # crowd-kit's convention for 0 / 0
    assert np.isnan(fleiss_kappa(answers))
    assert np.isnan(pairwise_cohen_kappa(answers)["kappa"]).all()


@pytest.mark.parametrize("params", list(SYNTHETIC.values()), ids=list(SYNTHETIC))
def test_rater_vs_consensus_equals_sklearn(params):
    answers = synthetic(*params)
    consensus = answers.groupby("task")["label"].agg(lambda s: s.mode().iloc[0])
    consensus = consensus.iloc[: int(len(consensus) * 0.9)]  # some tasks without a consensus
    table = rater_vs_consensus(answers, consensus).set_index("worker")
    joined = answers.join(consensus.rename("ref"), on="task", how="inner")
    for worker, rows in joined.groupby("worker"):
        assert table.loc[worker, "n_items"] == len(rows)
        assert table.loc[worker, "percent_agreement"] == pytest.approx((rows["label"] == rows["ref"]).mean())
        assert table.loc[worker, "kappa"] == pytest.approx(
            cohen_kappa_score(rows["label"], rows["ref"]), abs=1e-12
        )


def test_rater_vs_consensus_with_a_consensus_class_no_rater_used():
    answers = pd.DataFrame({"task": [1, 2, 3], "worker": ["a", "a", "a"], "label": ["x", "x", "y"]})
    table = rater_vs_consensus(answers, pd.Series({1: "x", 2: "z", 3: "y"}))
    assert table.loc[0, "percent_agreement"] == pytest.approx(2 / 3)


GOOD = pd.DataFrame({"task": [1, 1, 2, 2], "worker": ["a", "b", "a", "b"], "label": [0, 1, 1, 1]})


@pytest.mark.parametrize(
    "statistic", [percent_agreement, fleiss_kappa, krippendorff_alpha, pairwise_cohen_kappa]
)
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (GOOD.drop(columns="worker"), r"missing column\(s\) \['worker'\]"),
        (GOOD.iloc[:0], "data is empty"),
        (GOOD.assign(label=[0, None, 1, 1]), "have no label"),
        (GOOD.assign(worker=["a", None, "a", "b"]), "have no worker id"),
    ],
)
def test_bad_tables_raise_value_errors(statistic, data, message):
    with pytest.raises(ValueError, match=message):
        statistic(data)


@pytest.mark.parametrize("statistic", [percent_agreement, fleiss_kappa, krippendorff_alpha])
def test_no_item_with_two_ratings(statistic):
    with pytest.raises(ValueError, match="no item has ratings from two raters"):
        statistic(GOOD.assign(task=[1, 2, 3, 4]))


def test_pairwise_kappa_refuses_duplicate_ratings():
    with pytest.raises(ValueError, match=r"rated the same task more than once"):
        pairwise_cohen_kappa(pd.concat([GOOD, GOOD.iloc[[0]]], ignore_index=True))


@pytest.mark.parametrize(
    ("consensus", "message"),
    [
        (pd.Series({1: 0, 2: None}), "NaN label"),
        (pd.Series({7: 0, 8: 1}), "no task of data has a consensus label"),
    ],
)
def test_rater_vs_consensus_bad_consensus(consensus, message):
    with pytest.raises(ValueError, match=message):
        rater_vs_consensus(GOOD, consensus)


def test_rater_vs_consensus_unknown_class():
    with pytest.raises(ValueError, match=r"consensus labels \[2\] are not in classes \[0, 1\]"):
        rater_vs_consensus(GOOD, pd.Series({1: 0, 2: 2}), classes=[0, 1])


def test_bootstrap_interval_covers_the_statistic_and_widens_when_lesions_repeat():
    from consensus.agreement import bootstrap_interval, fleiss_kappa

    rng = np.random.default_rng(0)
    rows = []
    for item in range(60):
        truth = int(rng.random() < 0.4)
        rows += [(item, f"r{j}", truth if rng.random() < 0.85 else 1 - truth) for j in range(4)]
    one = pd.DataFrame(rows, columns=["task", "worker", "label"])
    # Every lesion photographed five times: 300 images, but only 60 independent lesions.
    copies = pd.concat([one.assign(task=one["task"] * 10 + k) for k in range(5)], ignore_index=True)
    lesions = {t: t // 10 for t in copies["task"].unique()}
    kappa = fleiss_kappa(copies)
    naive = bootstrap_interval(copies, fleiss_kappa, n_boot=300)
    grouped = bootstrap_interval(copies, fleiss_kappa, groups=lesions, n_boot=300)
    assert naive[0] < kappa < naive[1] and grouped[0] < kappa < grouped[1]
    assert (grouped[1] - grouped[0]) > 1.6 * (naive[1] - naive[0])  # about sqrt(5) wider
    assert bootstrap_interval(copies, fleiss_kappa, groups=lesions, n_boot=300) == grouped  # seeded
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval(copies, fleiss_kappa, n_boot=0)
