"""The one atomic writer, and file hashes.

Writing goes to a temporary file in the target's folder, is flushed and fsynced, then renamed over
the target, and the folder is fsynced too: a killed process leaves either the old file or the whole
new one, never half of one. Checkpoints, reports and histories are all written through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one."""
    _atomic_write(Path(path), lambda f: f.write(payload))


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any) -> None:
    """``value`` as indented JSON (NaN allowed, as Python writes it), atomically."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def atomic_copy(source: str | Path, target: str | Path) -> None:
    """Copy a file so that readers of ``target`` see the old file or the whole new one (fsynced)."""
    with Path(source).open("rb") as src:
        _atomic_write(Path(target), lambda f: shutil.copyfileobj(src, f, 1 << 20))


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """The one atomic writer: a temporary file beside ``path``, fsynced, renamed over it, folder fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared model file from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["atomic_copy", "atomic_write_bytes", "atomic_write_text", "file_sha256", "write_json"]
