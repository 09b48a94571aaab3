"""What every image refusal raises, and how a URL is shown in a message without leaking anything.

Each refusal is one :class:`ImageError` whose ``reason`` is a short stable code from :data:`REASONS` and
whose message is a sentence saying what is wrong and what to do. Messages and logs show references
through :func:`display`: no credentials, no query values (presigned URLs carry signatures there) except
Label Studio's ``d=``, no control characters, at most 160 characters.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit

REASONS = frozenset({
    "scheme", "host", "address", "path", "config", "auth", "redirect", "timeout", "connection",
    "http_status", "too_large", "empty", "truncated", "not_an_image", "too_many_pixels",
})  # fmt: skip
"""Every ``ImageError.reason``."""

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
"""Control characters: refused in references and tokens, replaced in messages."""

CLOUD_SCHEMES = frozenset({"s3", "gs", "gcs", "azure-blob", "azure", "wasb", "wasbs", "abfs", "abfss"})
"""Cloud-storage schemes, which reach the backend only through Label Studio's presigned links."""


class ImageError(Exception):
    """An image that cannot be used.

    Attributes:
        reason: a short stable code, one of :data:`REASONS`.
        status: the HTTP status for ``http_status``, else None.

    ``str(error)`` is a sentence saying what is wrong and what to do; it never holds the API key or a token.
    """

    def __init__(self, reason: str, message: str, *, status: int | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.status = status


def display(url: str) -> str:
    """A URL for messages and logs: no credentials, no query values but Label Studio's ``d=``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return shorten(url.split("?", 1)[0])
    scheme = parts.scheme.lower()
    if scheme in CLOUD_SCHEMES | {"file"}:
        return shorten(url.split("?", 1)[0])
    if scheme not in ("http", "https", ""):
        return shorten(url[:40])
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    origin = f"{host}{'' if port is None else f':{port}'}"
    text = f"{scheme}://{origin}" if scheme else (f"//{origin}" if parts.netloc else "")
    text += parts.path
    if parts.query:
        d = [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "d"]
        text += (
            f"?d={quote(d[0])}" if len(d) == 1 and parts.path.rstrip("/").endswith("local-files") else "?…"
        )
    return shorten(text)


def shorten(text: str, limit: int = 160) -> str:
    """``text`` without control characters, cut to ``limit`` characters."""
    text = CONTROL.sub("?", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
