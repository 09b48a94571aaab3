"""Evaluation: metrics on known answers, lesion bootstrap, map agreement, and the report end to end."""

import json

import numpy as np
import pytest
import torch

from labeling_config import PATTERN_KEYS
from model.common.checkpoint import save_checkpoint
from model.common.metrics import bootstrap, map_agreement
from model.multitask.evaluate import evaluate, threshold_metrics
from model.multitask.network import CheckpointMeta, DermNet


def test_threshold_metrics_on_a_known_confusion_matrix():
    # 3 TP, 1 FN, 2 FP, 4 TN
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    d = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    m = threshold_metrics(y, d)
    assert m["recall"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)


def test_bootstrap_resamples_whole_lesions():
    values = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    lesions = np.array(["a", "a", "b", "b", "c", "c"])
    seen = []

    def stat(rows):
        seen.append(rows)
        return {"mean": float(values[rows].mean())}

    out = bootstrap(stat, lesions, n_boot=200, seed=0)
    assert out["mean"]["value"] == pytest.approx(4 / 6)
    assert out["mean"]["low"] <= out["mean"]["value"] <= out["mean"]["high"]
    assert out["mean"]["low"] == 0.0 and out["mean"]["high"] == 1.0
    for rows in seen[1:]:
        counts = np.bincount(rows, minlength=6)
        assert (counts[0::2] == counts[1::2]).all()  # the two images of a lesion travel together


def test_map_agreement_rewards_maps_inside_the_mask():
    mask = np.zeros((64, 64), bool)
    mask[8:24, 40:56] = True
    inside = np.zeros((8, 8), np.float32)
    inside[2, 6] = 1.0  # feature cell over the mask
    outside = np.zeros((8, 8), np.float32)
    outside[6, 1] = 1.0
    good, bad = map_agreement(inside, mask), map_agreement(outside, mask)
    assert good["pointing"] == 1.0 and bad["pointing"] == 0.0
    assert good["energy_inside"] > 3 * good["area"] > bad["energy_inside"]
    assert good["iou"] > 0.2 and bad["iou"] == 0.0


def test_evaluate_writes_metrics_predictions_and_a_self_contained_report(small_study, tmp_path):
    torch.manual_seed(0)
    model = DermNet(width_mult=0.35)
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, model, CheckpointMeta(input_size=64, width_mult=0.35))
    metrics = evaluate(ckpt, small_study, tmp_path / "eval", n_boot=20, gallery=2)
    assert metrics["split"] == "all"  # not trained on this table
    cls = metrics["classification"]
    assert cls["n_images"] == 40
    for name in (
        "accuracy",
        "precision",
        "recall",
        "specificity",
        "f1",
        "balanced_accuracy",
        "auroc",
        "auprc",
    ):
        entry = cls["bcc"][name]
        assert entry["low"] <= entry["value"] <= entry["high"] or np.isnan(entry["value"])
    assert set(cls["patterns"]) <= set(PATTERN_KEYS) and len(cls["patterns"]) >= 5
    crit = cls["criteria"]
    assert 0 <= crit["bcc_with_a_bcc_pattern_detected"] <= 1
    assert (
        crit["reference_labels"]["bcc_with_a_bcc_pattern"] > 0.9
    )  # the synthetic truth follows the criterion
    expl = metrics["explanations"]
    assert expl["bcc"]["n"] == cls["n_bcc"]
    assert any(k in expl for k in PATTERN_KEYS)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["model_version"] == metrics["model_version"]
    assert (tmp_path / "eval" / "predictions.csv").read_text().count("\n") == 41
    report = (tmp_path / "eval" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4  # curves, confusion, BCC gallery, pattern gallery
    assert "Clinical criteria" in report and 'src="http' not in report


def test_evaluate_on_the_training_table_uses_the_validation_split(small_study, tmp_path):
    from model.multitask.train import TrainConfig, train

    result = train(TrainConfig(data=str(small_study), out=str(tmp_path / "run"), epochs=1, batch_size=8,
                               image_size=64, width_mult=0.35, max_steps_per_epoch=1, progress=False))  # fmt: skip
    metrics = evaluate(result.best, small_study, tmp_path / "eval", n_boot=5)
    assert metrics["split"] == "val"
    assert metrics["classification"]["n_images"] == result.meta.extra["n_val"]
    with pytest.raises(ValueError, match="split must be"):
        evaluate(result.best, small_study, tmp_path / "x", split="test")


def test_other_cam_methods_are_selectable_for_evaluation(small_study, tmp_path):
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "best.pt", DermNet(width_mult=0.35), CheckpointMeta(input_size=64, width_mult=0.35)
    )
    metrics = evaluate(tmp_path / "best.pt", small_study, tmp_path / "eval", n_boot=5, cam_method="gradcam++")
    assert metrics["cam_method"] == "gradcam++"
    assert metrics["explanations"]["bcc"]["n"] == metrics["classification"]["n_bcc"]
    with pytest.raises(ValueError, match="unknown CAM method 'magic'"):
        evaluate(tmp_path / "best.pt", small_study, tmp_path / "x", cam_method="magic")
