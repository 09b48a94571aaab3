"""Fetch and decode one task image: the only way an image enters the backend.

``/predict`` calls :meth:`ImageFetcher.fetch` once per task image. The reference comes from task data,
which any annotator who can import tasks controls, so this module is the backend's SSRF and
decompression-bomb surface, and it is strict. Every refusal raises :class:`ImageError`, whose ``reason``
is a short stable code and whose message says what is wrong and what to do.

Rules, and why:

1. **Label Studio references.** ``/data/upload/...``, ``/data/local-files/?d=...`` and Label Studio's
   cloud-storage links ``/tasks/<id>/presign/?fileuri=...`` (or ``/resolve/``) are fetched from
   ``settings.label_studio_url``, as are absolute URLs whose scheme, host and port equal it (their path
   must be one of those media routes too). Only these routes get the API key: the key opens the whole
   Label Studio API, and a task must not make the backend call ``/api/...`` with it. The ``hostname``
   that ``/setup`` sends is deliberately not used: whoever can reach ``/setup`` would choose where the key
   goes. Without ``LABEL_STUDIO_URL`` (or the key) these references fail with ``config``. ``..``
   segments, also percent-encoded (once or more) and inside the ``d=`` value, absolute ``d=`` values,
   backslashes and control characters fail with ``path``.
2. **Auth, only ever to the Label Studio origin.** A key without dots is a legacy token and is sent as
   ``Authorization: Token <key>``. A key with dots is a personal access token (a JWT): it is exchanged at
   ``POST /api/token/refresh/`` for an access token (valid 300 s in Label Studio 1.23), cached for
   :data:`ACCESS_TOKEN_TTL` seconds and sent as ``Authorization: Bearer <access>``; a 401 refreshes it
   once and retries. Neither the key nor a token is ever logged or put in a message.
3. **Other http(s) URLs** need their host in ``settings.allowed_image_hosts``: an entry ``host`` admits
   any port, ``host:port`` only that port (checked before any DNS lookup). The name is then resolved once
   and every address is checked. Link-local addresses (169.254.0.0/16, fe80::/10) and cloud metadata
   services (169.254.169.254, fd00:ec2::254, 100.100.100.200, 192.0.0.192) are refused always, even when
   listed, also when embedded in IPv6 (``::ffff:a.b.c.d``, NAT64, 6to4, Teredo). Loopback, private,
   shared, reserved, multicast and unspecified addresses are refused unless the allow list names that
   *address* (``127.0.0.1`` or ``127.0.0.1:8080``): a listed name alone does not vouch for where it
   resolves, so an internal server listed by name needs its address listed as well. The connection then
   goes to the checked address itself (TLS still verifies the certificate for the name), so DNS
   rebinding between the check and the connection is not possible. Residual risks: the check trusts
   the system resolver's answer once, and name resolution is bounded by the resolver's own timeout, not
   by ``image_timeout``; ``HTTP_PROXY``/``HTTPS_PROXY`` are not honoured, since a proxy would resolve
   the name again.
4. **Every other reference is refused** with ``scheme``: ``file:``, ``gopher:``, ``ftp:``, ``data:``,
   protocol-relative ``//host/...``, bare filesystem paths, empty strings and non-strings. ``s3://``,
   ``gs://`` and ``azure-blob://`` are refused too: cloud storage must reach the backend through Label
   Studio, presigned (see rule 1), with the storage host in the allow list.
5. **Redirects** are never followed automatically. At most :data:`MAX_REDIRECTS` are followed by hand,
   and each ``Location`` goes through rules 1-4 again: a redirect to a metadata address, to ``file:``
   or to a host not listed fails with ``redirect`` (the message gives the target's own reason). Whether
   a hop carries the key is decided per hop by rule 1, so it never reaches another host, not even
   another port of the same host.
6. **Limits.** ``settings.image_timeout`` bounds the whole fetch (connections, token refresh, redirects
   and reading; a watchdog closes the socket at the deadline, so a server dripping bytes cannot stretch
   it): ``timeout``. A ``Content-Length`` above ``settings.max_image_bytes`` is refused before reading,
   and the body is read in chunks and dropped once it passes the limit: ``too_large``. No body:
   ``empty``; any status but 200 (after redirects): ``http_status`` (``.status`` holds it); network and
   TLS failures: ``connection``. Decoding only accepts :data:`FORMATS` (Pillow's other plugins include
   PostScript, which runs Ghostscript). The header is read first and ``width * height`` checked against
   ``settings.max_image_pixels`` before any pixel is allocated: ``too_many_pixels``. Pillow's own
   ``DecompressionBombError`` (above twice ``PIL.Image.MAX_IMAGE_PIXELS``) and its warning, when warnings
   are errors as under pytest, map to ``too_many_pixels`` as well; Pillow's global limit is not changed,
   since it belongs to the whole process. Keep ``MAX_IMAGE_PIXELS`` below Pillow's 89,478,485 to
   avoid its warning. Then the image is fully decoded, so a truncated file fails here (``truncated``)
   and a corrupt or unknown one too (``not_an_image``), never later inside the model.
7. **Orientation and colour.** EXIF orientation is applied (``ImageOps.exif_transpose``), because
   browsers apply it when Label Studio shows the image, so masks line up with what annotators see;
   ``width`` and ``height`` are after it. The result is RGB: transparency is composited onto white,
   palette and grey images are expanded, and 16-bit images are scaled by 1/257 (Pillow's own conversion
   clips them to 255). ICC profiles are not applied.
8. **Cache by content.** Decoded images are kept in an LRU keyed by the SHA-256 of the file bytes, never
   by URL: the same bytes under two URLs decode once, and a URL whose file changed is never served stale
   (the label-studio-tools bug). Bytes are still downloaded each time, since they are what the key is
   computed from. Each call returns its own copy of the image, so a caller that edits it cannot corrupt
   the cache. The fetcher is thread-safe.

Only the standard library does the HTTP, so the connection can be pinned to the checked address.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import ipaddress
import json
import logging
import re
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, quote, unquote, urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.label_studio.client import ACCESS_TOKEN_LIFETIME_S, is_personal_access_token
from backend.settings import Settings

logger = logging.getLogger(__name__)

REASONS = frozenset({
    "scheme", "host", "address", "path", "config", "auth", "redirect", "timeout", "connection",
    "http_status", "too_large", "empty", "truncated", "not_an_image", "too_many_pixels",
})  # fmt: skip
"""Every ``ImageError.reason``."""

MAX_REDIRECTS = 3
"""Redirects followed by hand for one image."""

ACCESS_TOKEN_TTL = ACCESS_TOKEN_LIFETIME_S
"""Seconds an access token from a personal access token is reused (Label Studio's last 300 s)."""

FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
"""Pillow formats accepted (JPEG includes the MPO variant many cameras write)."""

_CHUNK = 64 * 1024
_MAX_REF_CHARS = 8192
_MAX_TOKEN_RESPONSE = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CLOUD_SCHEMES = frozenset({"s3", "gs", "gcs", "azure-blob", "azure", "wasb", "wasbs", "abfs", "abfss"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PRESIGN_PATH = re.compile(r"/tasks/\d+/(?:presign|resolve)/?")
# percent-encodes what http.client refuses in a request line (spaces, non-ASCII), keeping escapes as sent
_URL_SAFE = "!$%&'()*+,/:;=?@~[]"

_ALWAYS_REFUSED = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI instance metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "192.0.0.192",  # Oracle Cloud legacy metadata
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_Address: TypeAlias = tuple[int, tuple[Any, ...]]  # (family, sockaddr) as getaddrinfo gives them


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


@dataclass(frozen=True)
class _Target:
    """A reference that passed rules 1-4, ready to request."""

    url: str  # absolute, as classified (for urljoin and messages)
    tls: bool
    host: str  # lower-case, IDNA, no brackets, no trailing dot
    port: int
    host_header: str
    request_path: str  # path and query, percent-encoded, no fragment
    label_studio: bool


@dataclass(frozen=True)
class _Response:
    status: int
    location: str | None
    body: bytes


@dataclass(frozen=True)
class _HostEntry:
    host: str
    port: int | None
    ip: IPAddress | None


def _display(url: str) -> str:
    """A URL for messages and logs: no credentials, no query values but Label Studio's ``d=``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return _shorten(url.split("?", 1)[0])
    scheme = parts.scheme.lower()
    if scheme in _CLOUD_SCHEMES | {"file"}:
        return _shorten(url.split("?", 1)[0])
    if scheme not in ("http", "https", ""):
        return _shorten(url[:40])
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
    return _shorten(text)


def _shorten(text: str, limit: int = 160) -> str:
    text = _CONTROL.sub("?", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unsafe_path(text: str) -> bool:
    """True for ``..`` segments, backslashes or control characters, also under percent-encoding."""
    for _ in range(4):
        if "\\" in text or _CONTROL.search(text) or ".." in text.split("/"):
            return True
        decoded = unquote(text)
        if decoded == text:
            return False
        text = decoded
    return True  # encoded four times over: no real file name looks like that


def _idna(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise ImageError("host", f"The host name {_shorten(host)!r} is not a valid domain name.") from None


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address it carries (mapped, NAT64, 6to4, Teredo, compatible)."""
    found: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)
        if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
            found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _always_refused(ip: IPAddress) -> bool:
    return any(a in _ALWAYS_REFUSED or a.is_link_local for a in _embedded(ip))


def _kind(ip: IPAddress) -> str | None:
    """None for a public unicast address, else what it is (loopback, private, ...)."""
    for a in _embedded(ip):
        if a.is_loopback:
            return "loopback"
        if a.is_unspecified:
            return "unspecified"
        if a.is_multicast:
            return "multicast"
        if a.is_reserved:
            return "reserved"
        if a.is_private:
            return "private"
        if not a.is_global:
            return "non-public"
    return None


def _parse_host_entry(entry: str) -> _HostEntry:
    text = entry.strip().lower()
    bad = ImageError(
        "config",
        f"ALLOWED_IMAGE_HOSTS holds {_shorten(entry)!r}; entries are host names or addresses with an "
        "optional port, such as images.example.org, 10.0.0.5:8080 or [::1]:8080, without scheme or path.",
    )
    if not text or any(c in text for c in "/@?#\\ ") or _CONTROL.search(text):
        raise bad
    port_text: str | None = None
    if text.startswith("["):
        match = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d+))?", text)
        if match is None:
            raise bad
        host, port_text = match.group(1), match.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # a name, an IPv4 address or a bare IPv6 address
    if port_text is not None and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise bad
    try:
        host = _idna(host)
    except ImageError:
        raise bad from None
    if not host:
        raise bad
    ip = _parse_ip(host)
    if ip is None and ":" in host:
        raise bad
    return _HostEntry(host=str(ip) if ip else host, port=int(port_text) if port_text else None, ip=ip)


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP or HTTPS to addresses already checked: the name is never resolved again."""

    def __init__(
        self, target: _Target, addresses: list[_Address], timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._addresses = addresses
        self._tls = tls
        self._server_name = target.host
        # kept after getresponse(), which sets ``sock`` to None once the response owns the socket
        self.connected_socket: socket.socket | None = None

    def connect(self) -> None:
        error: OSError = OSError("no address to connect to")
        for family, sockaddr in self._addresses:
            # a socket of our own, not socket.create_connection, which would resolve the host again
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            break
        else:
            raise error
        if self._tls is not None:
            try:
                sock = self._tls.wrap_socket(sock, server_hostname=self._server_name)
            except BaseException:
                sock.close()
                raise
        self.sock = self.connected_socket = sock


class _Watchdog:
    """Shuts the connection's socket at the deadline, so no read outlives it."""

    def __init__(self, conn: _PinnedConnection, seconds: float) -> None:
        self.fired = False
        self._conn = conn
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.connected_socket
        if sock is not None:
            # the plain socket's shutdown: SSLSocket's own one would race with a reading thread
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._end - time.monotonic()


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


class ImageFetcher:
    """Fetches task images under the rules in this module's docstring, with a content-keyed cache.

    Args:
        settings: where Label Studio is, its key, the allowed hosts and the limits.
        cache_size: decoded images kept (least recently used dropped first); 0 turns the cache off.
        cache_bytes: the most RGB pixel bytes kept (width * height * 3 summed), so a few very large
            images cannot fill the memory; an image larger than this is not cached.

    Raises:
        ImageError: ``config`` for an unusable ``LABEL_STUDIO_URL`` or ``ALLOWED_IMAGE_HOSTS`` entry.
    """

    def __init__(self, settings: Settings, *, cache_size: int = 128, cache_bytes: int = 1 << 30) -> None:
        if cache_size < 0 or cache_bytes < 0:
            raise ValueError(f"cache_size and cache_bytes must be >= 0, got {cache_size} and {cache_bytes}")
        self._settings = settings
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._cache: OrderedDict[str, LoadedImage] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._access: str | None = None
        self._access_until = 0.0
        self._tls: ssl.SSLContext | None = None  # made on first https use: loading CAs takes ~50 ms
        self._allowed = tuple(_parse_host_entry(e) for e in settings.allowed_image_hosts)
        self._ls: tuple[str, str, int, str] | None = None  # scheme, host, port, base path
        self._ls_url = settings.label_studio_url.rstrip("/") if settings.label_studio_url else None
        if settings.label_studio_url:
            parts = urlsplit(settings.label_studio_url)
            try:
                port = parts.port
            except ValueError:
                port = -1
            if not parts.hostname or "@" in parts.netloc or parts.query or parts.fragment or port == -1:
                raise ImageError(
                    "config",
                    f"LABEL_STUDIO_URL {_display(settings.label_studio_url)!r} is not a plain "
                    "http(s)://host[:port][/path] URL; set it to the address this backend reaches "
                    "Label Studio at.",
                )
            scheme = parts.scheme.lower()
            try:
                host = _idna(parts.hostname)
            except ImageError as exc:
                raise ImageError("config", f"LABEL_STUDIO_URL: {exc}") from None
            ip = _parse_ip(host)
            self._ls = (
                scheme,
                str(ip) if ip else host,
                port or _default_port(scheme),
                parts.path.rstrip("/"),
            )

    # public API ---------------------------------------------------------------------------------

    def fetch(self, ref: str) -> LoadedImage:
        """Download and decode the image a task references.

        Args:
            ref: the task's image value: a Label Studio media path or an allowed http(s) URL.

        Returns:
            The decoded image, its SHA-256 and size.

        Raises:
            ImageError: for any reference, response or file the rules refuse; ``reason`` says which.
        """
        target = self._classify(ref)
        deadline = _Deadline(self._settings.image_timeout)
        data = self._download(target, deadline)
        loaded = self._decoded(data)
        logger.debug(
            "image %s: %d bytes, %dx%d, sha256 %s",
            _display(target.url),
            len(data),
            loaded.width,
            loaded.height,
            loaded.sha256[:12],
        )
        return loaded

    # rules 1-4 ----------------------------------------------------------------------------------

    def _classify(self, ref: object) -> _Target:
        if isinstance(ref, str):
            ref = ref.strip()
        if not isinstance(ref, str) or not ref:
            raise ImageError(
                "scheme",
                "The task gives no image reference; its image field must hold a Label Studio upload "
                "or local-files path or an http(s) URL.",
            )
        if _CONTROL.search(ref) or "\\" in ref:
            raise ImageError(
                "path", f"The image reference {_display(ref)!r} holds a backslash or control character."
            )
        if ref.startswith("/") and not ref.startswith("//"):
            if not self._is_media_route(*_split_path_query(ref)):
                raise ImageError(
                    "scheme",
                    f"The image reference {_display(ref)!r} is neither a Label Studio media path "
                    "(/data/upload/, /data/local-files/?d=, /tasks/<id>/presign/) nor an http(s) URL; "
                    "local files are not read, import them into Label Studio.",
                )
            if self._ls_url is None:
                raise ImageError(
                    "config",
                    f"The image {_display(ref)!r} is a Label Studio path but LABEL_STUDIO_URL is not set; "
                    "set it to the address this backend reaches Label Studio at.",
                )
            ref = self._ls_url + ref
        try:
            parts = urlsplit(ref)
        except ValueError:
            raise ImageError("host", f"The image URL {_display(ref)!r} cannot be parsed.") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _scheme_error(ref, scheme)
        if len(ref) > _MAX_REF_CHARS:
            raise ImageError("path", f"The image URL is longer than {_MAX_REF_CHARS} characters.")
        if "@" in parts.netloc:
            raise ImageError(
                "host",
                f"The image URL {_display(ref)!r} carries credentials (user@host); they are not sent, "
                "remove them from the URL.",
            )
        try:
            port = parts.port
        except ValueError:
            raise ImageError("host", f"The image URL {_display(ref)!r} has an invalid port.") from None
        if not parts.hostname:
            raise ImageError("host", f"The image URL {_display(ref)!r} has no host.")
        host = _idna(parts.hostname)
        ip = _parse_ip(host)
        host = str(ip) if ip else host
        port = port or _default_port(scheme)
        if _unsafe_path(parts.path):
            raise ImageError(
                "path",
                f"The image path in {_display(ref)!r} climbs out of its folder ('..') or holds a "
                "backslash; give the file's own path.",
            )
        label_studio = self._ls is not None and (scheme, host, port) == self._ls[:3]
        if label_studio:
            assert self._ls is not None
            base = self._ls[3]
            rest = parts.path[len(base) :] if parts.path.startswith(base + "/") else ""
            if not self._is_media_route(rest, parts.query):
                raise ImageError(
                    "path",
                    f"The URL {_display(ref)!r} is on Label Studio but not one of its media routes "
                    "(/data/upload/, /data/local-files/?d=, /tasks/<id>/presign/); the API key is only "
                    "sent to those.",
                )
        elif not any(e.host == host and e.port in (None, port) for e in self._allowed):
            raise ImageError(
                "host",
                f"The image host {host}:{port} is not in ALLOWED_IMAGE_HOSTS; add '{host}' or "
                f"'{host}:{port}' there if images may come from it, or import them into Label Studio.",
            )
        request_path = quote(parts.path or "/", safe=_URL_SAFE)
        if parts.query:
            request_path += "?" + quote(parts.query, safe=_URL_SAFE)
        bracketed = f"[{host}]" if ":" in host else host
        return _Target(
            url=ref,
            tls=scheme == "https",
            host=host,
            port=port,
            host_header=bracketed if parts.port is None else f"{bracketed}:{port}",
            request_path=request_path,
            label_studio=label_studio,
        )

    @staticmethod
    def _is_media_route(path: str, query: str) -> bool:
        if path.startswith("/data/upload/") and len(path) > len("/data/upload/"):
            return True
        if path in ("/data/local-files", "/data/local-files/"):
            values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "d"]
            if len(values) != 1 or not values[0]:
                return False
            d = values[0]
            if _unsafe_path(d) or unquote(d).startswith("/") or re.match(r"[A-Za-z]:", unquote(d)):
                raise ImageError(
                    "path",
                    f"The local-files path d={_shorten(d)!r} is absolute or climbs out of the document "
                    "root ('..'); give the path relative to LOCAL_FILES_DOCUMENT_ROOT.",
                )
            return True
        return bool(_PRESIGN_PATH.fullmatch(path)) and "fileuri=" in query

    # HTTP ---------------------------------------------------------------------------------------

    def _download(self, target: _Target, deadline: _Deadline) -> bytes:
        source: _Target | None = None  # the hop that redirected to ``target``
        for hop in range(MAX_REDIRECTS + 1):
            try:
                response = self._get(target, deadline)
            except ImageError as exc:
                if source is None or exc.reason != "address":
                    raise
                raise _refused_redirect(source, target.url, exc) from None
            if response.status in _REDIRECT_STATUSES:
                if hop == MAX_REDIRECTS:
                    raise ImageError(
                        "redirect",
                        f"The image at {_display(target.url)!r} redirected more than {MAX_REDIRECTS} "
                        "times; link the final address instead.",
                    )
                if not response.location:
                    raise ImageError(
                        "redirect",
                        f"The server at {_display(target.url)!r} answered a redirect without a Location.",
                    )
                location = urljoin(target.url, response.location.strip())
                try:
                    target, source = self._classify(location), target
                except ImageError as exc:
                    raise _refused_redirect(target, location, exc) from None
                continue
            if response.status != 200:
                hint = (
                    " Check LABEL_STUDIO_API_KEY and that the file exists in Label Studio."
                    if target.label_studio and response.status in (401, 403, 404)
                    else " Check that the URL is right and the server serves it."
                )
                raise ImageError(
                    "http_status",
                    f"The server at {_display(target.url)!r} answered HTTP {response.status}, not 200.{hint}",
                    status=response.status,
                )
            if not response.body:
                raise ImageError("empty", f"The server at {_display(target.url)!r} returned an empty file.")
            return response.body
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, target: _Target, deadline: _Deadline) -> _Response:
        headers = {
            "Host": target.host_header,
            "User-Agent": "dermassist-backend",
            # Label Studio's file views sit behind Django REST framework's content negotiation, which
            # answers 406 to a bare "image/*": accept anything, images first.
            "Accept": "image/*, */*;q=0.8",
            "Accept-Encoding": "identity",
            "Connection": "close",
        }
        if not target.label_studio:
            return self._send(target, "GET", headers, None, deadline, self._settings.max_image_bytes)
        authorization, access = self._authorization(deadline, stale=None)
        headers["Authorization"] = authorization
        response = self._send(target, "GET", headers, None, deadline, self._settings.max_image_bytes)
        if response.status == 401 and access is not None:
            logger.info("Label Studio refused the access token (401); refreshing it once")
            headers["Authorization"], _ = self._authorization(deadline, stale=access)
            response = self._send(target, "GET", headers, None, deadline, self._settings.max_image_bytes)
        return response

    def _authorization(self, deadline: _Deadline, stale: str | None) -> tuple[str, str | None]:
        """The header value, and the access token it holds (None for a legacy token)."""
        key = self._settings.label_studio_api_key
        if not key:
            raise ImageError(
                "config",
                "Label Studio images need LABEL_STUDIO_API_KEY; set it to a legacy token or a personal "
                "access token of a user who can read the project.",
            )
        if not is_personal_access_token(key):
            return f"Token {key}", None
        with self._token_lock:
            now = time.monotonic()
            if self._access is None or now >= self._access_until or self._access == stale:
                self._access = self._refresh(key, deadline)
                self._access_until = now + ACCESS_TOKEN_TTL
            return f"Bearer {self._access}", self._access

    def _refresh(self, key: str, deadline: _Deadline) -> str:
        assert self._ls is not None and self._ls_url is not None
        scheme, host, port, base = self._ls
        explicit_port = urlsplit(self._ls_url).port
        bracketed = f"[{host}]" if ":" in host else host
        target = _Target(
            url=f"{self._ls_url}/api/token/refresh/",
            tls=scheme == "https",
            host=host,
            port=port,
            host_header=bracketed if explicit_port is None else f"{bracketed}:{port}",
            request_path=f"{base}/api/token/refresh/",
            label_studio=True,
        )
        headers = {
            "Host": target.host_header,
            "User-Agent": "dermassist-backend",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Connection": "close",
        }
        body = json.dumps({"refresh": key}).encode()
        response = self._send(target, "POST", headers, body, deadline, _MAX_TOKEN_RESPONSE)
        access: object = None
        if response.status == 200:
            try:
                access = json.loads(response.body).get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access or _CONTROL.search(access):
            raise ImageError(
                "auth",
                f"Label Studio did not exchange the personal access token in LABEL_STUDIO_API_KEY for an "
                f"access token (HTTP {response.status}); create a new token in Label Studio's Account & "
                "Settings and set it.",
            )
        logger.debug("refreshed the Label Studio access token")
        return access

    def _addresses(self, target: _Target, deadline: _Deadline) -> list[_Address]:
        """The checked addresses of ``target``'s host (rule 3); the connection goes to these only."""
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise ImageError(
                "host",
                f"The image host {target.host} cannot be resolved ({type(exc).__name__}); check the URL "
                "and this machine's DNS.",
            ) from None
        if deadline.remaining() <= 0:
            raise _timeout(target, deadline)
        good: list[_Address] = []
        seen: set[str] = set()
        refused: list[tuple[IPAddress, str]] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if _always_refused(ip):
                raise ImageError(
                    "address",
                    f"{_subject(target, ip)} a link-local or cloud-metadata address, which is never "
                    "fetched; serve the image from another host.",
                )
            kind = None if target.label_studio else _kind(ip)
            if kind is None or self._address_listed(ip, target.port):
                if str(ip) not in seen:
                    seen.add(str(ip))
                    good.append((family, tuple(sockaddr)))
            else:
                refused.append((ip, kind))
        if not good:
            if not refused:
                raise ImageError("host", f"The image host {target.host} has no IPv4 or IPv6 address.")
            ip, kind = refused[0]
            bracketed = f"[{ip}]" if ip.version == 6 else str(ip)
            raise ImageError(
                "address",
                f"{_subject(target, ip)} a {kind} address; list "
                f"'{bracketed}:{target.port}' in ALLOWED_IMAGE_HOSTS as well if this server is meant to "
                "be reached.",
            )
        return good

    def _address_listed(self, ip: IPAddress, port: int) -> bool:
        return any(
            e.ip is not None and e.ip in _embedded(ip) and e.port in (None, port) for e in self._allowed
        )

    def _send(
        self,
        target: _Target,
        method: str,
        headers: dict[str, str],
        body: bytes | None,
        deadline: _Deadline,
        limit: int,
    ) -> _Response:
        """One request; the body is read (at most ``limit`` bytes) only for a 200."""
        addresses = self._addresses(target, deadline)
        remaining = deadline.remaining()
        if remaining <= 0:
            raise _timeout(target, deadline)
        conn = _PinnedConnection(target, addresses, remaining, self._tls_context() if target.tls else None)
        watchdog = _Watchdog(conn, remaining)
        response: http.client.HTTPResponse | None = None
        try:
            conn.request(method, target.request_path, body=body, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                return _Response(response.status, response.getheader("Location"), b"")
            announced = _announced_length(target, response)
            if announced is not None and announced > limit:
                raise _too_large(target, limit, f"announces {announced:,} bytes")
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = response.read(min(_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                total += len(chunk)
                chunks.append(chunk)
                if total > limit:
                    raise _too_large(target, limit, f"sent over {limit:,} bytes")
            if watchdog.fired:
                raise _timeout(target, deadline)
            if announced is not None and total < announced:  # http.client returns short reads quietly
                raise _cut_short(target, f"{total:,} of the {announced:,} bytes it announced")
            return _Response(200, None, b"".join(chunks))
        except ImageError:
            raise
        except http.client.IncompleteRead:  # a broken chunked body, or a connection closed mid-file
            if watchdog.fired:
                raise _timeout(target, deadline) from None
            raise _cut_short(target, "part of the file") from None
        except ssl.SSLCertVerificationError as exc:
            raise ImageError(
                "connection",
                f"The TLS certificate of {target.host} is not valid ({exc.verify_message}); fix the "
                "server's certificate.",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.fired or isinstance(exc, TimeoutError):
                raise _timeout(target, deadline) from None
            raise ImageError(
                "connection",
                f"Could not fetch {_display(target.url)!r} ({type(exc).__name__}); check that the server "
                "is up and reachable from the backend.",
            ) from None
        finally:
            watchdog.cancel()
            if response is not None:
                response.close()
            conn.close()

    def _tls_context(self) -> ssl.SSLContext:
        with self._cache_lock:  # never held while another lock is taken
            if self._tls is None:
                self._tls = ssl.create_default_context()
            return self._tls

    # cache --------------------------------------------------------------------------------------

    def _decoded(self, data: bytes) -> LoadedImage:
        digest = hashlib.sha256(data).hexdigest()
        with self._cache_lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
        if hit is None:
            # decoded outside the lock: two threads may decode the same new bytes at once, never wrongly
            image = decode_image(data, self._settings.max_image_pixels)
            hit = LoadedImage(image=image, sha256=digest, width=image.width, height=image.height)
            self._remember(hit)
        return replace(hit, image=hit.image.copy())

    def _remember(self, loaded: LoadedImage) -> None:
        size = loaded.width * loaded.height * 3
        if self._cache_size == 0 or size > self._cache_bytes:
            return
        with self._cache_lock:
            if loaded.sha256 in self._cache:
                return
            self._cache[loaded.sha256] = loaded
            self._cached_bytes += size
            while len(self._cache) > self._cache_size or self._cached_bytes > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.width * old.height * 3


def _subject(target: _Target, ip: IPAddress) -> str:
    if target.host == str(ip):
        return f"The address {ip} is"
    return f"The host {target.host} resolves to {ip},"


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _split_path_query(ref: str) -> tuple[str, str]:
    path, _, query = ref.partition("?")
    return path, query.partition("#")[0]


def _scheme_error(ref: str, scheme: str) -> ImageError:
    if scheme in _CLOUD_SCHEMES:
        return ImageError(
            "scheme",
            f"Images on {scheme}:// are not fetched directly; connect the bucket to the project as Label "
            "Studio cloud storage with presigned URLs (tasks then carry /tasks/<id>/presign/ links) and "
            "add the storage host to ALLOWED_IMAGE_HOSTS.",
        )
    if not scheme or ref.startswith("//") or re.fullmatch(r"[a-z]", scheme):  # C:\... is a drive
        return ImageError(
            "scheme",
            f"The image reference {_display(ref)!r} is not a URL; local files are not read, import them "
            "into Label Studio or serve them from a host in ALLOWED_IMAGE_HOSTS.",
        )
    return ImageError(
        "scheme",
        f"The image URL scheme {scheme!r} is not allowed; use an http(s) URL from a host in "
        "ALLOWED_IMAGE_HOSTS or a Label Studio media path.",
    )


def _refused_redirect(source: _Target, location: str, exc: ImageError) -> ImageError:
    hint = ""
    if source.label_studio and "/user/login" in location:
        hint = " Label Studio sent its login page: check LABEL_STUDIO_API_KEY."
    return ImageError(
        "redirect",
        f"The image at {_display(source.url)!r} redirected to {_display(location)!r}, which is refused "
        f"({exc.reason}): {exc}{hint}",
    )


def _announced_length(target: _Target, response: http.client.HTTPResponse) -> int | None:
    """The body length a response announces (None for a chunked or close-delimited body).

    Raises:
        ImageError: conflicting or malformed ``Content-Length`` headers (a response that cannot be
            framed is not trusted to hold the whole image).
    """
    if "chunked" in (response.getheader("Transfer-Encoding") or "").lower():
        return None
    values = {v.strip() for v in response.headers.get_all("Content-Length") or []}
    if not values:
        return None
    if len(values) > 1 or not all(v.isascii() and v.isdigit() for v in values):
        raise ImageError(
            "truncated",
            f"The server at {_display(target.url)!r} sent an invalid Content-Length "
            f"({', '.join(sorted(values))[:80]}); the file cannot be trusted to be whole.",
        )
    return int(values.pop())


def _cut_short(target: _Target, what: str) -> ImageError:
    return ImageError(
        "truncated",
        f"The server at {_display(target.url)!r} closed the connection after sending only {what}; "
        "the image was not used. Try again.",
    )


def _too_large(target: _Target, limit: int, what: str) -> ImageError:
    return ImageError(
        "too_large",
        f"The image at {_display(target.url)!r} {what}, more than MAX_IMAGE_BYTES ({limit:,} bytes); "
        "downscale the image or raise MAX_IMAGE_BYTES.",
    )


def _timeout(target: _Target, deadline: _Deadline) -> ImageError:
    return ImageError(
        "timeout",
        f"Fetching {_display(target.url)!r} took longer than IMAGE_TIMEOUT ({deadline.seconds:g} s); check "
        "the server, or raise IMAGE_TIMEOUT.",
    )
