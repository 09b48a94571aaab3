"""SegNet (Atiq & Fattah's lesion segmenter): shapes, gates, metrics on known answers, loss, training, evaluation."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model.common.checkpoint import read_checkpoint
from model.common.metrics import bootstrap_means
from model.lesion.evaluate_seg import evaluate_seg
from model.lesion.masks import boundary_f_score, dice, dice_bce_loss, iou
from model.lesion.segmentation import build_segnet, encoder_weights_path, load_segnet
from model.lesion.train_seg import SegTrainConfig, train_seg
from model.lesion.unet import DualAttentionGate, SegNet, aspp_rates_for
from model.multitask.network import load_checkpoint


def tiny_net(**kwargs) -> SegNet:
    torch.manual_seed(0)
    return SegNet(
        width_mult=0.35, input_size=64, aspp_channels=32, decoder_channels=(32, 24, 16, 16), **kwargs
    )


@pytest.fixture(scope="module")
def net() -> SegNet:
    return tiny_net().eval()


@pytest.fixture(scope="module")
def seg_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight synthetic 64-px images with lesion masks, one of whose masks is removed."""
    from model.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("seg_study")
    generate(SynthConfig(n=8, size=64, raters=0, seed=1), out)
    (out / "masks" / "SYN_000007_segmentation.png").unlink()
    return out


@pytest.fixture(scope="module")
def seg_run(seg_study: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("seg_run")
    config = SegTrainConfig(
        data=str(seg_study), out=str(out), epochs=2, batch_size=4, image_size=64, width_mult=0.35,
        val_fraction=0.5, warmup_steps=1, progress=False, threads=1,
    )  # fmt: skip
    return out, train_seg(config)


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (100, 80)])
def test_logits_have_the_input_size(net, size):
    with torch.no_grad():
        logits, maps = net(torch.rand(2, 3, *size), return_attention=True)
    assert logits.shape == (2, 1, *size)
    assert len(maps) == 4 and all(float(m.min()) > 0 and float(m.max()) < 1 for m in maps)


def test_bad_input_shape_is_rejected(net):
    with pytest.raises(ValueError, match="expected images of shape"):
        net(torch.rand(2, 1, 64, 64))


def test_gradients_reach_encoder_gates_and_decoder():
    model = tiny_net().train()
    loss = dice_bce_loss(model(torch.rand(2, 3, 64, 64)), (torch.rand(2, 1, 64, 64) > 0.5).float())
    loss.backward()
    for name, module in [
        ("encoder stem", model.encoder.features[0]),
        ("ASPP", model.aspp),
        ("spatial gate", model.decoder[3].gate.psi),
        ("channel gate", model.decoder[0].gate.channel),
        ("decoder convs", model.decoder[3].convs),
        ("head", model.head),
    ]:
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_attention_gate_reweights_the_skip_by_the_decoder_signal():
    torch.manual_seed(0)
    gate = DualAttentionGate(skip_channels=8, gate_channels=6, inter_channels=4).eval()
    skip, signal = torch.randn(2, 8, 10, 10), torch.randn(2, 6, 10, 10)
    with torch.no_grad():
        gated = gate(skip, signal)
        unconditioned = gate(skip, torch.zeros_like(signal))
        channel, spatial = gate.attention(skip, signal)
    assert gated.shape == skip.shape
    assert not torch.allclose(gated, skip)
    assert not torch.allclose(gated, unconditioned)  # the decoder signal steers the gate
    assert channel.shape == (2, 8, 1, 1) and spatial.shape == (2, 1, 10, 10)
    assert torch.allclose(gated, skip * channel * spatial)
    assert spatial.std() > 0  # one weight per pixel, not a constant


def test_aspp_rates_keep_deeplabs_ratio_to_the_map_side():
    assert aspp_rates_for(192) == (1, 2, 3)
    assert aspp_rates_for(512) == (3, 6, 9)
    assert aspp_rates_for(64) == (1, 2, 3)  # strictly increasing even on a 2 x 2 map
    assert tiny_net().aspp_rates == (1, 2, 3)


@pytest.mark.parametrize("encoder", ["efficientnet_b3", "resnet34"])
def test_other_encoders_give_the_same_output_shape(encoder):
    model = SegNet(encoder=encoder, input_size=64).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 48)).shape == (1, 1, 64, 48)


def test_width_mult_only_scales_mobilenet_and_unknown_encoders_are_named():
    with pytest.raises(ValueError, match="width_mult applies to mobilenet_v2 only"):
        SegNet(encoder="resnet34", width_mult=0.5)
    with pytest.raises(ValueError, match="unknown encoder 'vgg16'"):
        SegNet(encoder="vgg16")


def test_imagenet_weights_absent_fail_with_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"^ImageNet weights for the mobilenet_v2 encoder are not at .*\.$"
    ):
        build_segnet("imagenet")


def test_imagenet_weights_initialise_the_encoder_when_present():
    path = encoder_weights_path("mobilenet_v2")
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    model = build_segnet("imagenet")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.encoder.features[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(model.encoder.features[17].conv[2].weight, state["features.17.conv.2.weight"])
    with pytest.raises(ValueError, match=r"need width_mult=1\.0"):
        build_segnet("imagenet", width_mult=0.35)


# ------------------------------------------------------------------------------------------------
# Metrics and loss
# ------------------------------------------------------------------------------------------------


def square(top: int, left: int, side: int, shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


EMPTY = np.zeros((40, 40), dtype=bool)
A = square(5, 5, 10)


@pytest.mark.parametrize(("pred", "target", "d", "j", "bf"), [
    (A, A, 1.0, 1.0, 1.0),                                  # identical
    (A, square(25, 25, 10), 0.0, 0.0, 0.0),                 # disjoint
    (EMPTY, EMPTY, 1.0, 1.0, 1.0),                          # both empty
    (A, EMPTY, 0.0, 0.0, 0.0),                              # one empty
    (EMPTY, A, 0.0, 0.0, 0.0),
    (A | square(25, 25, 10), A, 2 / 3, 1 / 2, 2 / 3),      # a second, false lesion: P = 1/2, R = 1
    (~EMPTY, ~EMPTY, 1.0, 1.0, 1.0),                        # full frame: no contour on either side
])  # fmt: skip
def test_metrics_on_hand_made_masks(pred, target, d, j, bf):
    assert dice(pred, target) == pytest.approx(d)
    assert iou(pred, target) == pytest.approx(j)
    assert boundary_f_score(pred, target) == pytest.approx(bf)


def test_half_overlap_gives_the_known_dice_and_iou():
    left, shifted = square(5, 5, 10), square(5, 10, 10)  # 100 px each, 50 px shared
    assert dice(left, shifted) == pytest.approx(0.5)
    assert iou(left, shifted) == pytest.approx(50 / 150)


def test_boundary_f_tolerates_small_shifts_only():
    ref = square(10, 10, 16)
    assert boundary_f_score(square(11, 11, 16), ref, tolerance_px=2) == pytest.approx(1.0)
    assert boundary_f_score(square(11, 11, 16), ref, tolerance_px=0) < 0.5
    assert boundary_f_score(square(16, 16, 16), ref, tolerance_px=2) < 0.5


def test_metrics_accept_torch_and_0_255_masks():
    t = torch.from_numpy(A.astype(np.float32))
    assert dice(t, A.astype(np.uint8) * 255) == 1.0
    assert boundary_f_score(t[None], A) == 1.0


def test_dice_bce_loss_falls_as_logits_move_towards_the_target():
    target = torch.from_numpy(square(8, 8, 16, (32, 32))).float()[None, None].repeat(2, 1, 1, 1)
    losses = [float(dice_bce_loss(step * (2 * target - 1), target)) for step in (-2.0, 0.0, 1.0, 4.0, 8.0)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.01
    with pytest.raises(ValueError, match="differ in shape"):
        dice_bce_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))


def test_bootstrap_interval_brackets_the_mean_and_resamples_lesions():
    values = {"dice": np.array([0.0, 0.0, 1.0, 1.0])}
    out = bootstrap_means(values, np.array(["a", "a", "b", "c"]), n_boot=300, seed=0)
    assert out["dice"]["mean"] == pytest.approx(0.5)
    assert out["dice"]["low"] == 0.0 and out["dice"]["high"] == 1.0


# ------------------------------------------------------------------------------------------------
# Learning, training and evaluation
# ------------------------------------------------------------------------------------------------


def circles(n: int = 8, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.15, 0.3) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        skin = np.array([0.85, 0.65, 0.55]) + rng.normal(0, 0.04, (size, size, 3))
        image = np.where(mask[..., None], np.array([0.45, 0.3, 0.2]), skin)
        images.append(np.clip(image, 0, 1).transpose(2, 0, 1))
        masks.append(mask[None])
    return torch.tensor(np.stack(images), dtype=torch.float32), torch.tensor(
        np.stack(masks), dtype=torch.float32
    )


def test_a_tiny_segnet_overfits_eight_circles():
    images, masks = circles()
    model = tiny_net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = dice_bce_loss(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(images) >= 0
    scores = [dice(p, m) for p, m in zip(pred, masks, strict=True)]
    assert np.mean(scores) > 0.8, scores


def test_train_seg_writes_checkpoints_and_history_and_skips_rows_without_masks(seg_study, tmp_path, caplog):
    out = tmp_path / "run"
    config = SegTrainConfig(
        data=str(seg_study), out=str(out), epochs=1, batch_size=4, image_size=64, width_mult=0.35,
        val_fraction=0.5, max_steps_per_epoch=1, progress=False, threads=1,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="model.lesion.train_seg"):
        result = train_seg(config)
    assert "skipping 1 of 8 rows without a lesion mask" in caplog.text
    assert result.best.is_file() and result.last.is_file() and (out / "history.csv").is_file()
    model, meta = load_segnet(result.best)
    assert meta.arch == "segnet-mobilenet_v2" and meta.input_size == 64 and meta.width_mult == 0.35
    assert meta.version.startswith("segnet-") and meta.version == result.meta.version
    assert meta.data_hash and meta.epoch == 1 and "val_dice" in meta.metrics
    assert meta.extra["n_train"] + meta.extra["n_val"] == 7
    last = read_checkpoint(result.last)
    assert last.optimizer and last.scheduler and last.state and last.state["epoch"] == 1
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1] and {"val_dice", "val_iou", "train_loss"} <= set(history.columns)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="holds a 'segnet-mobilenet_v2' model"):
        load_checkpoint(result.best)  # DermNet's loader refuses it by name


def test_a_checkpoint_rebuilds_the_same_network(seg_run):
    out, result = seg_run
    model, _ = load_segnet(out / "best.pt")
    again = build_segnet(out / "best.pt").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert len(result.history) == 2


@pytest.mark.parametrize("split", ["val", "all"])
def test_evaluate_seg_writes_metrics_with_intervals_and_a_gallery(seg_study, seg_run, tmp_path, split):
    out, _ = seg_run
    result = evaluate_seg(out / "best.pt", seg_study, tmp_path, split=split, n_boot=50)
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored == result
    assert stored["n_images"] == (
        7 if split == "all" else read_checkpoint(out / "best.pt").meta.extra["n_val"]
    )
    for key in ("dice", "iou", "boundary_f"):
        assert set(stored[key]) == {"mean", "low", "high"}
        assert 0.0 <= stored[key]["low"] <= stored[key]["mean"] <= stored[key]["high"] <= 1.0
    assert stored["threshold"] == 0.5 and "sigmoid(logit) >= 0.5" in stored["threshold_rule"]
    assert (tmp_path / "gallery.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "per_image.csv")) == stored["n_images"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "epochs must be at least 1"),
    ("image_size", 8, "image_size must be between"),
    ("lr", 0.0, "lr must be positive"),
])  # fmt: skip
def test_bad_segmentation_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        SegTrainConfig(**{field: value})


def test_evaluate_seg_rejects_an_unknown_split(seg_run, seg_study, tmp_path):
    with pytest.raises(ValueError, match="split must be 'val' or 'all'"):
        evaluate_seg(seg_run[0] / "best.pt", seg_study, tmp_path, split="test")
