"""Training the dual-encoder classifier on a tiny table: targets, weights, checkpoints, ablation switches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from labeling_config import HAM_CLASSES
from model.data import load_table
from model.train_dual import DualConfig, DualDataset, class_weights, collate, load_dual, metrics, train_dual


@pytest.fixture(scope="module")
def ham_like(small_study) -> pd.DataFrame:
    """The small synthetic study relabelled with HAM10000 diagnoses (bcc stays bcc)."""
    table = load_table(small_study)
    others = iter(["akiec", "bkl"] * len(table))
    table["dx"] = ["bcc" if b else next(others) for b in table["bcc"]]  # enough of each class to split
    return table


def test_dataset_gives_image_lesion_metadata_and_targets(ham_like):
    batch = collate([DualDataset(ham_like, 64, 48)[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["lesion"].shape == (3, 3, 48, 48)
    assert batch["meta"].age.shape == (3,)
    assert all(0 <= d < len(HAM_CLASSES) for d in batch["dx"].tolist())


def test_rows_without_a_ham_diagnosis_train_only_the_bcc_head(small_study):
    table = load_table(small_study)  # synthetic dx is "bcc" / "non-bcc"
    items = [DualDataset(table, 64, 48)[i] for i in range(len(table))]
    assert {i["dx"] for i in items if i["bcc"] == 0} == {-100}


def test_class_weights_are_inverse_frequency_and_capped():
    weights = class_weights(np.array([0, 0, 0, 1, -100]), cap=10.0)
    assert weights[1] == pytest.approx(3 * weights[0]) and float(weights[2:].sum()) == 0.0
    assert float(class_weights(np.array([0] * 100 + [1]), cap=5.0).max()) == 5.0


def test_metrics_on_known_predictions():
    pred = {
        "probs": np.eye(7)[[0, 1, 2, 3]] * 0.9 + 0.01,
        "dx": np.array([0, 1, 2, 3]),
        "bcc": np.array([0.9, 0.1, 0.2, 0.3]),
        "y_bcc": np.array([1.0, 0.0, 0.0, 0.0]),
        "image_id": ["a", "b", "c", "d"],
    }
    found = metrics(pred)
    assert found["balanced_accuracy"] == 1.0 and found["auroc_bcc"] == 1.0 and found["auroc_macro"] == 1.0


@pytest.mark.parametrize(("lesion", "metadata"), [(True, True), (False, False)])
def test_train_dual_writes_checkpoints_that_load(ham_like, tmp_path, lesion, metadata):
    config = DualConfig(data="unused", out=str(tmp_path / "run"), width_mult=0.35, use_lesion=lesion,
                        use_metadata=metadata, image_size=64, lesion_size=48, epochs=2, batch_size=8,
                        max_steps_per_epoch=2, val_fraction=0.25, progress=False)  # fmt: skip
    result = train_dual(config, ham_like)
    assert result["best"].is_file() and (tmp_path / "run" / "history.csv").is_file()
    assert len(result["history"]) == 2 and "auroc_bcc" in result["metrics"]
    model, meta = load_dual(result["best"])
    assert (model.use_lesion, model.use_metadata) == (lesion, metadata)
    assert meta["config"]["image_size"] == 64
    with torch.no_grad():
        batch = collate([DualDataset(ham_like, 64, 48)[0]])
        logits = model(
            batch["image"], batch["lesion"] if lesion else None, batch["meta"] if metadata else None
        )
    assert logits.shape == (1, 8)


def test_load_dual_refuses_other_checkpoints(tmp_path):
    torch.save({"arch": "segnet"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a dual-encoder checkpoint"):
        load_dual(tmp_path / "x.pt")
