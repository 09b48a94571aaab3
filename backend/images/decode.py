"""Decoding under limits: image bytes to a fully loaded RGB image, or an :class:`ImageError`.

Decoding only accepts :data:`FORMATS` (Pillow's other plugins include PostScript, which runs
Ghostscript). The header is read first and ``width * height`` checked against the pixel limit before any
pixel is allocated. Pillow's own ``DecompressionBombError`` (above twice ``PIL.Image.MAX_IMAGE_PIXELS``)
and its warning, when warnings are errors as under pytest, map to ``too_many_pixels`` as well; Pillow's
global limit is not changed, since it belongs to the whole process. Then the image is fully decoded, so a
truncated or corrupt file fails here, never later inside the model. EXIF orientation is applied and the
result is RGB (see rule 7 of :mod:`backend.images`).
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.images.errors import ImageError

FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
"""Pillow formats accepted (JPEG includes the MPO variant many cameras write)."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes under the pixel limit: RGB, fully loaded, EXIF orientation applied.

    Args:
        data: the raw file bytes.
        max_pixels: largest ``width * height`` accepted, checked before any pixel is decoded.

    Returns:
        A loaded RGB image.

    Raises:
        ImageError: ``too_many_pixels``, ``truncated`` or ``not_an_image``.
    """
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError(
            "not_an_image",
            f"The file is not an image in an accepted format ({', '.join(FORMATS)}); "
            "check that the task points at the image file itself.",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _corrupt(exc) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(
            f"{width}×{height} = {width * height:,} pixels is more than MAX_IMAGE_PIXELS ({max_pixels:,})"
        )
    if width < 1 or height < 1:
        raise ImageError("not_an_image", f"The image is {width}×{height} pixels; export it again.")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(str(exc)) from None
    except EOFError:
        raise _truncated() from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise _truncated() from None
        raise _corrupt(exc) from None
    except (SyntaxError, ValueError, struct.error, KeyError, TypeError, IndexError) as exc:
        raise _corrupt(exc) from None


def _too_many_pixels(detail: str) -> ImageError:
    return ImageError(
        "too_many_pixels",
        f"The image is too large to decode safely ({detail.rstrip('.')}); downscale it before importing, "
        "or raise MAX_IMAGE_PIXELS if such images are expected.",
    )


def _truncated() -> ImageError:
    return ImageError("truncated", "The image file is truncated; upload the complete file again.")


def _corrupt(exc: BaseException) -> ImageError:
    return ImageError(
        "not_an_image",
        f"The image file is corrupt and cannot be decoded ({type(exc).__name__}); export it again.",
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB: alpha composited onto white, palettes and grey expanded, 16-bit scaled rather than clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)
        scaled = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")
