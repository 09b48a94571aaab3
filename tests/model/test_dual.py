"""The dual-encoder classifier: shapes, branches, metadata with missing values, lesion crops, Grad-CAM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labeling_config import HAM_CLASSES, SEXES, SITES
from model.common.explain import explain
from model.lesion.dual import (
    DualNet,
    ImageBranch,
    build_dual,
    encode_metadata,
    lesion_box,
    lesion_crop,
    split_logits,
)

ROWS = [
    {"age": 55.0, "sex": "female", "localization": "trunk"},
    {"age": float("nan"), "sex": None, "localization": "planet mars"},
]


def small(**kwargs) -> DualNet:
    torch.manual_seed(0)
    return DualNet(width_mult=0.35, dim=32, heads=2, **kwargs).eval()


def test_metadata_encoding_handles_missing_and_unknown_values():
    meta = encode_metadata(ROWS)
    assert meta.age.tolist() == pytest.approx([0.55, 0.0])
    assert meta.age_missing.tolist() == [0.0, 1.0]
    assert SEXES[meta.sex[0]] == "female" and SEXES[meta.sex[1]] == "unknown"
    assert SITES[meta.site[0]] == "trunk" and SITES[meta.site[1]] == "unknown"
    assert encode_metadata([{"age": "abc", "site": "Face"}]).site.tolist() == [SITES.index("face")]


@pytest.mark.parametrize(("lesion", "metadata"), [(True, True), (True, False), (False, True), (False, False)])
def test_every_ablation_gives_seven_diagnoses_and_bcc(lesion, metadata):
    model = small(use_lesion=lesion, use_metadata=metadata)
    images = torch.rand(2, 3, 64, 64)
    logits = model(
        images, torch.rand(2, 3, 64, 64) if lesion else None, encode_metadata(ROWS) if metadata else None
    )
    assert logits.shape == (2, len(HAM_CLASSES) + 1)
    diagnosis, bcc = split_logits(logits)
    assert torch.allclose(diagnosis.sum(1), torch.ones(2)) and ((bcc > 0) & (bcc < 1)).all()


def test_a_missing_branch_input_is_a_clear_error():
    with pytest.raises(ValueError, match="lesion crop"):
        small()(torch.rand(1, 3, 64, 64), None, encode_metadata(ROWS[:1]))
    with pytest.raises(ValueError, match="metadata"):
        small()(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), None)


def test_the_answer_depends_on_the_lesion_and_the_age():
    model = small()
    lesion = torch.rand(1, 3, 64, 64, requires_grad=True)
    meta = encode_metadata(ROWS[:1])
    age = meta.age.clone().requires_grad_(True)
    logits = model(torch.rand(1, 3, 64, 64), lesion, type(meta)(age, meta.age_missing, meta.sex, meta.site))
    logits.sum().backward()
    assert lesion.grad is not None and lesion.grad.abs().sum() > 0
    assert age.grad is not None and age.grad.abs().sum() > 0


def test_gradients_reach_both_encoders_and_the_metadata():
    model = small().train()
    loss = model(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), encode_metadata(ROWS)).sum()
    loss.backward()
    for part in (model.image_encoder, model.lesion_encoder, model.metadata, model.cross):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_lesion_box_and_crop():
    mask = np.zeros((100, 80), dtype=bool)
    mask[20:40, 10:50] = True
    assert lesion_box(mask, margin=0.0) == (20, 10, 40, 50)
    assert lesion_box(mask, margin=0.5) == (10, 0, 50, 70)
    assert lesion_box(np.zeros((5, 6))) == (0, 0, 5, 6)  # no lesion: the whole image
    image = torch.zeros(3, 100, 80)
    image[:, 20:40, 10:50] = 1.0
    crop = lesion_crop(image, mask, size=32, margin=0.0)
    assert crop.shape == (3, 32, 32) and crop.mean() > 0.95  # only the lesion is left


def test_grad_cam_of_every_output_through_the_explain_module():
    model = small()
    images = torch.rand(2, 3, 64, 64)
    branch = ImageBranch(model, torch.rand(2, 3, 64, 64), encode_metadata(ROWS))
    result = explain(branch, images, method="autograd")
    assert result.cams.shape == (2, len(HAM_CLASSES) + 1, 64, 64)
    assert torch.allclose(result.logits, model(images, branch.lesion, branch.meta), atol=1e-5)
    assert float(result.cams.amax()) == pytest.approx(1.0)


def test_imagenet_start_loads_both_encoders_or_says_where_the_file_goes(monkeypatch, tmp_path):
    import model.common.imagenet as imagenet

    monkeypatch.setattr(imagenet, "imagenet_weights_path", lambda: tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match=r"make weights"):
        build_dual("imagenet")
    with pytest.raises(ValueError, match=r"width 1\.0"):
        build_dual("imagenet", width_mult=0.5)
    state = {f"features.{k}": v for k, v in DualNet().image_encoder.state_dict().items()}
    path = tmp_path / imagenet.IMAGENET_FILE
    torch.save(state, path)
    monkeypatch.setattr(imagenet, "imagenet_weights_path", lambda: path)
    monkeypatch.setattr(imagenet, "file_sha256", lambda _p: imagenet.IMAGENET_SHA256_PREFIX)
    model = build_dual("imagenet")
    first = next(iter(state))
    key = first.removeprefix("features.")
    assert torch.equal(model.image_encoder.state_dict()[key], state[first])
    assert torch.equal(model.lesion_encoder.state_dict()[key], state[first])
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), encode_metadata(ROWS[:1]))
    assert math.isfinite(float(out.sum()))
