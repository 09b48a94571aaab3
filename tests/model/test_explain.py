"""All-target Grad-CAM from one pass equals pytorch-grad-cam's, and maps become region masks."""

import numpy as np
import pytest
import torch
from torch import nn

from labeling_config import TARGETS
from model.common.explain import cam_to_mask, compact_region, explain, library_cams, scale_maps
from model.multitask.network import DermNet


@pytest.fixture(scope="module")
def model() -> DermNet:
    """A small DermNet with non-trivial weights: heads drawn wide, a few SGD steps on noise."""
    torch.manual_seed(0)
    net = DermNet(width_mult=0.5)
    for head in (net.bcc_head, net.pattern_head):
        nn.init.normal_(head.weight, 0.0, 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(3):
        loss = nn.functional.binary_cross_entropy_with_logits(
            net(torch.rand(4, 3, 64, 64)), torch.randint(0, 2, (4, len(TARGETS))).float()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


class MLPHead(nn.Module):
    """A network whose head is not linear: Grad-CAM needs real gradients."""

    def __init__(self, base: DermNet) -> None:
        super().__init__()
        self.base = base
        self.features = base.features
        self.mlp = nn.Sequential(nn.Linear(1280, 32), nn.Tanh(), nn.Linear(32, len(TARGETS)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.forward_features(x)

    def forward_heads(self, f: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.amax(f, dim=(2, 3)) + f.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(self.forward_features(x))


def test_every_map_equals_pytorch_grad_cam(model):
    x = torch.rand(3, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    ours = explain(model, x)
    reference = library_cams(model, x, model.features[-1], "gradcam")
    assert ours.cams.shape == (3, len(TARGETS), 96, 128)
    assert np.abs(ours.cams.numpy() - reference).max() < 1e-4
    # Each map is normalised (peak 1) or empty (the weighted features are negative everywhere).
    peaks = ours.cams.amax(dim=(2, 3))
    assert ((peaks > 0.99) | (peaks == 0)).all()
    assert (peaks > 0.99).float().mean() > 0.7


def test_closed_form_equals_batched_autograd(model):
    x = torch.rand(2, 3, 64, 64)
    a, b = explain(model, x, method="linear"), explain(model, x, method="autograd")
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert (a.cams - b.cams).abs().max() < 1e-4


def test_any_head_gets_its_maps_from_one_batched_autograd_call(model):
    net = MLPHead(model).eval()
    x = torch.rand(2, 3, 64, 96)
    ours = explain(net, x)
    reference = library_cams(net, x, net.features[-1], "gradcam")
    assert np.abs(ours.cams.numpy() - reference).max() < 1e-4
    with pytest.raises(ValueError, match="method='linear' needs average pooling"):
        explain(net, x, method="linear")


def test_library_hooks_are_released_and_mode_restored(model):
    model.train()
    library_cams(model, torch.rand(1, 3, 64, 64), model.features[-1], "gradcam++")
    assert model.training
    model.eval()
    assert not model.features[-1]._forward_hooks
    with pytest.raises(ValueError, match="unknown CAM method"):
        library_cams(model, torch.rand(1, 3, 64, 64), model.features[-1], "magic")


def test_temperature_changes_probabilities_not_maps(model):
    x = torch.rand(1, 3, 64, 64)
    plain, hot = explain(model, x), explain(model, x, temperatures=[2.0] * len(TARGETS))
    assert torch.allclose(hot.probs, torch.sigmoid(plain.logits / 2))
    assert torch.equal(plain.cams, hot.cams)


def test_maps_become_masks_at_the_original_size(model):
    e = explain(model, torch.rand(1, 3, 64, 64))
    raw = e.raw[0, 1]
    loose = cam_to_mask(raw, width=300, height=200, threshold=0.3)
    tight = cam_to_mask(raw, width=300, height=200, threshold=0.7)
    assert loose.shape == (200, 300) and loose.dtype == bool
    assert tight.sum() < loose.sum() and not (tight & ~loose).any()
    lesion = np.zeros((200, 300), bool)
    lesion[50:150, 100:200] = True
    inside = cam_to_mask(raw, 300, 200, 0.3, lesion=lesion)
    assert not (inside & ~lesion).any()
    with pytest.raises(ValueError, match="threshold must be in"):
        cam_to_mask(raw, 300, 200, threshold=0.0)
    with pytest.raises(ValueError, match="lesion mask is"):
        cam_to_mask(raw, 300, 200, lesion=np.zeros((10, 10), bool))


def test_maps_of_a_stride_16_network_equal_the_library_too():
    torch.manual_seed(3)
    net = DermNet(width_mult=0.5, output_stride=16).eval()
    nn.init.normal_(net.pattern_head.weight, 0.0, 0.5)
    x = torch.rand(2, 3, 64, 64)
    ours = explain(net, x)
    assert ours.raw.shape[-2:] == (4, 4)
    assert np.abs(ours.cams.numpy() - library_cams(net, x, net.features[-1])).max() < 1e-4


def test_compact_region_stays_inside_the_lesion_and_holds_the_peak():

    h, w = 60, 80
    yy, xx = np.mgrid[0:h, 0:w]
    # a broad map peaking outside the lesion, with a second, lower bump inside it
    cam = np.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / 400.0) + 0.4 * np.exp(
        -((yy - 40) ** 2 + (xx - 50) ** 2) / 60.0
    )
    lesion = (yy - 40) ** 2 + (xx - 50) ** 2 < 15**2
    blob = cam_to_mask(cam, w, h)
    assert not blob[lesion].any()  # the old rule draws nothing on the lesion, everything beside it
    region = compact_region(cam, w, h, lesion=lesion, max_share=0.3)
    assert region.any() and not region[~lesion].any()
    assert region[40, 50]  # the peak inside the lesion
    assert region.sum() <= 0.3 * lesion.sum()
    from scipy import ndimage

    assert ndimage.label(region)[1] == 1  # one piece
    assert not compact_region(cam, w, h, lesion=np.zeros_like(lesion)).any()  # no lesion, no region
    wide = compact_region(np.ones((4, 4)) + np.eye(4), w, h, max_share=0.1)  # without a lesion mask
    assert 0 < wide.sum() <= 0.1 * h * w
    with pytest.raises(ValueError, match="lesion mask is"):
        compact_region(cam, w, h, lesion=lesion[:-1])


@pytest.mark.parametrize(
    ("raw_size", "size"),
    [((7, 7), (224, 224)), ((3, 5), (97, 131)), ((14, 14), (600, 450)), ((8, 8), (4, 3))],
)
def test_the_numpy_maps_scale_as_the_torch_ones(raw_size, size):
    """model.common.maps (NumPy, for serving without PyTorch) resizes exactly as F.interpolate does."""
    from model.common import maps

    raw = np.random.default_rng(0).random((3, *raw_size)).astype(np.float32)
    found = maps.scale_maps(raw, size)
    expected = scale_maps(torch.from_numpy(raw), size).numpy()
    assert found.shape == (3, *size) and np.abs(found - expected).max() < 1e-5
