"""The dual-encoder classifier of Atiq & Fattah (arXiv:2510.17773): image + lesion + clinical metadata.

Two CNN encoders look at the whole dermoscopic image and at the segmented lesion (a crop around the
lesion mask, resized); their feature maps become token sequences that are fused by multi-head
cross-attention (image tokens query lesion tokens). Patient metadata (age, sex, anatomical site)
becomes three tokens plus a summary token that a small transformer encoder mixes; missing values
have their own learned embeddings ("unknown" sex / site, a missing-age flag), so an absent field is
information rather than an error. The pooled image-attends-lesion tokens, the pooled lesion tokens and
the metadata summary are concatenated and feed two heads: the seven HAM10000 diagnoses and BCC.

The backbone is selectable: MobileNet-V2 by default (trains on a CPU), DenseNet-201 as in the paper.
``use_lesion`` / ``use_metadata`` switch the branches off for the ablation (same heads, same budget).

Grad-CAM: :class:`ImageBranch` presents the image encoder as ``forward_features`` / ``forward_heads``
(the lesion and metadata inputs held fixed), so :func:`model.common.explain.explain` gives the maps of every
output for the image branch through its autograd path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from labeling_config import HAM_CLASSES, SEXES, SITES
from model.common.checkpoint import load_network
from model.common.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_features_state
from model.lesion.meta import DUAL_ARCH, DualMeta
from model.lesion.preprocess import encode_rows, lesion_box

ARCH = DUAL_ARCH
BACKBONES = ("mobilenet_v2", "densenet201")


@dataclass(frozen=True)
class Metadata:
    """Encoded metadata of a batch: ``age`` (B,) in years / 100, ``age_missing`` (B,) 0/1,
    ``sex`` (B,) index into ``SEXES``, ``site`` (B,) index into ``SITES``."""

    age: torch.Tensor
    age_missing: torch.Tensor
    sex: torch.Tensor
    site: torch.Tensor

    def to(self, device: torch.device | str) -> Metadata:
        return Metadata(*(t.to(device) for t in (self.age, self.age_missing, self.sex, self.site)))


def encode_metadata(rows: Sequence[Mapping[str, Any]]) -> Metadata:
    """Age / sex / site of each row as tensors (:func:`model.lesion.preprocess.encode_rows`: missing or
    unreadable values become "unknown" or a missing-age flag)."""
    arrays = encode_rows(rows)
    return Metadata(*(torch.from_numpy(arrays[key]) for key in ("age", "age_missing", "sex", "site")))


def lesion_crop(image: torch.Tensor, mask: NDArray[Any], size: int, margin: float = 0.1) -> torch.Tensor:
    """The segmented lesion as the lesion encoder sees it: the image cropped to the mask's box, resized.

    Args:
        image: ``(3, H, W)`` in [0, 1].
        mask: ``(H, W)`` lesion mask (any truthy values).
        size: output side.
    """
    top, left, bottom, right = lesion_box(np.asarray(mask), margin)
    crop = image[:, top:bottom, left:right]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[
        0
    ]


def _backbone(name: str, width_mult: float) -> tuple[nn.Module, int]:
    from torchvision import models

    if name == "mobilenet_v2":
        net = models.mobilenet_v2(weights=None, width_mult=width_mult)
        return net.features, int(net.last_channel)
    if name == "densenet201":
        dense = models.densenet201(weights=None)
        return nn.Sequential(dense.features, nn.ReLU(inplace=True)), int(dense.classifier.in_features)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


class MetadataTransformer(nn.Module):
    """Age, sex and site as tokens (plus a summary token) through a small transformer encoder."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.age = nn.Linear(2, dim)  # value and missing flag
        self.sex = nn.Embedding(len(SEXES), dim)
        self.site = nn.Embedding(len(SITES), dim)
        self.summary = nn.Parameter(torch.zeros(1, 1, dim))
        self.kind = nn.Parameter(torch.zeros(1, 4, dim))  # which field each token is
        nn.init.normal_(self.summary, std=0.02)
        nn.init.normal_(self.kind, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, meta: Metadata) -> torch.Tensor:
        age = self.age(torch.stack([meta.age, meta.age_missing], dim=-1))
        tokens = torch.stack([age, self.sex(meta.sex), self.site(meta.site)], dim=1)
        summary = self.summary.expand(tokens.shape[0], -1, -1)
        out: torch.Tensor = self.encoder(torch.cat([summary, tokens], dim=1) + self.kind)
        summarised: torch.Tensor = self.norm(out[:, 0])
        return summarised


class DualNet(nn.Module):
    """Image encoder + lesion encoder fused by cross-attention, + metadata; heads for HAM10000 and BCC.

    Args:
        backbone: ``"mobilenet_v2"`` (default, CPU) or ``"densenet201"`` (the paper's).
        width_mult: MobileNet-V2 width multiplier.
        dim: token width of the fusion.
        heads: attention heads.
        use_lesion: the lesion encoder and the cross-attention (off: image only).
        use_metadata: the metadata transformer (off: no metadata).
        dropout: before the heads.
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        width_mult: float = 1.0,
        dim: int = 128,
        heads: int = 4,
        use_lesion: bool = True,
        use_metadata: bool = True,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.width_mult, self.dim, self.heads, self.dropout_p = width_mult, dim, heads, dropout
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone, self.use_lesion, self.use_metadata = backbone, use_lesion, use_metadata
        self.image_encoder, channels = _backbone(backbone, width_mult)
        self.image_proj = nn.Conv2d(channels, dim, 1)
        fused = dim
        if use_lesion:
            self.lesion_encoder, _ = _backbone(backbone, width_mult)
            self.lesion_proj = nn.Conv2d(channels, dim, 1)
            self.cross = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
            self.cross_norm = nn.LayerNorm(dim)
            fused += dim
        if use_metadata:
            self.metadata = MetadataTransformer(dim=64)
            fused += 64
        self.fuse = nn.Sequential(nn.Dropout(dropout), nn.Linear(fused, dim), nn.GELU(), nn.Dropout(dropout))
        self.diagnosis_head = nn.Linear(dim, len(HAM_CLASSES))
        self.bcc_head = nn.Linear(dim, 1)

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this architecture (stored in checkpoints)."""
        return {
            "backbone": self.backbone,
            "width_mult": self.width_mult,
            "dim": self.dim,
            "heads": self.heads,
            "use_lesion": self.use_lesion,
            "use_metadata": self.use_metadata,
            "dropout": self.dropout_p,
        }

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean: torch.Tensor = self.mean  # type: ignore[assignment]
        std: torch.Tensor = self.std  # type: ignore[assignment]
        return (x - mean) / std

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """The image encoder's last feature map (the Grad-CAM layer)."""
        features: torch.Tensor = self.image_encoder(self._normalise(image))
        return features

    def heads_from(
        self, image_features: torch.Tensor, lesion: torch.Tensor | None, meta: Metadata | None
    ) -> torch.Tensor:
        """``(B, 8)`` logits: the seven diagnoses, then BCC, from the image feature map and the rest."""
        tokens = self.image_proj(image_features).flatten(2).transpose(1, 2)  # (B, hw, dim)
        parts = []
        if self.use_lesion:
            if lesion is None:
                raise ValueError("this model has a lesion encoder: give the lesion crop")
            lesion_tokens = (
                self.lesion_proj(self.lesion_encoder(self._normalise(lesion))).flatten(2).transpose(1, 2)
            )
            attended, _ = self.cross(tokens, lesion_tokens, lesion_tokens, need_weights=False)
            parts += [self.cross_norm(tokens + attended).mean(dim=1), lesion_tokens.mean(dim=1)]
        else:
            parts.append(tokens.mean(dim=1))
        if self.use_metadata:
            if meta is None:
                raise ValueError("this model reads metadata: give encode_metadata(...) of the batch")
            parts.append(self.metadata(meta))
        hidden = self.fuse(torch.cat(parts, dim=1))
        return torch.cat([self.diagnosis_head(hidden), self.bcc_head(hidden)], dim=1)

    def forward(
        self, image: torch.Tensor, lesion: torch.Tensor | None = None, meta: Metadata | None = None
    ) -> torch.Tensor:
        """``(B, 8)`` logits: softmax over the first seven (HAM10000 order), sigmoid of the last (BCC)."""
        return self.heads_from(self.image_features(image), lesion, meta)


class ImageBranch(nn.Module):
    """A :class:`DualNet` seen as ``forward_features`` / ``forward_heads`` of its image, the lesion crop
    and metadata held fixed: what :func:`model.common.explain.explain` needs for Grad-CAM of every output."""

    def __init__(self, model: DualNet, lesion: torch.Tensor | None, meta: Metadata | None) -> None:
        super().__init__()
        self.model, self.lesion, self.meta = model, lesion, meta

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(x)

    def forward_heads(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.heads_from(features, self.lesion, self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_heads(self.forward_features(x))


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagnosis probabilities ``(B, 7)`` and BCC probability ``(B,)`` from the ``(B, 8)`` logits."""
    return logits[:, : len(HAM_CLASSES)].softmax(dim=1), torch.sigmoid(logits[:, len(HAM_CLASSES)])


def dual_from_meta(meta: DualMeta) -> DualNet:
    """An untrained :class:`DualNet` with the architecture ``meta`` describes."""
    return DualNet(
        backbone=meta.backbone,
        width_mult=meta.width_mult,
        dim=meta.dim,
        heads=meta.heads,
        use_lesion=meta.use_lesion,
        use_metadata=meta.use_metadata,
        dropout=meta.dropout,
    )


def load_dual_checkpoint(path: str | Path) -> tuple[DualNet, DualMeta]:
    """Load a dual-encoder checkpoint's network (in eval mode) and its metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a dermassist checkpoint, or another system's.
    """
    return load_network(path, DualMeta, dual_from_meta)


def build_dual(weights: str | None = None, **kwargs: Any) -> DualNet:
    """A :class:`DualNet`; ``weights="imagenet"`` starts both MobileNet-V2 encoders from torchvision's
    ImageNet file in the local cache (``make weights``; nothing is downloaded).

    Raises:
        FileNotFoundError: the ImageNet file is absent.
        ValueError: ImageNet weights asked for another backbone or width.
    """
    model = DualNet(**kwargs)
    if weights is None:
        return model
    if weights != "imagenet":
        raise ValueError(
            f"weights must be None or 'imagenet', got {weights!r} (checkpoints: load_dual_checkpoint)"
        )
    if model.backbone != "mobilenet_v2" or kwargs.get("width_mult", 1.0) != 1.0:
        raise ValueError("local ImageNet weights exist for MobileNet-V2 at width 1.0 only")
    state = imagenet_features_state()
    model.image_encoder.load_state_dict(state)
    if model.use_lesion:
        model.lesion_encoder.load_state_dict(state)
    return model
