"""Label Studio's brush RLE: a mask as the ``rle`` list of a ``brushlabels`` result.

The format is Label Studio's own (``label_studio_sdk.converter.brush.encode_rle``; its frontend decodes
it): the RGBA pixels in row order as bytes, then a header of 32 bits for the number of values, 5 bits for
the word size less one (7), four 4-bit run-length field widths less one (3, 4, 8, 16), then per run a
flag (0: one value, 1: a series), a 2-bit index into those widths, the run length less one in that many
bits, and the value in 8 bits; runs longer than 65,536 are split; zero bits pad the end to a byte.

Written here rather than imported: the SDK's converter package pulls in scikit-learn and more at import,
which the serving process should not carry. A test holds the two encoders equal, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

_WIDTHS = (3, 4, 8, 16)
_HEADER_WIDTHS = "".join(f"{w - 1:04b}" for w in _WIDTHS)


def _runs(values: NDArray[np.uint8]) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """Run lengths and their values."""
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), len(values) - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths, values[ends]


def _run_bits(length: int, value: int) -> str:
    byte = f"{value:08b}"
    if length == 1:
        return "0" + "00" + "000" + byte
    if length <= 8:
        return "1" + "00" + f"{length - 1:03b}" + byte
    if length <= 16:
        return "1" + "01" + f"{length - 1:04b}" + byte
    if length <= 256:
        return "1" + "10" + f"{length - 1:08b}" + byte
    parts = []
    while length > 2**16:
        parts.append("1" + "11" + f"{2**16 - 1:016b}" + byte)
        length -= 2**16
    parts.append("1" + "11" + f"{length - 1:016b}" + byte)
    return "".join(parts)


def mask_to_rle(mask: NDArray[Any]) -> list[int]:
    """A 2-D mask (truthy = painted) as Label Studio's brush RLE (every channel 255 where painted)."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {array.shape}")
    values = np.repeat(array.astype(bool).ravel().astype(np.uint8) * 255, 4)
    bits = [f"{len(values):032b}", f"{8 - 1:05b}", _HEADER_WIDTHS]
    if len(values):
        lengths, found = _runs(values)
        bits.extend(_run_bits(int(n), int(v)) for n, v in zip(lengths, found, strict=True))
    joined = "".join(bits)
    joined += "0" * (8 - len(joined) % 8)  # as Label Studio pads: a whole zero byte when already aligned
    packed = np.packbits(np.frombuffer(joined.encode("ascii"), dtype=np.uint8) - ord("0"))
    return [int(b) for b in packed]


def decode_region(region: Mapping[str, Any]) -> NDArray[np.bool_] | None:
    """A stored brush region (Label Studio RLE with its image size) as a boolean mask; None if unreadable.

    This is the :data:`consensus.regions.MaskDecoder` the backend hands the consensus (lesion outlines and
    pattern regions alike).
    """
    from label_studio_sdk.converter.brush import decode_rle

    width, height, rle = region.get("width"), region.get("height"), region.get("rle")
    if not isinstance(width, int) or not isinstance(height, int) or not isinstance(rle, list) or not rle:
        return None
    try:
        flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    except Exception:  # a corrupt RLE is one unusable region, not a failed job
        return None
    if flat.size != width * height * 4:
        return None
    mask: NDArray[np.bool_] = flat.reshape(height, width, 4)[..., 3] > 127
    return mask
