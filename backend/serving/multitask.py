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

from model.common.acquisition import SAMPLING

logger = logging.getLogger(__name__)

BATCH_SIZE = 16

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class Forward:
    """One engine pass over a batch.

    Attributes:
        logits: ``(B, K)``.
        cams: raw Grad-CAM maps ``(B, K, h, w)`` (without maps: ``(B, 0, 0, 0)``).
        embeddings: the pooled features ``(B, C)`` (None unless asked for).
        samples: Monte Carlo dropout logits ``(B, T, K)`` (None unless asked for).
    """

    logits: FloatArray
    cams: FloatArray
    embeddings: FloatArray | None = None
    samples: FloatArray | None = None


class Engine(Protocol):
    """What runs the BCC model on a batch: PyTorch (training, and serving without an ONNX file) or ONNX
    Runtime (serving). Both give the same numbers (parity tests hold them within 1e-4)."""

    name: str

    def run(self, images: FloatArray, maps: bool = True, extras: bool = False) -> Forward:
        """``(B, 3, S, S)`` images in [0, 1] -> logits and raw Grad-CAM maps; with ``extras``, the
        embeddings and Monte Carlo dropout logits too."""
        ...


def _no_maps(count: int) -> FloatArray:
    return np.zeros((count, 0, 0, 0), dtype=np.float32)


class TorchEngine:
    """The checkpoint's network, run by PyTorch: the very module the ONNX graph is exported from
    (:class:`model.multitask.export.Explained`)."""

    name = "torch"

    def __init__(self, network: Any) -> None:
        from model.multitask.export import Explained

        self.network = network.eval()
        self.explained = Explained(self.network).eval()

    def run(self, images: FloatArray, maps: bool = True, extras: bool = False) -> Forward:
        import torch

        with torch.no_grad():
            logits, cams, embeddings, samples = (t.numpy() for t in self.explained(torch.from_numpy(images)))
        return Forward(
            logits,
            cams if maps else _no_maps(len(images)),
            embeddings if extras else None,
            samples if extras else None,
        )


def onnx_session(path: str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime session of a graph on the CPU, with ``threads`` intra-op threads (``THREADS``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_each(
    session: Any, feeds: dict[str, NDArray[Any]], outputs: Sequence[str] | None = None
) -> list[FloatArray]:
    """``session``'s outputs for a batch, run one item at a time and stacked.

    On one CPU thread a batch of one is the fastest (the BCC model: 5.5 ms per image against 6.4 in
    batches of 16), and ONNX Runtime's memory arena, which keeps the largest run's activations for
    good, then holds one image's (+12 MB against +198 MB per graph)."""
    count = len(next(iter(feeds.values())))
    names = None if outputs is None else list(outputs)
    runs = [session.run(names, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(count)]
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

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph's output names."""
        return tuple(o.name for o in self.session.get_outputs())

    def run(self, images: FloatArray, maps: bool = True, extras: bool = False) -> Forward:
        from model.multitask.meta import CAMS, EMBEDDING, LOGITS, MC_LOGITS

        names = [LOGITS, *([CAMS] if maps else []), *([EMBEDDING, MC_LOGITS] if extras else [])]
        found = dict(zip(names, run_each(self.session, {"images": images}, names), strict=True))
        return Forward(
            found[LOGITS],
            found.get(CAMS, _no_maps(len(images))),
            found.get(EMBEDDING),
            found.get(MC_LOGITS),
        )


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
        embedding: ``(C,)`` pooled features (when asked for).
        samples: ``(T, K)`` calibrated probabilities under Monte Carlo dropout, or over the
            test-time views (when asked for), in target order.
    """

    probs: dict[str, float]
    maps: FloatArray
    embedding: FloatArray | None = None
    samples: FloatArray | None = None


def onnx_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's ONNX graph lives: beside it, ``<name>.onnx``."""
    return Path(checkpoint).with_suffix(".onnx")


def load_served(path: str | Path, engine: str = "onnxruntime", threads: int = 1) -> ServedModel:
    """Load a checkpoint for serving: with ONNX Runtime where its ONNX graph exists beside it (and
    ``engine`` is ``onnxruntime``), else with PyTorch.

    Raises:
        FileNotFoundError, ValueError: as :func:`model.multitask.network.load_checkpoint`.
    """
    from model.multitask.meta import GRAPH_OUTPUTS, CheckpointMeta

    graph = onnx_path(path)
    if engine == "onnxruntime" and graph.is_file():
        onnx = OnnxEngine(graph, threads)
        meta = CheckpointMeta.from_dict(onnx.meta())
        if set(GRAPH_OUTPUTS) <= set(onnx.outputs):
            return ServedModel(version=meta.version, engine=onnx, meta=meta, path=Path(path))
        logger.warning(
            "%s predates the acquisition outputs (%s): served with PyTorch; delete it to have it "
            "written again at the next promotion",
            graph.name,
            ", ".join(GRAPH_OUTPUTS),
        )
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


def views(images: FloatArray) -> list[FloatArray]:
    """The test-time views of a square batch ``(B, 3, S, S)``: itself, flipped left-right, flipped
    upside down, turned a quarter (a dermoscopic image has no up or left)."""
    return [
        images,
        np.ascontiguousarray(images[..., ::-1]),
        np.ascontiguousarray(images[..., ::-1, :]),
        np.ascontiguousarray(np.rot90(images, 1, axes=(-2, -1))),
    ]


def run_batch(
    served: ServedModel,
    images: Sequence[Image.Image],
    maps: bool = True,
    sampling: str | None = None,
    embeddings: bool = False,
) -> list[ImageOutput]:
    """Probabilities and Grad-CAM maps for every image, one forward pass per chunk of images.

    Args:
        maps: compute the maps (``False``: probabilities only, e.g. scoring a validation split; the
            outputs' ``maps`` are then empty).
        sampling: ``dropout``: each output's ``samples`` are its Monte Carlo dropout probabilities
            (same pass); ``views``: its probabilities on the :func:`views` (one more pass per view).
        embeddings: keep each image's pooled features (``embedding``).
    """
    if sampling is not None and sampling not in SAMPLING.values():
        raise ValueError(f"sampling must be one of {sorted(SAMPLING.values())}, got {sampling!r}")
    meta = served.meta
    temperatures = np.asarray([float(meta.temperatures.get(k, 1.0)) for k in meta.targets], dtype=np.float32)
    extras = sampling == "dropout" or embeddings
    outputs: list[ImageOutput] = []
    for start in range(0, len(images), BATCH_SIZE):
        chunk = np.stack([to_array(im, meta.input_size) for im in images[start : start + BATCH_SIZE]])
        found = served.engine.run(chunk, maps=maps, extras=extras)
        probs = expit(found.logits / temperatures)  # 1 / (1 + exp(-x)) without overflow at large |x|
        samples: FloatArray | None = None
        if sampling == "dropout":
            assert found.samples is not None
            samples = expit(found.samples / temperatures)
        elif sampling == "views":
            turned = [served.engine.run(view, maps=False).logits for view in views(chunk)[1:]]
            samples = expit(np.stack([found.logits, *turned], axis=1) / temperatures)
        for i in range(len(chunk)):
            outputs.append(
                ImageOutput(
                    probs={k: float(probs[i, j]) for j, k in enumerate(meta.targets)},
                    maps=found.cams[i].copy(),
                    embedding=found.embeddings[i].copy()
                    if embeddings and found.embeddings is not None
                    else None,
                    samples=samples[i].copy() if samples is not None else None,
                )
            )
    return outputs
