"""The lesion pair served by ONNX Runtime and NumPy gives what the PyTorch path gives: the resizing and the
crop equal PyTorch's ``interpolate``, probabilities within 1e-4 and masks equal on >= 99.9% of pixels on
synthetic and on real dermoscopy; a process serving both systems' graphs never imports PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backend.serving.lesion import graphs_of, load_pair, run_lesion, segment
from labeling_config import HAM_CLASSES
from model.lesion.dual import encode_metadata, lesion_crop
from model.lesion.preprocess import crop_lesion, resize
from model.systems import load
from tests.backend.conftest import png_bytes, promote_lesion, tiny_lesion_pair
from tests.backend.test_onnx import real_images, synthetic_images, torch_modules_after

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"age": 61, "sex": "female", "localization": "back"},
    {},
    {"age": "n/a", "sex": "male", "site": "face"},
    {"age": 35, "sex": "unknown", "localization": "lower extremity"},
]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    ("source", "target"), [((64, 64), (450, 600)), ((333, 257), (128, 128)), ((40, 90), (48, 48))]
)
def test_resize_is_pytorchs_interpolate(source, target, antialias):
    array = np.random.default_rng(1).random((3, *source), dtype=np.float32)
    expected = F.interpolate(
        torch.from_numpy(array)[None], size=target, mode="bilinear", align_corners=False, antialias=antialias
    )[0].numpy()
    got = resize(array, target, antialias=antialias)
    assert got.shape == expected.shape == (3, *target)
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(resize(array[0], target, antialias) - expected[0]).max() < 1e-5  # (H, W) too


def test_the_lesion_crop_is_the_training_crop():
    rng = np.random.default_rng(2)
    image = rng.random((3, 300, 400), dtype=np.float32)
    for box in [
        (slice(50, 120), slice(60, 260)),
        (slice(0, 300), slice(0, 400)),
        (slice(140, 146), slice(7, 12)),
    ]:
        mask = np.zeros((300, 400), bool)
        mask[box] = True
        expected = lesion_crop(torch.from_numpy(image), mask, 96).numpy()
        assert np.abs(crop_lesion(image, mask, 96) - expected).max() < 1e-5


def reference(segnet: str | Path, dual: str | Path, images: list[Image.Image], rows: list[dict[str, Any]]):
    """The PyTorch path as it served before ONNX: tensors throughout, one image at a time."""
    from backend.serving.multitask import to_array

    seg_net, seg_meta = load(segnet)
    dual_net, dual_meta = load(dual)
    seg_net.eval()
    dual_net.eval()
    found = []
    with torch.no_grad():
        for image, row in zip(images, rows, strict=True):
            prob = torch.sigmoid(seg_net(torch.from_numpy(to_array(image, seg_meta.input_size))[None]))
            prob = F.interpolate(
                prob, size=(image.height, image.width), mode="bilinear", align_corners=False
            )[0, 0]
            mask = (prob >= 0.5).numpy()
            array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            crop = lesion_crop(
                array, mask if mask.any() else np.ones(mask.shape, bool), dual_meta.lesion_size
            )
            logits = dual_net(
                torch.from_numpy(to_array(image, dual_meta.image_size))[None],
                crop[None],
                encode_metadata([row]),
            )
            probs = logits[0, : len(HAM_CLASSES)].softmax(0).numpy()
            found.append((mask, dict(zip(HAM_CLASSES, probs.tolist(), strict=True))))
    return found


def assert_parity(segnet: Path, dual: Path, images: list[Image.Image]) -> None:
    rows = [ROWS[i % len(ROWS)] for i in range(len(images))]
    served = load_pair(segnet, dual, engine="onnxruntime")
    eager = load_pair(segnet, dual, engine="torch")
    assert (served.engine.name, eager.engine.name) == ("onnxruntime", "torch")
    assert served.provenance == eager.provenance and served.lesion_size == eager.lesion_size
    expected = reference(segnet, dual, images, rows)
    for system in (served, eager):
        for image, output, (mask, probs) in zip(
            images, run_lesion(system, images, rows), expected, strict=True
        ):
            assert output.mask.shape == mask.shape == (image.height, image.width)
            assert (output.mask == mask).mean() >= 0.999
            assert max(abs(output.probs[k] - probs[k]) for k in HAM_CLASSES) < 1e-4
        outline, _ = segment(system, images[0])
        assert (outline == expected[0][0]).mean() >= 0.999


def test_the_pair_as_onnx_gives_what_pytorch_gives_on_synthetic_images(tmp_path):
    segnet, dual = tiny_lesion_pair(tmp_path)
    assert all(graph.is_file() for graph in graphs_of(segnet, dual))
    assert_parity(segnet, dual, synthetic_images())


@pytest.mark.slow
def test_the_released_pair_as_onnx_gives_what_pytorch_gives_on_real_images(tmp_path):
    from backend.serving.lesion import export_graph

    for name in ("lesion-unet.pt", "lesion-dual.pt"):
        shutil.copy(ROOT / "models" / name, tmp_path / name)
        export_graph(tmp_path / name, (tmp_path / name).with_suffix(".onnx"))
    assert_parity(tmp_path / "lesion-unet.pt", tmp_path / "lesion-dual.pt", real_images())


def test_without_graphs_pytorch_serves_the_pair(tmp_path):
    segnet, dual = tiny_lesion_pair(tmp_path)
    for graph in graphs_of(segnet, dual):
        graph.unlink()
    assert load_pair(segnet, dual).engine.name == "torch"


def test_serving_both_systems_as_onnx_imports_no_pytorch(
    settings, sessions, promoted, image_server, tmp_path
):
    """A process that serves the BCC model's and the lesion pair's graphs never imports torch: not at
    start, not for lesion.xml (mask, crop, diagnosis) nor for bcc.xml's regions outlined by the U-Net."""
    version = promote_lesion(sessions, settings.model_dir, *tiny_lesion_pair(tmp_path))
    folder = Path(settings.model_dir) / "versions" / version
    assert {"segnet.onnx", "dual.onnx"} <= {p.name for p in folder.iterdir()}
    _, files = image_server
    files.routes["/data/upload/1/a.png"] = (200, {"Content-Type": "image/png"}, png_bytes(96, 72))
    requests = """
        task = {"id": 1, "data": {"image": "/data/upload/1/a.png", "age": 50, "sex": "male", "site": "back"}}
        for config in ("lesion", "bcc"):  # lesion: mask, crop, diagnosis; bcc: regions inside the outline
            response = client.post("/predict", json={"tasks": [task], "label_config": load_config(config)})
            (result,) = response.get_json()["results"]
            assert "choices" in {item["type"] for item in result["result"]}, (config, result)
    """
    assert torch_modules_after(settings, requests) == []


def test_graphs_made_from_other_checkpoints_are_not_served(tmp_path):
    """A checkpoint changed after its graphs were written (retrained in place, edited) is served by
    PyTorch: a graph names the file it was made from."""
    from model.lesion.segmentation import load_segnet, save_segnet

    segnet, dual = tiny_lesion_pair(tmp_path)
    assert load_pair(segnet, dual).engine.name == "onnxruntime"
    network, meta = load_segnet(segnet)
    with torch.no_grad():
        network.head.bias += 1.0
    save_segnet(segnet, network, meta)
    assert load_pair(segnet, dual).engine.name == "torch"


def test_a_released_graph_is_exported_once_per_machine(tmp_path, monkeypatch):
    """The release's lesion graphs are kept in the cache by checkpoint SHA-256: a second model folder
    copies them instead of exporting again."""
    import backend.serving.lesion as lesion
    from backend.serving import release
    from model.common.files import file_sha256

    segnet, _ = tiny_lesion_pair(tmp_path)
    for graph in graphs_of(segnet, segnet):
        graph.unlink(missing_ok=True)
    model = release.ReleasedModel(
        name="unet", kind="segnet", path=segnet, sha256=file_sha256(segnet), version="v", card=segnet
    )
    cached = release.cached_graph(model, tmp_path / "cache")
    assert cached is not None and cached.name == f"{model.sha256}-g{release.GRAPH_FORMAT}.onnx"
    assert load_pair(segnet, tmp_path / "dual.pt").engine.name == "torch"  # nothing beside it

    def refuse(*args: Any) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(lesion, "export_graph", refuse)
    assert release.cached_graph(model, tmp_path / "cache") == cached
    monkeypatch.setattr(lesion, "export_graph_apart", refuse)
    assert release.cached_graph(model, tmp_path / "elsewhere") is None  # no cache: the caller exports
