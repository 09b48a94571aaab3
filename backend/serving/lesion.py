"""The second system in the backend: lesion mask + seven-class diagnosis for projects on ``lesion.xml``.

The pair of checkpoints (segmentation U-Net, dual-encoder classifier) is one version of the ``lesion``
system in the registry (:mod:`backend.serving.registry`: ``MODEL_DIR/versions/lesion-<hash>/``;
``dermassist models promote-lesion SEG DUAL`` registers and promotes one). Per image: the U-Net's
mask at the image's own size (sigmoid >= 0.5), the lesion crop from that mask, the dual classifier with
the task's age / sex / site (read from the task-data fields the config shows; missing values are the
model's "unknown"), then:

- the HAM10000 diagnosis control gets the most probable of the seven classes, its ``score`` the
  probability; the task ``score`` is that probability too (ascending = most uncertain first);
- the lesion control gets the mask as a brush region (Label Studio RLE, ``original_width`` /
  ``original_height``), its ``score`` the mean foreground probability inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from backend.label_studio.predictions import brush_item
from backend.serving import registry
from backend.serving.multitask import FloatArray, onnx_session, run_each, to_array
from backend.serving.registry import LESION, Candidate
from consensus.models import ModelVersion
from labeling_config import HAM_CLASSES, LESION_LABEL
from labeling_config.parse import LESION_KEY, ProjectConfig
from model.common.meta import ModelMeta

if TYPE_CHECKING:
    from model.lesion.meta import DualMeta, SegMeta

logger = logging.getLogger(__name__)

SEG_FILE, DUAL_FILE = "segnet.pt", "dual.pt"
CHECKPOINT_SHA256 = "checkpoint_sha256"  # in a graph's metadata: the file it was exported from
LESION_OUTPUT, DIAGNOSIS_OUTPUT = "lesion", "diagnosis"  # the pair's outputs, for provenance


class LesionEngine(Protocol):
    """What runs the pair: PyTorch (serving without ONNX graphs) or ONNX Runtime (serving). Both take and
    give NumPy arrays; the resizing, cropping and metadata encoding around them are the same NumPy code
    (:mod:`model.lesion.preprocess`), so the two differ only by the networks' float rounding."""

    name: str

    def segment(self, images: FloatArray) -> FloatArray:
        """``(B, 3, S, S)`` in [0, 1] -> lesion probabilities ``(B, S, S)``."""
        ...

    def classify(self, inputs: dict[str, NDArray[Any]]) -> FloatArray:
        """The classifier's named inputs (:func:`model.lesion.export.dual_inputs`) -> logits ``(B, 8)``."""
        ...


class TorchLesion:
    """The pair's checkpoints, run by PyTorch."""

    name = "torch"

    def __init__(self, segnet: Any, dual: Any) -> None:
        self.segnet, self.dual = segnet.eval(), dual.eval()

    def segment(self, images: FloatArray) -> FloatArray:
        import torch

        with torch.no_grad():
            probs: FloatArray = torch.sigmoid(self.segnet(torch.from_numpy(images)))[:, 0].numpy()
        return probs

    def classify(self, inputs: dict[str, NDArray[Any]]) -> FloatArray:
        import torch

        from model.lesion.dual import Metadata
        from model.lesion.export import META_INPUTS

        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        meta = Metadata(*(tensors[k] for k in META_INPUTS)) if "sex" in tensors else None
        with torch.no_grad():
            logits: FloatArray = self.dual(tensors["images"], tensors.get("lesions"), meta).numpy()
        return logits


class OnnxLesion:
    """The pair's ONNX graphs (:mod:`model.lesion.export`), run by ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, segnet: Path, dual: Path, threads: int = 1) -> None:
        self.segnet, self.dual = onnx_session(segnet, threads), onnx_session(dual, threads)

    def segment(self, images: FloatArray) -> FloatArray:
        (probs,) = run_each(self.segnet, {"images": images})
        return probs[:, 0]

    def classify(self, inputs: dict[str, NDArray[Any]]) -> FloatArray:
        wanted = {i.name for i in self.dual.get_inputs()}
        (logits,) = run_each(self.dual, {k: v for k, v in inputs.items() if k in wanted})
        return logits


@dataclass(frozen=True)
class LesionSystem:
    """The loaded pair and its version (``lesion-<hash of both files>``)."""

    version: str
    engine: LesionEngine
    seg_size: int
    image_size: int
    lesion_size: int
    use_lesion: bool = True
    use_metadata: bool = True
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)  # lesion, diagnosis


@dataclass(frozen=True)
class LesionOutput:
    mask: NDArray[np.bool_]  # (H, W) at the image's size
    mask_score: float
    probs: dict[str, float]  # HAM10000 class -> probability


def pair_version(segnet: Path, dual: Path) -> str:
    """``lesion-<hash of both files>``."""
    digest = hashlib.sha256()
    for path in (segnet, dual):
        digest.update(Path(path).read_bytes())
    return f"lesion-{digest.hexdigest()[:12]}"


def _read_pair(segnet: str | Path, dual: str | Path) -> tuple[Any, SegMeta, Any, DualMeta]:
    """Both networks and their metadata, each through the one checkpoint reader (:mod:`model.systems`).

    Raises:
        FileNotFoundError, ValueError: a file is missing or not the right kind of checkpoint.
    """
    from model.lesion.meta import DualMeta, SegMeta
    from model.systems import load

    seg_net, seg_meta = load(segnet)
    dual_net, dual_meta = load(dual)
    for path, meta, kind in ((segnet, seg_meta, SegMeta), (dual, dual_meta, DualMeta)):
        if not isinstance(meta, kind):
            raise ValueError(f"{path} holds a {meta.system} checkpoint, not a {kind.SYSTEM} one")
    assert isinstance(seg_meta, SegMeta) and isinstance(dual_meta, DualMeta)
    return seg_net, seg_meta, dual_net, dual_meta


def pair_candidate(segnet: str | Path, dual: str | Path) -> Candidate:
    """A U-Net and a dual-encoder checkpoint as a version of the ``lesion`` system. Registering it writes
    the pair's ONNX graphs beside the registered files: copied where graphs stand beside the given
    checkpoints (a release's, ``<name>.onnx``), else exported with PyTorch.

    Raises:
        FileNotFoundError, ValueError: a file is missing or not the right kind of checkpoint.
    """
    _, seg_meta, _, dual_meta = _read_pair(segnet, dual)  # wrong files are refused before registering
    seg_graph, dual_graph = graphs_of(segnet, dual)
    given = {SEG_FILE: (seg_graph, seg_meta.version), DUAL_FILE: (dual_graph, dual_meta.version)}
    return Candidate(
        system=LESION,
        version=pair_version(Path(segnet), Path(dual)),
        files={SEG_FILE: Path(segnet), DUAL_FILE: Path(dual)},
        outputs=(LESION_OUTPUT, DIAGNOSIS_OUTPUT),
        provenance=pair_provenance(seg_meta, dual_meta),
        graphs=lambda folder: export_graphs(folder, given),
    )


def promote_pair(
    session: Session, model_dir: Path, segnet: str | Path, dual: str | Path, **recorded: Any
) -> ModelVersion:
    """Register a pair and serve it from now on (the caller commits); ``recorded``: as
    :func:`backend.serving.registry.register` takes (metrics, job_id, consensus_run_id, ...)."""
    version = registry.register(session, pair_candidate(segnet, dual), model_dir, **recorded)
    registry.promote(session, version)
    return version


def adopt_legacy_pair(sessions: sessionmaker[Session], model_dir: Path) -> str | None:
    """A pair promoted before the registry knew the lesion system (files in ``MODEL_DIR/lesion/``):
    registered and promoted once, when no pair is promoted; its version (or None)."""
    folder = Path(model_dir) / "lesion"
    segnet, dual = folder / SEG_FILE, folder / DUAL_FILE
    if not (segnet.is_file() and dual.is_file()):
        return None
    with sessions() as session:
        if registry.promoted(session, LESION) is not None:
            return None
        try:
            version = promote_pair(session, model_dir, segnet, dual)
            session.commit()
        except IntegrityError:  # another worker adopted it at the same moment
            session.rollback()
            return None
        return version.version


def pair_provenance(seg: ModelMeta, dual: ModelMeta) -> dict[str, dict[str, Any]]:
    """The pair's outputs (``lesion``: the mask, ``diagnosis``: the seven classes) and where they come from:
    as the checkpoints record it (the release tool writes it), else judged from their validation figures
    (the U-Net's Dice at ``MIN_DICE``, the classifier's macro AUROC at ``MIN_AUROC``, on >= 100 real
    images); a checkpoint with neither counts as untrained."""
    from model.common.provenance import MIN_AUROC, MIN_DICE, from_figure

    def judged(meta: ModelMeta, output: str, metric: str, key: str, bar: float, split: str) -> dict[str, Any]:
        if output in meta.provenance:
            return dict(meta.provenance[output])
        if key not in meta.metrics:
            return {}
        n, synthetic = int(meta.extra.get("n_val", 0)), bool(meta.extra.get("synthetic"))
        return from_figure(metric, float(meta.metrics[key]), n, bar, synthetic, split)

    return {
        LESION_OUTPUT: judged(
            seg, LESION_OUTPUT, "dice", "val_dice", MIN_DICE, "the U-Net's own validation split"
        ),
        DIAGNOSIS_OUTPUT: judged(
            dual,
            DIAGNOSIS_OUTPUT,
            "auroc_macro",
            "auroc_macro",
            MIN_AUROC,
            "the classifier's own validation split",
        ),
    }


def graphs_of(segnet: str | Path, dual: str | Path) -> tuple[Path, Path]:
    """Where the pair's ONNX graphs live: beside the checkpoints, ``<name>.onnx``."""
    return Path(segnet).with_suffix(".onnx"), Path(dual).with_suffix(".onnx")


def load_pair(
    segnet: str | Path,
    dual: str | Path,
    version: str | None = None,
    engine: str = "onnxruntime",
    threads: int = 1,
) -> LesionSystem:
    """The pair loaded for serving, with its outputs' provenance: with ONNX Runtime where both graphs
    exist beside the checkpoints (and ``engine`` is ``onnxruntime``; PyTorch is then not imported), else
    with PyTorch.

    Raises:
        FileNotFoundError, ValueError: a file is missing or not the right kind of checkpoint.
    """
    from model.lesion.meta import DualMeta, SegMeta

    seg_graph, dual_graph = graphs_of(segnet, dual)
    runner: LesionEngine | None = None
    if engine == "onnxruntime" and seg_graph.is_file() and dual_graph.is_file():
        from backend.serving.multitask import graph_meta
        from model.common.files import file_sha256

        onnx = OnnxLesion(seg_graph, dual_graph, threads)
        seg_meta = SegMeta.from_dict(graph_meta(onnx.segnet))
        dual_meta = DualMeta.from_dict(graph_meta(onnx.dual))
        made_from = [meta.extra.get(CHECKPOINT_SHA256) for meta in (seg_meta, dual_meta)]
        if made_from == [file_sha256(Path(segnet)), file_sha256(Path(dual))]:
            runner = onnx
        else:
            logger.warning(
                "the ONNX graphs beside %s were made from other checkpoints: PyTorch serves", segnet
            )
    if runner is None:
        seg_net, seg_meta, dual_net, dual_meta = _read_pair(segnet, dual)
        runner = TorchLesion(seg_net, dual_net)
    return LesionSystem(
        version=version or pair_version(Path(segnet), Path(dual)),
        engine=runner,
        seg_size=int(seg_meta.input_size),
        image_size=int(dual_meta.image_size),
        lesion_size=int(dual_meta.lesion_size),
        use_lesion=bool(dual_meta.use_lesion),
        use_metadata=bool(dual_meta.use_metadata),
        provenance=pair_provenance(seg_meta, dual_meta),
    )


def load_version(
    path: str | Path, version: str, engine: str = "onnxruntime", threads: int = 1
) -> LesionSystem:
    """A registered pair (its folder in ``MODEL_DIR/versions/``), as the holder loads it."""
    return load_pair(Path(path) / SEG_FILE, Path(path) / DUAL_FILE, version, engine, threads)


def export_graphs(folder: Path, given: Mapping[str, tuple[Path, str]] | None = None) -> None:
    """The ONNX graphs of the pair registered in ``folder``, beside its checkpoints: copied from ``given``
    (checkpoint name -> a graph and the version it must hold, e.g. the release's) where that graph holds
    that version, else exported with PyTorch (kept if already there). A graph that cannot be written is
    logged: the pair is then served by PyTorch."""
    from backend.serving.multitask import graph_version
    from model.common.files import atomic_copy

    targets = dict(zip((SEG_FILE, DUAL_FILE), graphs_of(folder / SEG_FILE, folder / DUAL_FILE), strict=True))
    for name, target in targets.items():
        if target.is_file():
            continue
        try:
            source, version = (given or {}).get(name, (None, None))
            if source is not None and source.is_file() and graph_version(source) == version:
                atomic_copy(source, target)
            else:
                export_graph_apart(folder / name, target)
        except Exception:
            logger.exception("no ONNX graph for %s: the lesion pair is served with PyTorch", folder / name)


def export_graph_apart(checkpoint: Path, target: Path) -> None:
    """:func:`export_graph`, in a child process unless this one has imported PyTorch already: a serving
    worker installing the release stays free of PyTorch (hundreds of MB it would keep for good)."""
    if "torch" in sys.modules:
        export_graph(checkpoint, target)
        return
    done = subprocess.run(
        [sys.executable, "-m", "backend.serving.lesion", str(checkpoint), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"exporting {checkpoint} failed: {done.stderr.strip()[-2000:]}")


def export_graph(checkpoint: Path, target: Path) -> None:
    """One checkpoint of the pair (U-Net or classifier) as its ONNX graph at ``target`` (with PyTorch)."""
    from model.common.files import file_sha256
    from model.lesion.export import export_dual, export_segnet
    from model.lesion.meta import DualMeta, SegMeta
    from model.systems import load

    network, meta = load(checkpoint)
    # The graph names the file it was made from: load_pair serves it only beside that very file.
    meta = dataclasses.replace(meta, extra={**meta.extra, CHECKPOINT_SHA256: file_sha256(checkpoint)})
    if isinstance(meta, SegMeta):
        export_segnet(network, meta, target)  # type: ignore[arg-type]
    elif isinstance(meta, DualMeta):
        export_dual(network, meta, target)  # type: ignore[arg-type]
    else:
        raise ValueError(f"{checkpoint} holds a {meta.system} checkpoint, not one of the lesion pair")


def metadata_row(data: Mapping[str, Any] | None, config: ProjectConfig) -> dict[str, Any]:
    """Age / sex / site from a task's data, through the fields the config shows (absent: unknown)."""
    data = data or {}
    return {field: data.get(key) for field, key in config.metadata.items()}


def segment(system: LesionSystem, image: Image.Image) -> tuple[NDArray[np.bool_], FloatArray]:
    """The U-Net's lesion mask at the image's own size (probability >= 0.5), and the probabilities."""
    (probs,) = system.engine.segment(to_array(image, system.seg_size)[None])
    return _at_size(probs, image)


def _at_size(probs: FloatArray, image: Image.Image) -> tuple[NDArray[np.bool_], FloatArray]:
    """The U-Net's probabilities resized to the image's own size (bilinear, as PyTorch's
    ``interpolate``), and the mask where they are >= 0.5."""
    from model.lesion.meta import THRESHOLD
    from model.lesion.preprocess import resize

    prob = resize(probs, (image.height, image.width))
    return prob >= THRESHOLD, prob


def run_lesion(
    system: LesionSystem, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]]
) -> list[LesionOutput]:
    """Mask, then crop, then classify: the U-Net over the batch, then the classifier over the batch."""
    from model.lesion.preprocess import crop_lesion, encode_rows

    if not images:
        return []
    probs = system.engine.segment(np.stack([to_array(image, system.seg_size) for image in images]))
    masks, scores, crops = [], [], []
    for image, prob_small in zip(images, probs, strict=True):
        mask, prob = _at_size(prob_small, image)
        masks.append(mask)
        scores.append(float(prob[mask].mean()) if mask.any() else 0.0)
        if system.use_lesion:
            array = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1)
            crops.append(
                crop_lesion(array, mask if mask.any() else np.ones(mask.shape, bool), system.lesion_size)
            )
    inputs: dict[str, NDArray[Any]] = {
        "images": np.stack([to_array(image, system.image_size) for image in images])
    }
    if system.use_lesion:
        inputs["lesions"] = np.stack(crops)
    if system.use_metadata:
        inputs.update(encode_rows(rows))
    logits = system.engine.classify(inputs)[:, : len(HAM_CLASSES)].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax = exp / exp.sum(axis=1, keepdims=True)
    return [
        LesionOutput(mask=mask, mask_score=score, probs=dict(zip(HAM_CLASSES, map(float, row), strict=True)))
        for mask, score, row in zip(masks, scores, softmax, strict=True)
    ]


def lesion_prediction(
    output: LesionOutput,
    config: ProjectConfig,
    version: str,
    provenance: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], float | None]:
    """Label Studio result items for the HAM10000 diagnosis and the lesion mask, and the task score.

    With ``provenance``, an output not validated on real images is left out (and the task gets no score
    when the diagnosis is).
    """
    from model.common.provenance import shown

    items: list[dict[str, Any]] = []
    best = max(output.probs, key=lambda k: output.probs[k])
    ham = config.ham_diagnosis
    show_diagnosis = provenance is None or shown(provenance, DIAGNOSIS_OUTPUT)
    show_lesion = provenance is None or shown(provenance, LESION_OUTPUT)
    if ham is not None and best in ham.values and show_diagnosis:
        items.append(
            {
                "from_name": ham.name,
                "to_name": ham.to_name,
                "type": "choices",
                "value": {"choices": [ham.values[best]]},
                "score": round(output.probs[best], 6),
            }
        )
    lesion = config.lesion
    if lesion is not None and output.mask.any() and show_lesion:
        label = lesion.values.get(LESION_KEY, LESION_LABEL)
        items.append(brush_item(lesion.name, lesion.to_name, label, output.mask, output.mask_score))
    return items, round(output.probs[best], 6) if show_diagnosis else None


if __name__ == "__main__":  # python -m backend.serving.lesion CHECKPOINT TARGET: one graph, for _export_apart
    export_graph(Path(sys.argv[1]), Path(sys.argv[2]))
