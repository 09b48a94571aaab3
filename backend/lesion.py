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
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from backend.ls_predictions import brush_item
from backend.predictor import to_tensor
from labeling_config import HAM_CLASSES, LESION_LABEL
from labeling_config.parse import LESION_KEY, ProjectConfig

SEG_FILE, DUAL_FILE = "segnet.pt", "dual.pt"


@dataclass(frozen=True)
class LesionSystem:
    """The loaded pair and its version (``lesion-<hash of both files>``)."""

    version: str
    segnet: Any
    seg_size: int
    dual: Any
    image_size: int
    lesion_size: int


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
    from model.segmentation import load_segnet
    from model.train_dual import load_dual

    load_segnet(segnet)  # refuse wrong files before anything is replaced
    load_dual(dual)
    target = lesion_dir(model_dir)
    target.mkdir(parents=True, exist_ok=True)
    for source, name in ((segnet, SEG_FILE), (dual, DUAL_FILE)):
        with (
            tempfile.NamedTemporaryFile(dir=target, prefix=f".{name}.", delete=False) as tmp,
            Path(source).open("rb") as src,
        ):
            shutil.copyfileobj(src, tmp)
        Path(tmp.name).replace(target / name)
    return _version(target)


def _version(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in (SEG_FILE, DUAL_FILE):
        digest.update((folder / name).read_bytes())
    return f"lesion-{digest.hexdigest()[:12]}"


class LesionHolder:
    """Loads the pair once per process; reloads when the files change (a new promotion)."""

    def __init__(self, model_dir: Path) -> None:
        self.folder = lesion_dir(model_dir)
        self._current: LesionSystem | None = None
        self._stamp: tuple[float, float] | None = None
        self._lock = threading.Lock()

    def available(self) -> bool:
        return (self.folder / SEG_FILE).is_file() and (self.folder / DUAL_FILE).is_file()

    def get(self) -> LesionSystem | None:
        if not self.available():
            return None
        stamp = ((self.folder / SEG_FILE).stat().st_mtime, (self.folder / DUAL_FILE).stat().st_mtime)
        if self._current is not None and stamp == self._stamp:
            return self._current
        with self._lock:
            if self._current is None or stamp != self._stamp:
                from model.segmentation import load_segnet
                from model.train_dual import load_dual

                segnet, seg_meta = load_segnet(self.folder / SEG_FILE)
                dual, dual_meta = load_dual(self.folder / DUAL_FILE)
                config = dual_meta["config"]
                self._current = LesionSystem(
                    version=_version(self.folder),
                    segnet=segnet.eval(),
                    seg_size=int(seg_meta.input_size),
                    dual=dual.eval(),
                    image_size=int(config["image_size"]),
                    lesion_size=int(config["lesion_size"]),
                )
                self._stamp = stamp
            return self._current


def metadata_row(data: Mapping[str, Any] | None, config: ProjectConfig) -> dict[str, Any]:
    """Age / sex / site from a task's data, through the fields the config shows (absent: unknown)."""
    data = data or {}
    return {field: data.get(key) for field, key in config.metadata.items()}


@torch.no_grad()
def run_lesion(
    system: LesionSystem, images: Sequence[Image.Image], rows: Sequence[Mapping[str, Any]]
) -> list[LesionOutput]:
    """Mask, then crop, then classify each image."""
    from model.dual import encode_metadata, lesion_crop

    outputs = []
    for image, row in zip(images, rows, strict=True):
        array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        seg_in = to_tensor(image, system.seg_size)[None]
        prob = torch.sigmoid(system.segnet(seg_in))
        prob = F.interpolate(prob, size=array.shape[1:], mode="bilinear", align_corners=False)[0, 0]
        mask = (prob >= 0.5).numpy()
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
    output: LesionOutput, config: ProjectConfig, version: str
) -> tuple[list[dict[str, Any]], float]:
    """Label Studio result items for the HAM10000 diagnosis and the lesion mask, and the task score."""
    items: list[dict[str, Any]] = []
    best = max(output.probs, key=lambda k: output.probs[k])
    ham = config.ham_diagnosis
    if ham is not None and best in ham.values:
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
    if lesion is not None and output.mask.any():
        label = lesion.values.get(LESION_KEY, LESION_LABEL)
        items.append(brush_item(lesion.name, lesion.to_name, label, output.mask, output.mask_score))
    return items, round(output.probs[best], 6)
