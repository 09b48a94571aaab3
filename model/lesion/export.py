"""The lesion pair as ONNX graphs, for serving with ONNX Runtime (no PyTorch at inference).

- the U-Net: ``images`` ``(B, 3, S, S)`` in [0, 1] -> ``probs`` ``(B, 1, S, S)``, the lesion probability
  of every pixel (sigmoid inside); the caller resizes it to the image's own size and thresholds it
  (:func:`model.lesion.preprocess.resize`, as serving with PyTorch does);
- the dual classifier: ``images`` ``(B, 3, I, I)``, ``lesions`` ``(B, 3, L, L)`` (the crop,
  :func:`model.lesion.preprocess.crop_lesion`) and the metadata ``age``, ``age_missing`` (float32),
  ``sex``, ``site`` (int64, :func:`model.lesion.preprocess.encode_rows`) -> ``logits`` ``(B, 8)``. A
  classifier without the lesion or the metadata branch has no such inputs.

Each graph carries its checkpoint's metadata (``metadata_props["dermassist.meta"]``, JSON), as the BCC
model's does (:mod:`model.multitask.export`), and is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.common.onnx import write_onnx
from model.lesion.dual import DualNet, Metadata
from model.lesion.meta import DualMeta, SegMeta
from model.lesion.unet import SegNet

SEG_INPUTS, SEG_OUTPUTS = ("images",), ("probs",)
META_INPUTS = ("age", "age_missing", "sex", "site")
DUAL_OUTPUTS = ("logits",)


def dual_inputs(meta: DualMeta) -> tuple[str, ...]:
    """The dual classifier graph's input names, in order."""
    return (
        ("images",) + (("lesions",) if meta.use_lesion else ()) + (META_INPUTS if meta.use_metadata else ())
    )


class _SegProbs(nn.Module):
    def __init__(self, network: SegNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(images))


class _DualLogits(nn.Module):
    def __init__(self, network: DualNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        net, parts = self.network, list(rest)
        lesions = parts.pop(0) if net.use_lesion else None
        meta = Metadata(*parts) if net.use_metadata else None
        logits: torch.Tensor = net(images, lesions, meta)
        return logits


def export_segnet(network: SegNet, meta: SegMeta, path: str | Path) -> Path:
    """Write the U-Net (with ``meta``) as an ONNX file at ``path``, atomically; the path."""
    side = int(meta.input_size)
    return write_onnx(
        _SegProbs(network), (torch.rand(2, 3, side, side),), SEG_INPUTS, SEG_OUTPUTS, meta, path
    )


def export_dual(network: DualNet, meta: DualMeta, path: str | Path) -> Path:
    """Write the dual classifier (with ``meta``) as an ONNX file at ``path``, atomically; the path."""
    batch = 2
    example: list[torch.Tensor] = [torch.rand(batch, 3, meta.image_size, meta.image_size)]
    if meta.use_lesion:
        example.append(torch.rand(batch, 3, meta.lesion_size, meta.lesion_size))
    if meta.use_metadata:
        example += [
            torch.rand(batch),
            torch.zeros(batch),
            torch.zeros(batch, dtype=torch.long),
            torch.ones(batch, dtype=torch.long),
        ]
    return write_onnx(_DualLogits(network), tuple(example), dual_inputs(meta), DUAL_OUTPUTS, meta, path)
