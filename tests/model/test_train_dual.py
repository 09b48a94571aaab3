"""Training the dual-encoder classifier on a tiny table: targets, weights, checkpoints, ablation switches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from labeling_config import HAM_CLASSES
from model.common.data import load_table
from model.lesion.train_dual import (
    DualConfig,
    DualDataset,
    class_weights,
    collate,
    load_dual,
    metrics,
    train_dual,
)


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
    from model.lesion.segmentation import SegMeta, save_segnet
    from model.lesion.unet import SegNet

    torch.save({"arch": "segnet"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a dermassist checkpoint"):
        load_dual(tmp_path / "x.pt")
    save_segnet(tmp_path / "seg.pt", SegNet(width_mult=0.35, input_size=64), SegMeta())
    with pytest.raises(ValueError, match=r"holds a 'segnet-mobilenet_v2' model.*reads dual-encoder"):
        load_dual(tmp_path / "seg.pt")


def test_evaluate_dual_scores_the_validation_split_with_maps(ham_like, tmp_path):
    from model.lesion.evaluate_dual import evaluate_dual
    from model.lesion.train_dual import split_rows

    config = DualConfig(data="unused", out=str(tmp_path / "run"), width_mult=0.35, image_size=64,
                        lesion_size=48, epochs=1, batch_size=8, max_steps_per_epoch=2, val_fraction=0.25,
                        progress=False)  # fmt: skip
    best = train_dual(config, ham_like)["best"]
    found = evaluate_dual(best, "unused", tmp_path / "eval", n_boot=20, gallery_size=2, table=ham_like)

    train_idx, val_idx = split_rows(ham_like, config)
    per_image = pd.read_csv(tmp_path / "eval" / "per_image.csv")
    assert set(per_image["image_id"]) == set(ham_like["image_id"].iloc[val_idx])
    assert not set(per_image["image_id"]) & set(ham_like["image_id"].iloc[train_idx])
    # The explain pass gives the same probabilities as the plain forward pass.
    model, _ = load_dual(best)
    rows = ham_like.set_index("image_id").loc[per_image["image_id"]].reset_index()
    batch = collate([DualDataset(rows, 64, 48)[i] for i in range(len(rows))])
    with torch.no_grad():
        probs = model(batch["image"], batch["lesion"], batch["meta"])[:, :7].softmax(1).numpy()
    np.testing.assert_allclose(per_image[[f"p_{c}" for c in HAM_CLASSES]].to_numpy(), probs, atol=1e-5)
    for name in ("balanced_accuracy", "auroc_bcc"):
        entry = found[name]
        assert 0.0 <= entry["low"] <= entry["value"] <= entry["high"] <= 1.0
    cam = found["gradcam_predicted_class"]
    assert cam["n"] == len(per_image) and 0.0 <= cam["energy_inside"]["value"] <= 1.0
    assert 0.0 < cam["area"]["value"] < 1.0
    assert found["lesion_masks"] == "reference"
    assert "data:image/png;base64," in (tmp_path / "eval" / "report.html").read_text()


def test_evaluate_dual_crops_with_a_segmentation_networks_masks(ham_like, tmp_path):
    from model.lesion.evaluate_dual import evaluate_dual
    from model.lesion.segmentation import SegMeta, save_segnet
    from model.lesion.unet import SegNet

    config = DualConfig(data="unused", out=str(tmp_path / "run"), width_mult=0.35, image_size=64,
                        lesion_size=48, epochs=1, batch_size=8, max_steps_per_epoch=1, val_fraction=0.25,
                        progress=False)  # fmt: skip
    best = train_dual(config, ham_like)["best"]
    seg = tmp_path / "seg.pt"
    save_segnet(seg, SegNet(width_mult=0.35, input_size=64), SegMeta())
    found = evaluate_dual(
        best, "unused", tmp_path / "eval", segnet=seg, n_boot=5, gallery_size=0, table=ham_like
    )
    assert found["lesion_masks"].startswith("predicted by")
    assert 0.0 <= found["predicted_mask_dice"]["value"] <= 1.0
    assert len(list((tmp_path / "eval" / "predicted-masks").glob("*.png"))) == found["n"]


def test_evaluate_dual_refuses_an_unknown_split(tmp_path):
    from model.lesion.evaluate_dual import evaluate_dual

    with pytest.raises(ValueError, match="split must be"):
        evaluate_dual(tmp_path / "x.pt", "unused", tmp_path / "eval", split="test")


def test_a_unet_split_by_diagnosis_validates_on_the_dual_encoders_images(ham_like):
    from model.common.data import split_by_lesion
    from model.lesion.train_dual import split_rows
    from model.lesion.train_seg import rows_with_masks

    dual_val = split_rows(ham_like, DualConfig(data="-", val_fraction=0.25))[1]
    seg_rows = rows_with_masks(ham_like)
    seg_val = split_by_lesion(seg_rows, 0.25, seed=0, stratify="dx")[1]
    assert set(ham_like["image_id"].iloc[dual_val]) == set(seg_rows["image_id"].iloc[seg_val])
