"""ImageNet normalisation and torchvision's ImageNet weight files, read from the local cache only.

Every network here normalises inside ``forward`` with ImageNet's statistics, and starts its CNN
encoders from torchvision's ImageNet files where the user has them (``make weights`` puts MobileNet-V2
there). Nothing is downloaded at run time: a missing file is an error that says where it goes, and a
file whose SHA-256 does not begin with the prefix in its name (torchvision's naming rule) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from model.common.files import file_sha256

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's MobileNet-V2 ImageNet file (MobileNet_V2_Weights.IMAGENET1K_V1), shared by every system.
MOBILENET_V2_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
IMAGENET_FILE = Path(MOBILENET_V2_URL).name  # mobilenet_v2-b0353104.pth
IMAGENET_SHA256_PREFIX = Path(MOBILENET_V2_URL).stem.rsplit("-", 1)[1]  # torchvision's naming: b0353104


def cached_file(url: str) -> Path:
    """Where torchvision keeps the file of ``url``: ``$TORCH_HOME/hub/checkpoints/<name>``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def url_sha256_prefix(url: str) -> str:
    """The SHA-256 prefix torchvision puts in a file's name: ``name-<prefix>.pth``."""
    return Path(url).stem.rsplit("-", 1)[1]


def imagenet_weights_path() -> Path:
    """Where torchvision keeps the ImageNet MobileNet-V2 file: ``$TORCH_HOME/hub/checkpoints/``."""
    return cached_file(MOBILENET_V2_URL)


def read_imagenet_file(path: Path, sha256_prefix: str, what: str) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision ImageNet file in the local cache, checked against its name.

    Args:
        path: the file (see :func:`cached_file`).
        sha256_prefix: what its SHA-256 must begin with.
        what: the network it is for, named in the error.

    Raises:
        FileNotFoundError: the file is not there (nothing is downloaded).
        ValueError: its SHA-256 does not begin with ``sha256_prefix``.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet weights for {what} are not at {path}: run `make weights` (or copy torchvision's "
            f"{path.name} there, or set TORCH_HOME); nothing is downloaded at run time."
        )
    if not file_sha256(path).startswith(sha256_prefix):
        raise ValueError(f"{path} does not have the SHA-256 prefix {sha256_prefix}; replace the file")
    import torch

    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def imagenet_features_state() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNet-V2 ``features`` weights (width 1.0), from the local cache only.

    Raises:
        FileNotFoundError: the file is not in torchvision's cache (nothing is downloaded).
        ValueError: the file's SHA-256 does not begin with the prefix in its name.
    """
    state = read_imagenet_file(imagenet_weights_path(), IMAGENET_SHA256_PREFIX, "MobileNet-V2")
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


__all__ = [
    "IMAGENET_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_SHA256_PREFIX",
    "IMAGENET_STD",
    "cached_file",
    "imagenet_features_state",
    "imagenet_weights_path",
    "read_imagenet_file",
    "url_sha256_prefix",
]
