"""The BCC model as an ONNX graph for serving with ONNX Runtime (no PyTorch at inference).

The graph takes images ``(B, 3, S, S)`` in [0, 1] (normalised inside, as :class:`DermNet` does) and
gives, from one pass: ``logits`` ``(B, K)`` in ``TARGETS`` order; ``cams`` ``(B, K, h, w)``, the raw
Grad-CAM map of every output at feature resolution; and, for the acquisition strategies
(:mod:`model.common.acquisition`), ``embedding`` ``(B, C)`` (the pooled features: the core-set's space)
and ``mc_logits`` ``(B, T, K)``, the heads under ``T`` fixed Monte Carlo dropout masks (BALD). With
global average pooling and linear heads, Grad-CAM's weights are the head weights over ``h * w``
(:mod:`model.common.explain`), so the maps are one contraction of the last feature map inside the
graph, exactly as the PyTorch path computes them.
The checkpoint's metadata travels in the file (``metadata_props["dermassist.meta"]``, JSON), so a served
ONNX file needs nothing beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.common.onnx import write_onnx
from model.multitask.meta import GRAPH_OUTPUTS, INPUT, CheckpointMeta
from model.multitask.network import DermNet, dropout_masks


class Explained(nn.Module):
    """DermNet's logits, every output's raw Grad-CAM map, the pooled embedding and the Monte Carlo
    dropout logits, from one forward pass (in eval mode: ``logits`` has no dropout)."""

    masks: torch.Tensor

    def __init__(self, network: DermNet) -> None:
        super().__init__()
        self.network = network
        weights = network.head_weights().detach().clone()
        self.register_buffer("weights", weights)
        self.register_buffer("masks", dropout_masks(weights.shape[1], network.dropout_p))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.network.features((images - self.network.mean) / self.network.std)
        logits = self.network.forward_heads(features)
        h, w = features.shape[-2:]
        cams = torch.einsum("kc,bchw->bkhw", self.weights, features) / (h * w)
        pooled = features.mean(dim=(-2, -1))
        samples = self.network.head_samples(pooled, self.masks)
        return logits, cams.clamp_min(0.0), pooled, samples


def export_onnx(network: DermNet, meta: CheckpointMeta, path: str | Path) -> Path:
    """Write ``network`` (with ``meta``) as an ONNX file at ``path``, atomically; returns the path.

    The batch size is dynamic; the image side is ``meta.input_size``.
    """
    example = torch.rand(2, 3, meta.input_size, meta.input_size)
    return write_onnx(Explained(network), (example,), (INPUT,), GRAPH_OUTPUTS, meta, path)
