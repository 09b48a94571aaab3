"""Grad-CAM for every output from one forward pass, and the way back to region masks.

Grad-CAM (Selvaraju et al. 2017) weights the last feature map ``A`` (``C x h x w``) by the spatial mean of
the output's gradient and keeps the positive part: ``cam_k = ReLU(sum_c alpha_kc A_c)`` with
``alpha_kc = mean_ij d y_k / d A_cij``. When the head is global average pooling followed by a linear
layer ``y_k = sum_c W_kc mean_ij A_cij + b_k``, the gradient is ``W_kc / (h w)`` everywhere, so all
maps are one contraction ``einsum(W, A) / (h w)`` of the features of the same forward pass that gives
the predictions: no backward pass at all. Any other head (attention, metadata fusion) gets its
gradients from one batched ``torch.autograd.grad`` over the feature map.

Maps are post-processed as pytorch-grad-cam does (``scale_cam_image``): min-max to [0, 1], bilinear
resize to the input size, ReLU, min-max again; so ours equal ``GradCAM(model, [features[-1]])`` with
``ClassifierOutputTarget(k)``. pytorch-grad-cam stays available for its other methods
(:func:`library_cams`).

Region masks (:func:`cam_to_mask`, from :mod:`model.common.maps`, NumPy only): a map resized to the
image's original size, thresholded at ``threshold`` (default 0.5, i.e. half the map's maximum),
restricted to the lesion when a lesion mask is given. :func:`compact_region` is what the backend draws:
the map inside the lesion, its peak's connected piece, at most a set share of the lesion. The output's
probability is reported beside each mask, never folded into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from model.common.maps import cam_to_mask, compact_region

__all__ = [
    "LIBRARY_METHODS",
    "Explanation",
    "cam_to_mask",
    "compact_region",
    "explain",
    "library_cams",
    "scale_maps",
]

_EPS = 1e-7  # pytorch-grad-cam's guard in its min-max scaling

LIBRARY_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam")


class Explainable(Protocol):
    """A network split at the layer Grad-CAM looks at."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_heads(self, features: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Explanation:
    """Predictions and their maps from one pass.

    Attributes:
        logits: ``(B, K)`` raw outputs.
        probs: ``(B, K)`` sigmoid of ``logits / temperature``.
        cams: ``(B, K, H, W)`` maps in [0, 1] at the requested size (default: the input size).
        raw: ``(B, K, h, w)`` feature-resolution maps, ReLU'd but not normalised (for resizing
            to each image's original size without a detour through the input size).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    cams: torch.Tensor
    raw: torch.Tensor


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    shifted = flat - low
    high = shifted.max(dim=-1, keepdim=True).values
    return (shifted / (_EPS + high)).view_as(maps)


def scale_maps(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's scaling of ``(..., h, w)`` maps to ``size = (H, W)``.

    Min-max to [0, 1], bilinear resize, ReLU, min-max again: the steps of ``scale_cam_image``.
    """
    lead = raw.shape[:-2]
    maps = _minmax(raw.reshape(-1, 1, *raw.shape[-2:]))
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return _minmax(maps.clamp_min(0.0)).reshape(*lead, *size)


def _linear_head(model: Any) -> torch.Tensor | None:
    """The stacked head weights when the head is average pooling + linear layers, else None."""
    head_weights = getattr(model, "head_weights", None)
    pool = getattr(model, "pool", None)
    if (
        head_weights is None
        or not isinstance(pool, torch.nn.AdaptiveAvgPool2d)
        or pool.output_size not in (1, (1, 1))
    ):
        return None
    weights = head_weights()
    return weights if isinstance(weights, torch.Tensor) else None


@torch.no_grad()
def _cams_linear(
    model: Explainable, weights: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    features = model.forward_features(x)
    logits = model.forward_heads(features)
    h, w = features.shape[-2:]
    raw = torch.einsum("kc,bchw->bkhw", weights, features) / (h * w)
    return logits, raw.clamp_min(0.0)


def _cams_autograd(model: Explainable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        features = model.forward_features(x).detach().requires_grad_(True)
        logits = model.forward_heads(features)
        k = logits.shape[1]
        # One batched backward pass: row k of the identity selects output k for every image.
        eye = torch.eye(k, dtype=logits.dtype, device=logits.device)
        grad_outputs = eye[:, None, :].expand(k, *logits.shape)
        (grads,) = torch.autograd.grad(logits, features, grad_outputs=grad_outputs, is_grads_batched=True)
    alpha = grads.mean(dim=(-2, -1))  # (K, B, C)
    raw = torch.einsum("kbc,bchw->bkhw", alpha, features.detach())
    return logits.detach(), raw.clamp_min(0.0)


def explain(
    model: Explainable,
    images: torch.Tensor,
    temperatures: Sequence[float] | torch.Tensor | None = None,
    size: tuple[int, int] | None = None,
    method: str = "auto",
) -> Explanation:
    """Predictions and one Grad-CAM map per output, from one forward pass.

    Args:
        model: a network with ``forward_features`` and ``forward_heads`` (e.g. ``DermNet``); it is
            used as it is, so call ``model.eval()`` first for inference.
        images: ``(B, 3, H, W)`` in [0, 1].
        temperatures: per-output temperatures for the probabilities (default 1).
        size: ``(H, W)`` of the returned maps (default: the input size).
        method: ``"auto"`` (closed form for linear heads, else autograd), ``"linear"`` or ``"autograd"``.

    Returns:
        An :class:`Explanation`.

    Raises:
        ValueError: for a bad method, a linear method on a model without a linear head, or images
            of the wrong shape.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if method not in ("auto", "linear", "autograd"):
        raise ValueError(f"method must be 'auto', 'linear' or 'autograd', got {method!r}")
    weights = _linear_head(model) if method != "autograd" else None
    if method == "linear" and weights is None:
        raise ValueError("method='linear' needs average pooling followed by linear heads")
    if weights is not None:
        logits, raw = _cams_linear(model, weights.detach(), images)
    else:
        logits, raw = _cams_autograd(model, images)
    temp = (
        torch.ones(logits.shape[1])
        if temperatures is None
        else torch.as_tensor(temperatures, dtype=logits.dtype)
    )
    probs = torch.sigmoid(logits / temp.to(logits.device))
    cams = scale_maps(raw, size or (images.shape[-2], images.shape[-1]))
    return Explanation(logits=logits, probs=probs, cams=cams, raw=raw)


def library_cams(
    model: torch.nn.Module, images: torch.Tensor, target_layer: torch.nn.Module, method: str = "gradcam"
) -> NDArray[np.float32]:
    """Maps from pytorch-grad-cam, one call per output: the reference, and the door to other methods.

    ``model`` must return ``(B, K)`` logits. pytorch-grad-cam puts the model in eval mode; the
    previous mode is restored afterwards. Hooks are released by the context manager.

    Returns:
        ``(B, K, H, W)`` maps in [0, 1].
    """
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {
        "gradcam": GradCAM,
        "gradcam++": GradCAMPlusPlus,
        "xgradcam": XGradCAM,
        "layercam": LayerCAM,
        "eigencam": EigenCAM,
        "scorecam": ScoreCAM,
    }
    if method not in classes:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {list(classes)}")
    was_training = model.training
    with torch.no_grad():
        k = model(images[:1]).shape[1]
    maps = np.zeros((images.shape[0], k, *images.shape[-2:]), dtype=np.float32)
    try:
        with classes[method](model=model, target_layers=[target_layer]) as cam:
            for target in range(k):
                out = cam(input_tensor=images, targets=[ClassifierOutputTarget(target)] * images.shape[0])
                if out.shape != (images.shape[0], *images.shape[-2:]):
                    raise ValueError(f"pytorch-grad-cam returned maps of shape {out.shape}")
                maps[:, target] = out
    finally:
        model.train(was_training)
    return maps
