"""DermNet and its builder: outputs in schema order, pretrained weights only from the local cache."""

import hashlib

import pytest
import torch

from labeling_config import TARGETS
from model.common.imagenet import IMAGENET_FILE, imagenet_weights_path
from model.multitask.network import DermNet, build_model


def test_outputs_one_logit_per_target_in_schema_order():
    model = DermNet(width_mult=0.35).eval()
    x = torch.rand(2, 3, 64, 80)
    logits = model(x)
    assert logits.shape == (2, len(TARGETS))
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = features.mean(dim=(2, 3))
        assert torch.allclose(logits[:, 0], model.bcc_head(pooled)[:, 0], atol=1e-6)
        assert torch.allclose(logits[:, 1:], model.pattern_head(pooled), atol=1e-6)
    assert model.head_weights().shape == (len(TARGETS), features.shape[1])


def test_normalisation_is_inside_the_network():
    model = DermNet(width_mult=0.35).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        manual = model.forward_heads(model.features((x - model.mean) / model.std))
        assert torch.allclose(model(x), manual)


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 1, 64, 64), (2, 4, 64, 64)])
def test_bad_input_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="expected images of shape"):
        DermNet(width_mult=0.35)(torch.rand(*shape))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="dropout must be in"):
        DermNet(dropout=1.0)


def test_imagenet_weights_absent_fail_with_one_clear_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"run `make weights`.*nothing is downloaded"):
        build_model("imagenet")


def test_imagenet_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = imagenet_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="does not have the SHA-256 prefix b0353104"):
        build_model("imagenet")


def test_imagenet_weights_load_into_the_features_when_present():
    path = imagenet_weights_path()
    if not path.is_file():
        pytest.skip(f"{IMAGENET_FILE} not in {path.parent} (run `make weights`)")
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    model = build_model("imagenet")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])


def test_unknown_weights_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_model(str(tmp_path / "nope.pt"))


def test_output_stride_16_doubles_the_map_resolution_with_the_same_weights():
    coarse, fine = DermNet(width_mult=0.35), DermNet(width_mult=0.35, output_stride=16)
    fine.load_state_dict(coarse.state_dict())  # same parameter shapes: ImageNet weights fit both
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert coarse.forward_features(x).shape[-2:] == (7, 7)
        assert fine.forward_features(x).shape[-2:] == (14, 14)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        DermNet(output_stride=4)
