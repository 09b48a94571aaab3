"""Decoded images cached by content: an LRU keyed by the SHA-256 of the file bytes, never by URL.

The same bytes under two URLs decode once, and a URL whose file changed is never served stale (the
label-studio-tools bug). Each call returns its own copy of the image, so a caller that edits it cannot
corrupt the cache. Thread-safe; decoding runs outside the lock, so two threads may decode the same new
bytes at once, never wrongly.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

from PIL import Image

from backend.images.decode import decode_image


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the identity of its bytes.

    Attributes:
        image: RGB, fully decoded, EXIF orientation applied; this call's own copy.
        sha256: hex SHA-256 of the raw file bytes.
        width: ``image.width``.
        height: ``image.height``.
    """

    image: Image.Image
    sha256: str
    width: int
    height: int


class DecodedCache:
    """Decodes bytes under a pixel limit, keeping the most recently used results.

    Args:
        size: decoded images kept (least recently used dropped first); 0 turns the cache off.
        max_bytes: the most RGB pixel bytes kept (width * height * 3 summed), so a few very large
            images cannot fill the memory; an image larger than this is not cached.
    """

    def __init__(self, size: int = 128, max_bytes: int = 1 << 30) -> None:
        if size < 0 or max_bytes < 0:
            raise ValueError(f"cache_size and cache_bytes must be >= 0, got {size} and {max_bytes}")
        self._size = size
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, LoadedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def decoded(self, data: bytes, max_pixels: int) -> LoadedImage:
        """The image ``data`` holds, from the cache or decoded now; the caller's own copy.

        Raises:
            ImageError: ``too_many_pixels``, ``truncated`` or ``not_an_image`` (see :func:`decode_image`).
        """
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            hit = self._entries.get(digest)
            if hit is not None:
                self._entries.move_to_end(digest)
        if hit is None:
            image = decode_image(data, max_pixels)
            hit = LoadedImage(image=image, sha256=digest, width=image.width, height=image.height)
            self._remember(hit)
        return replace(hit, image=hit.image.copy())

    def _remember(self, loaded: LoadedImage) -> None:
        size = loaded.width * loaded.height * 3
        if self._size == 0 or size > self._max_bytes:
            return
        with self._lock:
            if loaded.sha256 in self._entries:
                return
            self._entries[loaded.sha256] = loaded
            self._bytes += size
            while len(self._entries) > self._size or self._bytes > self._max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.width * old.height * 3
