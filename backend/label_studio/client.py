"""Label Studio access: the one auth for both key kinds, label-studio-sdk's client, and clear errors.

Label Studio 1.23 accepts two kinds of key (../shared/docs/label-studio.md, "Auth"):

- a legacy token (40 hex characters): ``Authorization: Token <key>``;
- a personal access token (a JWT): exchanged at ``POST /api/token/refresh/`` for an access token that
  lives 300 s, sent as ``Authorization: Bearer <access>``.

Two doors use them:

- **API calls** (sync, the demo, the end-to-end tests) go through label-studio-sdk's client,
  :func:`connect` (:class:`backend.label_studio.sdk.LabelStudioApi`). The SDK tells the kinds apart and
  refreshes a personal access token itself when its access token's ``exp`` has passed
  (``label_studio_sdk.tokens.client_ext.TokensClientExt``; unlike the image fetcher it does not retry a
  401); an expired personal access token is refused at connect.
- **Image downloads** keep their own pinned HTTP (:mod:`backend.images`, the SSRF boundary: the
  connection goes to the address it checked, within one deadline) and take their header from
  :class:`LabelStudioAuth`, which holds the rules (which kind, the cached access token, a new one
  after a 401) while the caller does the exchange over its own connection.

Every SDK call this project makes runs inside :func:`label_studio_errors`, so a wrong URL or a refused
key becomes one :class:`LabelStudioError` line that says so, never a traceback. The key is never logged
and never put in a message. The SDK itself is imported only when a client is made: ``serve`` and the
CLI import this module for the names above without paying for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from backend.label_studio.sdk import LabelStudioApi

logger = logging.getLogger(__name__)

ACCESS_TOKEN_LIFETIME_S = 240.0
"""Seconds an access token is reused (Label Studio's live 300 s: renewed a minute early)."""

Exchange: TypeAlias = Callable[[str], str]
"""Personal access token -> a fresh access token (``POST /api/token/refresh/``), or raises."""


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a request; the message says which and why."""


def is_personal_access_token(key: str) -> bool:
    """A JWT (three dot-separated parts) rather than a legacy 40-character token."""
    return key.count(".") == 2


class LabelStudioAuth:
    """The ``Authorization`` header for one Label Studio key: the rules, not the transport.

    A legacy token is sent as it is. A personal access token is exchanged (by the ``exchange`` the
    caller passes, over the caller's own connection) for an access token, which is cached for
    ``lifetime`` seconds and shared by every thread; a header Label Studio refused (401) is passed
    back as ``stale`` and replaced once, unless another thread replaced it already.

    Args:
        key: ``LABEL_STUDIO_API_KEY``.
        lifetime: seconds an access token is reused.

    Raises:
        ValueError: an empty key.
    """

    def __init__(self, key: str, lifetime: float = ACCESS_TOKEN_LIFETIME_S) -> None:
        if not key:
            raise ValueError("a Label Studio key is needed")
        self._key = key
        self.lifetime = lifetime
        self._access: str | None = None
        self._until = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        kind = "personal access token" if self.personal else "legacy token"
        return f"LabelStudioAuth(key=<{kind}>)"

    @property
    def personal(self) -> bool:
        """True for a personal access token, which needs an exchange."""
        return is_personal_access_token(self._key)

    def header(self, exchange: Exchange, stale: str | None = None) -> str:
        """The header value to send now.

        Args:
            exchange: called (under this object's lock) when a new access token is needed.
            stale: a header value Label Studio just answered 401 to; a new access token replaces it.

        Raises:
            whatever ``exchange`` raises when Label Studio refuses the personal access token.
        """
        if not self.personal:
            return f"Token {self._key}"
        with self._lock:
            now = time.monotonic()
            current = None if self._access is None else f"Bearer {self._access}"
            if current is None or now >= self._until or current == stale:
                self._access = exchange(self._key)
                self._until = now + self.lifetime
                logger.debug("exchanged the personal access token for an access token")
            return f"Bearer {self._access}"


def connect(url: str, key: str, timeout: float = 60.0) -> LabelStudioApi:
    """label-studio-sdk's client for the Label Studio at ``url``, with ``key`` (either kind).

    Args:
        url: ``LABEL_STUDIO_URL`` (a path prefix, as behind a reverse proxy, is kept).
        key: ``LABEL_STUDIO_API_KEY``.
        timeout: seconds for each request.

    Raises:
        LabelStudioError: a URL that is not http(s), or a personal access token that has expired.
    """
    if not url.startswith(("http://", "https://")):
        raise LabelStudioError(f"LABEL_STUDIO_URL must start with http:// or https://, got {url!r}")
    if not key:
        raise LabelStudioError("set LABEL_STUDIO_API_KEY to a legacy token or a personal access token")
    from backend.label_studio.sdk import LabelStudioApi

    with label_studio_errors(url):
        return LabelStudioApi(url, key, timeout)


@contextlib.contextmanager
def label_studio_errors(url: str) -> Iterator[None]:
    """Turn what label-studio-sdk (and httpx under it) raises into one clear :class:`LabelStudioError`.

    A refused key names ``LABEL_STUDIO_API_KEY``; an unreachable server, a 404 or an answer that is
    not JSON names ``LABEL_STUDIO_URL``; any other status says which with Label Studio's own detail.
    """
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    where = f"Label Studio at {url.rstrip('/')}"
    try:
        yield
    except ApiError as exc:
        raise LabelStudioError(_api_error_message(where, exc.status_code, exc.body)) from None
    except httpx.TimeoutException:
        raise LabelStudioError(f"{where} did not answer in time; check that it is up") from None
    except httpx.HTTPError as exc:
        raise LabelStudioError(
            f"could not reach {where} ({type(exc).__name__}: {exc}); check LABEL_STUDIO_URL and that "
            "Label Studio is up"
        ) from None
    except json.JSONDecodeError:
        raise LabelStudioError(
            f"{where} answered something that is not JSON; check that LABEL_STUDIO_URL is Label Studio's "
            "address"
        ) from None


def _api_error_message(where: str, status: int | None, body: Any) -> str:
    detail = body.get("detail") if isinstance(body, dict) and "detail" in body else body
    if detail in (None, ""):
        text = "no detail"
    elif isinstance(detail, str) and detail.lstrip().startswith("<"):
        text = "an HTML page"
    else:
        text = " ".join(str(detail).split())[:300]
    if status is None:
        return f"{where}: {text}"
    if status in (401, 403):
        return (
            f"{where} refused LABEL_STUDIO_API_KEY (HTTP {status}: {text}); set it to a legacy token or "
            "a personal access token (Account & Settings) of a user who can read the project"
        )
    if 200 <= status < 300:
        return (
            f"{where} answered something that is not Label Studio's JSON; check that LABEL_STUDIO_URL "
            "is Label Studio's address"
        )
    if status == 404:
        return f"{where} answered HTTP 404 ({text}); check LABEL_STUDIO_URL and the project id"
    return f"{where} answered HTTP {status}: {text}"
