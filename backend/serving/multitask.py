"""The BCC model in the backend (the ``multitask`` system): loaded for serving, run on a batch in one pass.

:func:`load_served` loads a registered checkpoint (the holder, :mod:`backend.serving.holder`, keeps it and
swaps it on promotion). :func:`run_batch` resizes the images as validation does (square, no crop), runs
one forward pass per chunk and returns, per image, the calibrated probability of every output and its
Grad-CAM map at feature resolution (to be resized to the image's own size by the caller).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy.special import expit

logger = logging.getLogger(__name__)

BATCH_SIZE = 16

FloatArray = NDArray[np.float32]


class Engine(Protocol):
    """What runs the BCC model on a batch: PyTorch (training, and serving without an ONNX file) or ONNX
    Runtime (serving). Both give the same numbers (parity tests hold them within 1e-4)."""

    name: str

    def run(self, images: FloatArray, maps: bool = True) -> tuple[FloatArray, FloatArray]:
        """``(B, 3, S, S)`` images in [0, 1] -> logits ``(B, K)`` and raw Grad-CAM maps ``(B, K, h, w)``
        (``maps=False``: an empty ``(B, 0, 0, 0)``)."""
        ...


class TorchEngine:
    """The checkpoint's network, run by PyTorch (maps by :func:`model.common.explain.explain`)."""

    name = "torch"

    def __init__(self, network: Any) -> None:
        self.network = network.eval()

    def run(self, images: FloatArray, maps: bool = True) -> tuple[FloatArray, FloatArray]:
        import torch

        from model.common.explain import explain

        batch = torch.from_numpy(images)
        if maps:
            explanation = explain(self.network, batch, size=(1, 1))
            return explanation.logits.detach().numpy(), explanation.raw.detach().numpy()
        with torch.no_grad():
            logits = self.network(batch).numpy()
        return logits, np.zeros((len(images), 0, 0, 0), dtype=np.float32)


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime session of a graph on the CPU, with ``threads`` intra-op threads (``THREADS``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_each(session: Any, feeds: dict[str, NDArray[Any]]) -> list[FloatArray]:
    """``session``'s outputs for a batch, run one item at a time and stacked.

    On one CPU thread a batch of one is the fastest (the BCC model: 5.5 ms per image against 6.4 in
    batches of 16), and ONNX Runtime's memory arena, which keeps the largest run's activations for
    good, then holds one image's (+12 MB against +198 MB per graph)."""
    count = len(next(iter(feeds.values())))
    runs = [session.run(None, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(count)]
    return [
        np.concatenate([np.asarray(run[j], dtype=np.float32) for run in runs]) for j in range(len(runs[0]))
    ]


def graph_meta(session: Any) -> dict[str, Any]:
    """The checkpoint metadata an ONNX graph of ours carries (``metadata_props``).

    Raises:
        ValueError: the graph carries none.
    """
    from model.common.meta import ONNX_META_KEY

    found = session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
    if found is None:
        raise ValueError("this ONNX file carries no dermassist metadata")
    meta: dict[str, Any] = json.loads(found)
    return meta


class OnnxEngine:
    """The model's ONNX graph (:mod:`model.multitask.export`), run by ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.session = onnx_session(path, threads)

    def meta(self) -> dict[str, Any]:
        """The checkpoint metadata stored in the file."""
        return graph_meta(self.session)

    def run(self, images: FloatArray, maps: bool = True) -> tuple[FloatArray, FloatArray]:
        logits, cams = run_each(self.session, {"images": images})
        if not maps:
            cams = np.zeros((len(images), 0, 0, 0), dtype=np.float32)
        return np.asarray(logits, dtype=np.float32), np.asarray(cams, dtype=np.float32)


@dataclass(frozen=True)
class ServedModel:
    """A loaded version: its engine, its metadata and where it came from."""

    version: str
    engine: Engine
    meta: Any  # model.multitask.network.CheckpointMeta
    path: Path


@dataclass(frozen=True)
class ImageOutput:
    """The model's answer for one image.

    Attributes:
        probs: target key -> calibrated probability.
        maps: ``(K, h, w)`` Grad-CAM maps at feature resolution, in target order.
    """

    probs: dict[str, float]
    maps: FloatArray


def onnx_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's ONNX graph lives: beside it, ``<name>.onnx``."""
    return Path(checkpoint).with_suffix(".onnx")


def load_served(path: str | Path, engine: str = "onnxruntime", threads: int = 1) -> ServedModel:
    """Load a checkpoint for serving: with ONNX Runtime where its ONNX graph exists beside it (and
    ``engine`` is ``onnxruntime``), else with PyTorch.

    Raises:
        FileNotFoundError, ValueError: as :func:`model.multitask.network.load_checkpoint`.
    """
    from model.multitask.meta import CheckpointMeta

    graph = onnx_path(path)
    if engine == "onnxruntime" and graph.is_file():
        onnx = OnnxEngine(graph, threads)
        meta = CheckpointMeta.from_dict(onnx.meta())
        return ServedModel(version=meta.version, engine=onnx, meta=meta, path=Path(path))
    from model.multitask.network import load_checkpoint

    network, meta = load_checkpoint(path)
    return ServedModel(version=meta.version, engine=TorchEngine(network), meta=meta, path=Path(path))


def graph_version(path: str | Path) -> str | None:
    """The version an ONNX graph says it holds (None: not one of ours, or not an ONNX file)."""
    from model.common.meta import ONNX_META_KEY
    from model.common.onnx import read_metadata

    try:
        found = read_metadata(path).get(ONNX_META_KEY)
        version = json.loads(found).get("version") if found else None
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def export_served(checkpoint: str | Path) -> Path:
    """Write a checkpoint's ONNX graph beside it (atomically); its path."""
    from model.multitask.export import export_onnx
    from model.multitask.network import load_checkpoint

    network, meta = load_checkpoint(checkpoint)
    return export_onnx(network, meta, onnx_path(checkpoint))


def to_array(image: Image.Image, size: int) -> FloatArray:
    """An RGB image as the network's input: ``(3, size, size)`` in [0, 1], resized without cropping."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array: FloatArray = np.ascontiguousarray(
        (np.asarray(resized, dtype=np.float32) / 255.0).transpose(2, 0, 1)
    )
    return array


def run_batch(served: ServedModel, images: Sequence[Image.Image], maps: bool = True) -> list[ImageOutput]:
    """Probabilities and Grad-CAM maps for every image, one forward pass per chunk of images.

    Args:
        maps: compute the maps (``False``: probabilities only, e.g. scoring a validation split; the
            outputs' ``maps`` are then empty).
    """
    meta = served.meta
    temperatures = np.asarray([float(meta.temperatures.get(k, 1.0)) for k in meta.targets], dtype=np.float32)
    outputs: list[ImageOutput] = []
    for start in range(0, len(images), BATCH_SIZE):
        chunk = np.stack([to_array(im, meta.input_size) for im in images[start : start + BATCH_SIZE]])
        logits, raw = served.engine.run(chunk, maps=maps)
        probs = expit(logits / temperatures)  # 1 / (1 + exp(-x)) without overflow at large |x|
        for i in range(len(chunk)):
            outputs.append(
                ImageOutput(
                    probs={k: float(probs[i, j]) for j, k in enumerate(meta.targets)}, maps=raw[i].copy()
                )
            )
    return outputs
