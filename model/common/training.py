"""What the three trainers share: seeding and the joint image-and-mask augmentation.

Every trainer resizes images to a square without cropping (so a map at the input size resizes back
onto the original image exactly) and augments with the same mild crop, flips, 90-degree turns and
colour jitter, applied to the image and its masks together.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's generators; a torch generator for the data loader's shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def transforms(image_size: int, train: bool) -> Any:
    """torchvision.transforms.v2 pipelines (work on image and mask together).

    Images are resized to a square without cropping, so a map at the input size resizes back onto
    the original image exactly. Training adds flips, 90-degree turns, a mild crop and colour jitter.
    """
    from torchvision.transforms import v2

    resize = v2.Resize((image_size, image_size), antialias=True)
    if not train:
        return resize
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                (image_size, image_size), scale=(0.8, 1.0), ratio=(0.75, 1.333), antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
        ]
    )


__all__ = ["seed_everything", "transforms"]
