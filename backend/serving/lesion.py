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

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from backend.label_studio.predictions import brush_item
from backend.serving import registry
from backend.serving.multitask import to_tensor
from backend.serving.registry import LESION, Candidate
from consensus.models import ModelVersion
from labeling_config import HAM_CLASSES, LESION_LABEL
from labeling_config.parse import LESION_KEY, ProjectConfig
from model.common.meta import ModelMeta

if TYPE_CHECKING:
    import torch

    from model.lesion.dual import DualMeta
    from model.lesion.segmentation import SegMeta

SEG_FILE, DUAL_FILE = "segnet.pt", "dual.pt"
LESION_OUTPUT, DIAGNOSIS_OUTPUT = "lesion", "diagnosis"  # the pair's outputs, for provenance


@dataclass(frozen=True)
class LesionSystem:
    """The loaded pair and its version (``lesion-<hash of both files>``)."""

    version: str
    segnet: Any
    seg_size: int
    dual: Any
    image_size: int
    lesion_size: int
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
    from model.lesion.dual import DualMeta
    from model.lesion.segmentation import SegMeta
    from model.systems import load

    seg_net, seg_meta = load(segnet)
    dual_net, dual_meta = load(dual)
    for path, meta, kind in ((segnet, seg_meta, SegMeta), (dual, dual_meta, DualMeta)):
        if not isinstance(meta, kind):
            raise ValueError(f"{path} holds a {meta.system} checkpoint, not a {kind.SYSTEM} one")
    assert isinstance(seg_meta, SegMeta) and isinstance(dual_meta, DualMeta)
    return seg_net, seg_meta, dual_net, dual_meta


def pair_candidate(segnet: str | Path, dual: str | Path) -> Candidate:
    """A U-Net and a dual-encoder checkpoint as a version of the ``lesion`` system.

    Raises:
        FileNotFoundError, ValueError: a file is missing or not the right kind of checkpoint.
    """
    _, seg_meta, _, dual_meta = _read_pair(segnet, dual)  # wrong files are refused before registering
    return Candidate(
        system=LESION,
        version=pair_version(Path(segnet), Path(dual)),
        files={SEG_FILE: Path(segnet), DUAL_FILE: Path(dual)},
        outputs=(LESION_OUTPUT, DIAGNOSIS_OUTPUT),
        provenance=pair_provenance(seg_meta, dual_meta),
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


def load_pair(segnet: str | Path, dual: str | Path, version: str | None = None) -> LesionSystem:
    """The pair loaded for serving (eval mode), with its outputs' provenance.

    Raises:
        FileNotFoundError, ValueError: a file is missing or not the right kind of checkpoint.
    """
    seg_net, seg_meta, dual_net, dual_meta = _read_pair(segnet, dual)
    return LesionSystem(
        version=version or pair_version(Path(segnet), Path(dual)),
        segnet=seg_net.eval(),
        seg_size=int(seg_meta.input_size),
        dual=dual_net.eval(),
        image_size=int(dual_meta.image_size),
        lesion_size=int(dual_meta.lesion_size),
        provenance=pair_provenance(seg_meta, dual_meta),
    )


def load_version(path: str | Path, version: str) -> LesionSystem:
    """A registered pair (its folder in ``MODEL_DIR/versions/``), as the holder loads it."""
    return load_pair(Path(path) / SEG_FILE, Path(path) / DUAL_FILE, version)


def metadata_row(data: Mapping[str, Any] | None, config: ProjectConfig) -> dict[str, Any]:
    """Age / sex / site from a task's data, through the fields the config shows (absent: unknown)."""
    data = data or {}
    return {field: data.get(key) for field, key in config.metadata.items()}


def segment(system: LesionSystem, image: Image.Image) -> tuple[NDArray[np.bool_], torch.Tensor]:
    """The U-Net's lesion mask at the image's own size (probability >= 0.5), and the probabilities."""
    import torch
    import torch.nn.functional as F

    seg_in = to_tensor(image, system.seg_size)[None]
    with torch.no_grad():
        prob = torch.sigmoid(system.segnet(seg_in))
    prob = F.interpolate(prob, size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0]
    return (prob >= 0.5).numpy(), prob


def run_lesion(
    system: LesionSystem, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]]
) -> list[LesionOutput]:
    """Mask, then crop, then classify each image."""
    import torch

    with torch.no_grad():
        return _run_lesion(system, images, rows)


def _run_lesion(
    system: LesionSystem, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]]
) -> list[LesionOutput]:
    import torch

    from model.lesion.dual import encode_metadata, lesion_crop

    outputs = []
    for image, row in zip(images, rows, strict=True):
        array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        mask, prob = segment(system, image)
        crop = lesion_crop(array, mask if mask.any() else np.ones(mask.shape, bool), system.lesion_size)
        logits = system.dual(
            to_tensor(image, system.image_size)[None],
            crop[None] if system.dual.use_lesion else None,
            encode_metadata([row]) if system.dual.use_metadata else None,
        )
        probs = logits[0, : len(HAM_CLASSES)].softmax(0).tolist()
        outputs.append(
            LesionOutput(
                mask=mask,
                mask_score=float(prob[torch.from_numpy(mask)].mean()) if mask.any() else 0.0,
                probs=dict(zip(HAM_CLASSES, probs, strict=True)),
            )
        )
    return outputs


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
