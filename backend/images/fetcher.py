"""The image fetcher: the URL policy, the pinned client, the Label Studio auth and the cache, together.

:meth:`ImageFetcher.fetch` classifies a reference (:mod:`backend.images.policy`), downloads it with the
pinned client (:mod:`backend.images.http`) following redirects by hand (rule 5), adds the Label Studio
header where rule 1 allows it (:class:`backend.label_studio.client.LabelStudioAuth`, the one auth; the
token exchange goes over the pinned client, within the same deadline) and decodes through the
content-keyed cache (:mod:`backend.images.cache`).
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urljoin

from backend.images.cache import DecodedCache, LoadedImage
from backend.images.errors import CONTROL, ImageError, display
from backend.images.http import Deadline, PinnedClient, Response
from backend.images.policy import Target, UrlPolicy, refused_redirect
from backend.label_studio.client import LabelStudioAuth
from backend.settings import Settings

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
"""Redirects followed by hand for one image."""

_MAX_TOKEN_RESPONSE = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "dermassist-backend"


class ImageFetcher:
    """Fetches task images under the rules of :mod:`backend.images`, with a content-keyed cache.

    Args:
        settings: where Label Studio is, its key, the allowed hosts and the limits.
        cache_size: decoded images kept (least recently used dropped first); 0 turns the cache off.
        cache_bytes: the most RGB pixel bytes kept (width * height * 3 summed), so a few very large
            images cannot fill the memory; an image larger than this is not cached.

    Raises:
        ImageError: ``config`` for an unusable ``LABEL_STUDIO_URL`` or ``ALLOWED_IMAGE_HOSTS`` entry.

    Thread-safe.
    """

    def __init__(self, settings: Settings, *, cache_size: int = 128, cache_bytes: int = 1 << 30) -> None:
        self._settings = settings
        self._cache = DecodedCache(cache_size, cache_bytes)
        self._policy = UrlPolicy(settings.allowed_image_hosts, settings.label_studio_url)
        self._http = PinnedClient(self._policy)
        key = settings.label_studio_api_key
        self._auth = LabelStudioAuth(key) if key else None

    def fetch(self, ref: str) -> LoadedImage:
        """Download and decode the image a task references.

        Args:
            ref: the task's image value: a Label Studio media path or an allowed http(s) URL.

        Returns:
            The decoded image, its SHA-256 and size.

        Raises:
            ImageError: for any reference, response or file the rules refuse; ``reason`` says which.
        """
        target = self._policy.classify(ref)
        deadline = Deadline(self._settings.image_timeout)
        data = self._download(target, deadline)
        loaded = self._cache.decoded(data, self._settings.max_image_pixels)
        logger.debug(
            "image %s: %d bytes, %dx%d, sha256 %s",
            display(target.url),
            len(data),
            loaded.width,
            loaded.height,
            loaded.sha256[:12],
        )
        return loaded

    def _download(self, target: Target, deadline: Deadline) -> bytes:
        """The body of ``target`` after at most :data:`MAX_REDIRECTS` redirects, each one classified again."""
        source: Target | None = None  # the hop that redirected to ``target``
        for hop in range(MAX_REDIRECTS + 1):
            try:
                response = self._get(target, deadline)
            except ImageError as exc:
                if source is None or exc.reason != "address":
                    raise
                raise refused_redirect(source, target.url, exc) from None
            if response.status in _REDIRECT_STATUSES:
                if hop == MAX_REDIRECTS:
                    raise ImageError(
                        "redirect",
                        f"The image at {display(target.url)!r} redirected more than {MAX_REDIRECTS} "
                        "times; link the final address instead.",
                    )
                if not response.location:
                    raise ImageError(
                        "redirect",
                        f"The server at {display(target.url)!r} answered a redirect without a Location.",
                    )
                location = urljoin(target.url, response.location.strip())
                try:
                    target, source = self._policy.classify(location), target
                except ImageError as exc:
                    raise refused_redirect(target, location, exc) from None
                continue
            if response.status != 200:
                hint = (
                    " Check LABEL_STUDIO_API_KEY and that the file exists in Label Studio."
                    if target.label_studio and response.status in (401, 403, 404)
                    else " Check that the URL is right and the server serves it."
                )
                raise ImageError(
                    "http_status",
                    f"The server at {display(target.url)!r} answered HTTP {response.status}, not 200.{hint}",
                    status=response.status,
                )
            if not response.body:
                raise ImageError("empty", f"The server at {display(target.url)!r} returned an empty file.")
            return response.body
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, target: Target, deadline: Deadline) -> Response:
        """One GET; a Label Studio media route gets the key (rule 2), and one retry after a 401."""
        headers = {
            "Host": target.host_header,
            "User-Agent": _USER_AGENT,
            # Label Studio's file views sit behind Django REST framework's content negotiation, which
            # answers 406 to a bare "image/*": accept anything, images first.
            "Accept": "image/*, */*;q=0.8",
            "Accept-Encoding": "identity",
            "Connection": "close",
        }
        limit = self._settings.max_image_bytes
        if not target.label_studio:
            return self._http.send(target, "GET", headers, None, deadline, limit)
        if self._auth is None:
            raise ImageError(
                "config",
                "Label Studio images need LABEL_STUDIO_API_KEY; set it to a legacy token or a personal "
                "access token of a user who can read the project.",
            )

        def exchange(key: str) -> str:
            return self._exchange(key, deadline)

        headers["Authorization"] = self._auth.header(exchange)
        response = self._http.send(target, "GET", headers, None, deadline, limit)
        if response.status == 401 and self._auth.personal:
            logger.info("Label Studio refused the access token (401); refreshing it once")
            headers["Authorization"] = self._auth.header(exchange, stale=headers["Authorization"])
            response = self._http.send(target, "GET", headers, None, deadline, limit)
        return response

    def _exchange(self, key: str, deadline: Deadline) -> str:
        """A personal access token's access token, over the pinned client and within ``deadline``.

        Raises:
            ImageError: ``auth`` when Label Studio does not exchange it; the pinned client's errors.
        """
        origin = self._policy.label_studio
        assert origin is not None  # only Label Studio targets get here
        target = origin.target("/api/token/refresh/")
        headers = {
            "Host": target.host_header,
            "User-Agent": _USER_AGENT,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Connection": "close",
        }
        body = json.dumps({"refresh": key}).encode()
        response = self._http.send(target, "POST", headers, body, deadline, _MAX_TOKEN_RESPONSE)
        access: object = None
        if response.status == 200:
            try:
                access = json.loads(response.body).get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access or CONTROL.search(access):
            raise ImageError(
                "auth",
                f"Label Studio did not exchange the personal access token in LABEL_STUDIO_API_KEY for an "
                f"access token (HTTP {response.status}); create a new token in Label Studio's Account & "
                "Settings and set it.",
            )
        return access
