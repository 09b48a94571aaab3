"""Evaluation bootstraps over lesions (or patients), not images: the width that duplication hides, the
image bootstrap without groups, which groups a table gives, and evaluate's report saying what it resampled."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from model.common.checkpoint import save_checkpoint
from model.common.metrics import bootstrap, bootstrap_means, resampling
from model.multitask.evaluate import evaluate
from model.multitask.network import CheckpointMeta, DermNet

COPIES = 5


def duplicated_lesions(n_lesions: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and scores of ``n_lesions`` lesions, each photographed ``COPIES`` times (identical rows)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_lesions)
    score = y + rng.normal(0, 1.2, n_lesions)
    lesion = np.array([f"L{i:03d}" for i in range(n_lesions)], dtype=object)
    return np.repeat(y, COPIES), np.repeat(score, COPIES), np.repeat(lesion, COPIES)


def width(entry: dict[str, float]) -> float:
    return entry["high"] - entry["low"]


def test_five_images_per_lesion_widen_the_auroc_interval_by_about_sqrt5():
    y, score, lesion = duplicated_lesions()

    def auroc(rows: np.ndarray) -> dict[str, float]:
        return {"auroc": float(roc_auc_score(y[rows], score[rows]))}

    images = bootstrap(auroc, None, n_boot=1000, seed=0, n=len(y))["auroc"]
    lesions = bootstrap(auroc, lesion, n_boot=1000, seed=0)["auroc"]
    assert lesions["value"] == images["value"] == pytest.approx(roc_auc_score(y[::COPIES], score[::COPIES]))
    assert width(lesions) / width(images) == pytest.approx(np.sqrt(COPIES), rel=0.2)


def test_five_images_per_lesion_widen_the_interval_of_a_mean_by_about_sqrt5():
    _, score, lesion = duplicated_lesions(n_lesions=300, seed=1)
    images = bootstrap_means({"score": score}, None, n_boot=2000, seed=0)["score"]
    lesions = bootstrap_means({"score": score}, lesion, n_boot=2000, seed=0)["score"]
    assert lesions["mean"] == images["mean"] == pytest.approx(score.mean())
    assert width(lesions) / width(images) == pytest.approx(np.sqrt(COPIES), rel=0.15)


def test_without_groups_rows_are_resampled_as_with_one_group_per_row_and_seeded():
    values = np.random.default_rng(3).normal(size=60)
    own = np.array([f"img{i}" for i in range(60)], dtype=object)

    def mean(rows: np.ndarray) -> dict[str, float]:
        return {"mean": float(values[rows].mean())}

    plain = bootstrap(mean, None, n_boot=200, seed=4, n=60)
    assert plain == bootstrap(mean, own, n_boot=200, seed=4)
    assert plain == bootstrap(mean, None, n_boot=200, seed=4, n=60)  # deterministic
    assert plain != bootstrap(mean, None, n_boot=200, seed=5, n=60)
    assert bootstrap_means({"v": values}, None, 200, 4) == bootstrap_means({"v": values}, own, 200, 4)
    with pytest.raises(ValueError, match="number of rows"):
        bootstrap(mean, None, n_boot=10, seed=0)
    with pytest.raises(ValueError, match="group keys for"):
        bootstrap(mean, own, n_boot=10, seed=0, n=59)


def test_resampling_takes_patients_then_lesions_then_images():
    table = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e", "f"],
            "lesion_id": ["L1", "L1", "L2", "L3", None, "L4"],
            "patient_id": ["P1", "P1", "P1", None, "", "P2"],
        }
    )
    found = resampling(table)
    assert found.unit == "patient" and found.n_units == 4 and found.n_images == 6
    # Rows without a patient are their lesion's group (an image without a lesion, its own).
    assert list(found.groups) == ["patient:P1"] * 3 + ["lesion:L3", "lesion:e", "patient:P2"]
    assert found.describe() == "bootstrap over 4 patients (6 images)"
    lesions = resampling(table, "lesion")
    assert lesions.n_units == 5 and lesions.describe() == "bootstrap over 5 lesions (6 images)"
    assert resampling(table.drop(columns="patient_id")).unit == "lesion"
    assert resampling(table, "lesion").subset(np.array([0, 1, 3])).n_units == 2
    # load_table gives an image without a lesion id its own id: then the images are resampled.
    own = table.assign(lesion_id=table["image_id"]).drop(columns="patient_id")
    images = resampling(own)
    assert images.unit == "image" and images.groups is None
    assert images.as_dict() == {
        "unit": "image",
        "n_units": 6,
        "n_images": 6,
        "text": "bootstrap over 6 images",
    }
    with pytest.raises(ValueError, match="no patient_id column"):
        resampling(own, "patient")
    with pytest.raises(ValueError, match="unit must be"):
        resampling(table, "lesions")


@pytest.fixture
def tiny_dermnet(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "best.pt"
    save_checkpoint(path, DermNet(width_mult=0.35), CheckpointMeta(input_size=64, width_mult=0.35))
    return path


def test_evaluate_resamples_the_datasets_lesions_and_says_so(
    small_study, tiny_dermnet, tmp_path, monkeypatch
):
    import model.multitask.evaluate as evaluation

    seen: list[np.ndarray | None] = []

    def spy(statistic, groups=None, n_boot=1000, seed=0, *, n=None):
        seen.append(groups)
        return bootstrap(statistic, groups, n_boot, seed, n=n)

    monkeypatch.setattr(evaluation, "bootstrap", spy)
    lesion_ids = pd.read_csv(small_study / "labels.csv", dtype=str)["lesion_id"]
    metrics = evaluate(tiny_dermnet, small_study, tmp_path / "eval", n_boot=10, gallery=1)
    n_lesions = lesion_ids.nunique()
    assert 1 < n_lesions < len(lesion_ids)  # the synthetic study has lesions with several images
    assert metrics["bootstrap"] == {
        "replicates": 10,
        "seed": 0,
        "interval": "95% percentile",
        "unit": "lesion",
        "n_units": n_lesions,
        "n_images": len(lesion_ids),
        "text": f"bootstrap over {n_lesions} lesions ({len(lesion_ids)} images)",
    }
    assert [str(k).removeprefix("lesion:") for k in seen[0]] == lesion_ids.tolist()  # the BCC metrics
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["bootstrap"]["unit"] == "lesion"
    report = (tmp_path / "eval" / "report.html").read_text()
    assert f"95% bootstrap over {n_lesions} lesions ({len(lesion_ids)} images), 10 replicates" in report

    before = len(seen)
    images = evaluate(tiny_dermnet, small_study, tmp_path / "images", n_boot=10, gallery=1, unit="image")
    assert images["bootstrap"]["unit"] == "image" and all(g is None for g in seen[before:])
    assert "95% bootstrap over 40 images, 10 replicates" in (tmp_path / "images" / "report.html").read_text()
    bcc, bcc_images = metrics["classification"]["bcc"], images["classification"]["bcc"]
    assert bcc["auroc"]["value"] == bcc_images["auroc"]["value"]  # the point estimate does not move
    with pytest.raises(ValueError, match="unit must be"):
        evaluate(tiny_dermnet, small_study, tmp_path / "x", unit="lesions")


def test_evaluate_resamples_patients_where_the_labels_name_them(small_study, tiny_dermnet, tmp_path):
    data = tmp_path / "study"
    shutil.copytree(small_study, data)
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    labels["patient_id"] = [f"P{i // 8}" for i in range(len(labels))]  # five patients
    labels.to_csv(data / "labels.csv", index=False)
    metrics = evaluate(tiny_dermnet, data, tmp_path / "eval", n_boot=10, gallery=1)
    assert metrics["bootstrap"]["unit"] == "patient" and metrics["bootstrap"]["n_units"] == 5
    assert "95% bootstrap over 5 patients (40 images)" in (tmp_path / "eval" / "report.html").read_text()
