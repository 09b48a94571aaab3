"""The second system in the backend: lesion mask + seven-class diagnosis for projects on ``lesion.xml``.

The pair of checkpoints (segmentation U-Net, dual-encoder classifier) lives in ``MODEL_DIR/lesion/``
(``dermassist models promote-lesion SEG DUAL`` copies them there atomically). Per image: the U-Net's
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
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from backend.label_studio.predictions import brush_item
from backend.serving.multitask import to_tensor
from labeling_config import HAM_CLASSES, LESION_LABEL
from labeling_config.parse import LESION_KEY, ProjectConfig
from model.common.checkpoint import atomic_copy

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
    released: bool = False


@dataclass(frozen=True)
class LesionOutput:
    mask: NDArray[np.bool_]  # (H, W) at the image's size
    mask_score: float
    probs: dict[str, float]  # HAM10000 class -> probability


def lesion_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "lesion"


def promote_lesion(model_dir: Path, segnet: str | Path, dual: str | Path) -> str:
    """Copy a segmentation and a dual-encoder checkpoint in as the served pair; returns its version.

    Raises:
        ValueError: a file is not the right kind of checkpoint.
    """
    from model.lesion.segmentation import load_segnet
    from model.lesion.train_dual import load_dual

    load_segnet(segnet)  # refuse wrong files before anything is replaced
    load_dual(dual)
    target = lesion_dir(model_dir)
    target.mkdir(parents=True, exist_ok=True)
    for source, name in ((segnet, SEG_FILE), (dual, DUAL_FILE)):
        atomic_copy(source, target / name)
    return _version((target / SEG_FILE, target / DUAL_FILE))


def _version(paths: tuple[Path, Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return f"lesion-{digest.hexdigest()[:12]}"


def pair_provenance(seg_raw: Mapping[str, Any], dual_raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The pair's outputs (``lesion``: the mask, ``diagnosis``: the seven classes) and where they come from:
    as the checkpoints record it (the release tool writes it), else judged from their validation figures
    (the U-Net's Dice at ``MIN_DICE``, the classifier's macro AUROC at ``MIN_AUROC``, on >= 100 real
    images); a checkpoint with neither counts as untrained."""
    from model.common.provenance import MIN_AUROC, MIN_DICE, from_figure

    seg = dict(seg_raw.get("provenance") or {})
    dual = dict(dual_raw.get("provenance") or {})
    meta = seg_raw.get("meta", {})
    extra = meta.get("extra", {})
    if LESION_OUTPUT not in seg and "val_dice" in meta.get("metrics", {}):
        seg[LESION_OUTPUT] = from_figure(
            "dice", float(meta["metrics"]["val_dice"]), int(extra.get("n_val", 0)), MIN_DICE,
            bool(extra.get("synthetic")), "the U-Net's own validation split",
        )  # fmt: skip
    metrics = dual_raw.get("metrics") or {}
    if DIAGNOSIS_OUTPUT not in dual and "auroc_macro" in metrics:
        dual[DIAGNOSIS_OUTPUT] = from_figure(
            "auroc_macro", float(metrics["auroc_macro"]), int(dual_raw.get("n_val", 0)), MIN_AUROC,
            bool(dual_raw.get("synthetic")), "the classifier's own validation split",
        )  # fmt: skip
    return {LESION_OUTPUT: seg.get(LESION_OUTPUT, {}), DIAGNOSIS_OUTPUT: dual.get(DIAGNOSIS_OUTPUT, {})}


class LesionHolder:
    """Loads the pair once per process; reloads when the files change (a new promotion).

    The pair promoted into ``MODEL_DIR/lesion/`` is served; without one, the released pair
    (``fallback``: the U-Net's and the dual classifier's files, SHA-256 checked by
    ``backend.serving.release``).
    """

    def __init__(self, model_dir: Path, fallback: tuple[Path, Path] | None = None) -> None:
        self.folder = lesion_dir(model_dir)
        self.fallback = fallback
        self._current: LesionSystem | None = None
        self._stamp: tuple[str, float, float] | None = None
        self._lock = threading.Lock()

    def _paths(self) -> tuple[Path, Path] | None:
        promoted = (self.folder / SEG_FILE, self.folder / DUAL_FILE)
        if promoted[0].is_file() and promoted[1].is_file():
            return promoted
        return self.fallback

    def available(self) -> bool:
        return self._paths() is not None

    def get(self) -> LesionSystem | None:
        paths = self._paths()
        if paths is None:
            return None
        stamp = (str(paths[0]), paths[0].stat().st_mtime, paths[1].stat().st_mtime)
        if self._current is not None and stamp == self._stamp:
            return self._current
        with self._lock:
            if self._current is None or stamp != self._stamp:
                from model.common.checkpoint import read_checkpoint
                from model.lesion.segmentation import load_segnet
                from model.lesion.train_dual import load_dual

                segnet, seg_meta = load_segnet(paths[0])
                dual, dual_meta = load_dual(paths[1])
                config = dual_meta["config"]
                self._current = LesionSystem(
                    version=_version(paths),
                    segnet=segnet.eval(),
                    seg_size=int(seg_meta.input_size),
                    dual=dual.eval(),
                    image_size=int(config["image_size"]),
                    lesion_size=int(config["lesion_size"]),
                    provenance=pair_provenance(read_checkpoint(paths[0]), dual_meta),
                    released=paths == self.fallback,
                )
                self._stamp = stamp
            return self._current


def metadata_row(data: Mapping[str, Any] | None, config: ProjectConfig) -> dict[str, Any]:
    """Age / sex / site from a task's data, through the fields the config shows (absent: unknown)."""
    data = data or {}
    return {field: data.get(key) for field, key in config.metadata.items()}


@torch.no_grad()
def segment(system: LesionSystem, image: Image.Image) -> tuple[NDArray[np.bool_], torch.Tensor]:
    """The U-Net's lesion mask at the image's own size (probability >= 0.5), and the probabilities."""
    seg_in = to_tensor(image, system.seg_size)[None]
    prob = torch.sigmoid(system.segnet(seg_in))
    prob = F.interpolate(prob, size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0]
    return (prob >= 0.5).numpy(), prob


@torch.no_grad()
def run_lesion(
    system: LesionSystem, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]]
) -> list[LesionOutput]:
    """Mask, then crop, then classify each image."""
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
