"""What a request must be: JSON errors, bounded JSON bodies, Label Studio's project ids, basic auth.

Every error is JSON ``{"error": code, "message": sentence}`` with its 4xx / 5xx status (:class:`ApiError`).
Nothing a client sends yields a 5xx: bodies are bounded in size (``MAX_BODY_BYTES``; an event in
``MAX_EVENT_BYTES``) and JSON in depth (``MAX_JSON_DEPTH``), and ``NaN`` / ``Infinity`` are not JSON.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from flask import request

from backend.collection.ingest import MAX_ID
from backend.settings import Settings

MAX_BODY_BYTES = 64 * 1024 * 1024
#: A Label Studio event is kilobytes (a brush annotation's RLE, a few MB at most); larger is refused.
MAX_EVENT_BYTES = 16 * 1024 * 1024
#: Label Studio's payloads nest about six deep; deeper is refused before anything walks it.
MAX_JSON_DEPTH = 64


class ApiError(Exception):
    """An error answered as JSON ``{error, message}`` with ``status``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(raw: bytes, constants: bool = False) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 that says what is wrong with it.

    Args:
        raw: the body.
        constants: read ``NaN`` / ``Infinity`` (not JSON) as floats, for a later check to name the
            field that holds one (an event is refused with 422 and kept); else they are a 400.
    """
    if not raw:
        raise ApiError(400, "bad_request", "the request has no body; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=None if constants else _refuse_constant)
    except RecursionError:
        raise ApiError(400, "malformed_json", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", f"the body must be a JSON object, got {type(body).__name__}")
    if _depth_exceeds(body, MAX_JSON_DEPTH):
        raise ApiError(400, "malformed_json", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def json_body() -> dict[str, Any]:
    """This request's body as a JSON object (:func:`parse_json`)."""
    return parse_json(request.get_data(cache=True))


def project_id(raw: Any) -> int | None:
    """Label Studio sends ``project`` as ``"<id>.<created timestamp>"`` to /setup and /predict."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        head = raw.split(".", 1)[0]
        if head.isascii() and head.isdigit() and len(head) <= 19 and 0 < int(head) <= MAX_ID:
            return int(head)
    return None


def check_auth(settings: Settings) -> None:
    """A 401 unless this request carries the basic auth the settings ask for (``/health`` never does)."""
    if settings.basic_auth_user is None or request.path == "/health":
        return
    auth = request.authorization
    ok = (
        auth is not None
        and auth.type == "basic"
        and hmac.compare_digest(str(auth.username or "").encode(), settings.basic_auth_user.encode())
        and hmac.compare_digest(str(auth.password or "").encode(), str(settings.basic_auth_pass).encode())
    )
    if not ok:
        raise ApiError(
            401,
            "unauthorized",
            "this backend needs basic auth: set the user and password in Label Studio's model settings",
        )
