"""The BCC model served by ONNX Runtime gives what PyTorch gives: probabilities within 1e-4 and Grad-CAM
maps within 1e-3, on synthetic and on real dermoscopy; registration writes the graph beside the checkpoint
and the backend serves it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.serving.multitask import load_served, onnx_path, run_batch
from model.common.maps import scale_maps
from tests.backend.conftest import png_bytes

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample" / "ham10000" / "images"
RELEASED = ROOT / "models" / "dermnet-bcc.pt"


def synthetic_images(n: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(96, 72), (640, 480), (64, 64), (300, 450), (128, 128), (77, 201)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def real_images(n: int = 8) -> list[Image.Image]:
    paths = sorted(SAMPLE.glob("*.jpg"))[:n]
    assert len(paths) == n, f"the shipped sample has {len(paths)} images"
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def assert_parity(checkpoint: Path, images: list[Image.Image]) -> None:
    eager = load_served(checkpoint, engine="torch")
    onnx = load_served(checkpoint, engine="onnxruntime")
    assert (eager.engine.name, onnx.engine.name) == ("torch", "onnxruntime")
    assert onnx.version == eager.version and onnx.meta.thresholds == eager.meta.thresholds
    for a, b in zip(run_batch(eager, images), run_batch(onnx, images), strict=True):
        assert a.probs.keys() == b.probs.keys()
        assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < 1e-4
        assert a.maps.shape == b.maps.shape
        assert np.abs(scale_maps(a.maps, (224, 224)) - scale_maps(b.maps, (224, 224))).max() < 1e-3
    # the acquisition outputs: Monte Carlo dropout samples, test-time views, the embedding
    for sampling in ("dropout", "views"):
        pairs = zip(
            run_batch(eager, images, False, sampling, embeddings=True),
            run_batch(onnx, images, False, sampling, embeddings=True),
            strict=True,
        )
        for a, b in pairs:
            assert a.samples is not None and b.samples is not None and a.samples.shape == b.samples.shape
            assert np.abs(a.samples - b.samples).max() < 1e-4
            assert a.embedding is not None and b.embedding is not None
            assert np.abs(a.embedding - b.embedding).max() < 1e-3 * max(1.0, np.abs(a.embedding).max())


def test_the_onnx_graph_gives_what_pytorch_gives_on_synthetic_images(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    from backend.serving.multitask import export_served

    assert export_served(checkpoint) == onnx_path(checkpoint)
    assert_parity(checkpoint, synthetic_images())


@pytest.mark.slow
def test_the_released_model_as_onnx_gives_what_pytorch_gives_on_real_images(tmp_path):
    from backend.serving.multitask import export_served

    checkpoint = tmp_path / RELEASED.name
    shutil.copy(RELEASED, checkpoint)
    export_served(checkpoint)
    assert_parity(checkpoint, real_images())


def test_a_graph_without_the_acquisition_outputs_is_served_by_pytorch(tiny_checkpoint, tmp_path, caplog):
    import torch

    from model.common.onnx import write_onnx
    from model.multitask.export import Explained
    from model.multitask.network import load_checkpoint

    class TwoOutputs(torch.nn.Module):  # the graph as written before the acquisition strategies
        def __init__(self, network):
            super().__init__()
            self.inner = Explained(network)

        def forward(self, images):
            logits, cams, _, _ = self.inner(images)
            return logits, cams

    checkpoint = tmp_path / "old.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    network, meta = load_checkpoint(checkpoint)
    example = (torch.rand(2, 3, meta.input_size, meta.input_size),)
    write_onnx(TwoOutputs(network), example, ("images",), ("logits", "cams"), meta, onnx_path(checkpoint))
    served = load_served(checkpoint, engine="onnxruntime")
    assert served.engine.name == "torch"
    assert "predates the acquisition outputs" in caplog.text
    (output,) = run_batch(served, synthetic_images(1), maps=False, sampling="dropout")
    assert output.samples is not None and output.samples.shape[1] == len(meta.targets)


def test_without_a_graph_pytorch_serves(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "alone.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    assert load_served(checkpoint).engine.name == "torch"


def test_registering_writes_the_graph_and_the_backend_serves_it(client, settings, sessions, promoted):
    from backend.serving import registry

    with sessions() as session:
        row = registry.promoted(session)
        assert row is not None and onnx_path(row.path).is_file()
    app = client.application
    served = app.extensions["dermassist"].serving.bcc_model()
    assert served.engine.name == "onnxruntime" and served.version == promoted


def test_a_graph_of_another_version_is_not_copied(tiny_checkpoint, tmp_path, sessions, settings):
    """A stale .onnx beside a checkpoint (another version's) is not copied: the graph is exported anew."""
    import json

    import onnx

    from backend.serving import registry
    from backend.serving.multitask import graph_version
    from model.common.meta import ONNX_META_KEY as META_KEY

    checkpoint = tmp_path / "other.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    graph = onnx.load(str(onnx_path(tiny_checkpoint)))
    (entry,) = [e for e in graph.metadata_props if e.key == META_KEY]
    entry.value = json.dumps({**json.loads(entry.value), "version": "dermnet-000000000000"})
    onnx.save(graph, str(onnx_path(checkpoint)))
    assert graph_version(onnx_path(checkpoint)) == "dermnet-000000000000"
    with sessions() as session:
        row = registry.register(session, checkpoint, settings.model_dir)
        assert graph_version(onnx_path(row.path)) == row.version != "dermnet-000000000000"


def torch_modules_after(settings, requests: str) -> list[str]:
    """The torch / torchvision modules a fresh Python process has imported after building the app from
    ``settings`` (no release) and running ``requests`` (code using ``client`` and ``load_config``)."""
    import json
    import subprocess
    import sys
    import textwrap

    probe = f"""
import json, sys
from pathlib import Path
from backend.api.app import create_app
from backend.settings import Settings
from labeling_config import load_config
settings = Settings(label_studio_url={settings.label_studio_url!r}, label_studio_api_key={settings.label_studio_api_key!r},
                    model_dir=Path({str(settings.model_dir)!r}), database_url={settings.database_url!r},
                    show_outputs="all", release_dir=None)
client = create_app(settings).test_client()
{textwrap.dedent(requests)}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def test_serving_the_onnx_graph_imports_no_pytorch(client, settings, image_server):
    """A process that serves a registered model's ONNX graph (bcc.xml, no lesion pair) never imports
    torch: not at start, not for a prediction with its Grad-CAM regions."""
    _, files = image_server
    files.routes["/data/upload/1/a.png"] = (200, {"Content-Type": "image/png"}, png_bytes(96, 72))
    requests = """
        body = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
                                             "label_config": load_config("bcc")}).get_json()
        (result,) = body["results"]
        assert any(item["type"] == "brushlabels" for item in result["result"]), result
    """
    assert torch_modules_after(settings, requests) == []


def test_a_graphs_metadata_is_read_without_the_onnx_package(tmp_path):
    """Serving reads a graph's version straight from its protobuf: the same entries ``onnx`` reads, and
    None for a file that is not a graph (damaged, cut short, another format)."""
    import onnx

    from backend.serving.multitask import graph_version
    from model.common.onnx import read_metadata

    graph = ROOT / "models" / "dermnet-bcc.onnx"
    expected = {e.key: e.value for e in onnx.load(str(graph), load_external_data=False).metadata_props}
    assert read_metadata(graph) == expected and expected
    assert graph_version(graph) == "dermnet-d3e0596be9ec"
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    for path in (cut, ROOT / "models" / "release.json", tmp_path / "absent.onnx"):
        assert graph_version(path) is None
