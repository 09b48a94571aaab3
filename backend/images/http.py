"""The pinned HTTP client: one request to addresses the policy checked, bounded in time and size.

Only the standard library does the HTTP, so the connection can be pinned: the host is resolved once
(:func:`socket.getaddrinfo`), :meth:`UrlPolicy.check_addresses` keeps the allowed addresses, and the
socket connects to those (TLS still verifies the certificate for the name), so DNS rebinding between the
check and the connection is not possible. A :class:`Deadline` bounds a whole fetch, and a watchdog shuts
the socket when it passes, so a server dripping bytes cannot stretch it. ``HTTP_PROXY``/``HTTPS_PROXY``
are not honoured, since a proxy would resolve the name again.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from backend.images.errors import ImageError, display
from backend.images.policy import Address, Target, UrlPolicy

_CHUNK = 64 * 1024


class Deadline:
    """The end of one fetch: every connection, token exchange, redirect and read shares it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._end - time.monotonic()


@dataclass(frozen=True)
class Response:
    """A response: its status, its ``Location`` (for a redirect) and its body (read only for a 200)."""

    status: int
    location: str | None
    body: bytes


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP or HTTPS to addresses already checked: the name is never resolved again."""

    def __init__(
        self, target: Target, addresses: list[Address], timeout: float, tls: ssl.SSLContext | None
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


class PinnedClient:
    """Sends one request at a time to a :class:`Target`, connecting only where ``policy`` allows.

    Args:
        policy: decides which resolved addresses may be connected to.

    Thread-safe: every request has its own connection.
    """

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy
        self._tls: ssl.SSLContext | None = None  # made on first https use: loading CAs takes ~50 ms
        self._tls_lock = threading.Lock()

    def send(
        self,
        target: Target,
        method: str,
        headers: dict[str, str],
        body: bytes | None,
        deadline: Deadline,
        limit: int,
    ) -> Response:
        """One request; the body is read (at most ``limit`` bytes) only for a 200.

        Raises:
            ImageError: ``host`` or ``address`` (rule 3), ``timeout``, ``too_large``, ``truncated`` or
                ``connection``.
        """
        addresses = self._addresses(target, deadline)
        remaining = deadline.remaining()
        if remaining <= 0:
            raise timeout_error(target, deadline)
        conn = _PinnedConnection(target, addresses, remaining, self._tls_context() if target.tls else None)
        watchdog = _Watchdog(conn, remaining)
        response: http.client.HTTPResponse | None = None
        try:
            conn.request(method, target.request_path, body=body, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                return Response(response.status, response.getheader("Location"), b"")
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
                raise timeout_error(target, deadline)
            if announced is not None and total < announced:  # http.client returns short reads quietly
                raise _cut_short(target, f"{total:,} of the {announced:,} bytes it announced")
            return Response(200, None, b"".join(chunks))
        except ImageError:
            raise
        except http.client.IncompleteRead:  # a broken chunked body, or a connection closed mid-file
            if watchdog.fired:
                raise timeout_error(target, deadline) from None
            raise _cut_short(target, "part of the file") from None
        except ssl.SSLCertVerificationError as exc:
            raise ImageError(
                "connection",
                f"The TLS certificate of {target.host} is not valid ({exc.verify_message}); fix the "
                "server's certificate.",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.fired or isinstance(exc, TimeoutError):
                raise timeout_error(target, deadline) from None
            raise ImageError(
                "connection",
                f"Could not fetch {display(target.url)!r} ({type(exc).__name__}); check that the server "
                "is up and reachable from the backend.",
            ) from None
        finally:
            watchdog.cancel()
            if response is not None:
                response.close()
            conn.close()

    def _addresses(self, target: Target, deadline: Deadline) -> list[Address]:
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
            raise timeout_error(target, deadline)
        return self._policy.check_addresses(target, infos)

    def _tls_context(self) -> ssl.SSLContext:
        with self._tls_lock:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            return self._tls


def timeout_error(target: Target, deadline: Deadline) -> ImageError:
    return ImageError(
        "timeout",
        f"Fetching {display(target.url)!r} took longer than IMAGE_TIMEOUT ({deadline.seconds:g} s); check "
        "the server, or raise IMAGE_TIMEOUT.",
    )


def _announced_length(target: Target, response: http.client.HTTPResponse) -> int | None:
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
            f"The server at {display(target.url)!r} sent an invalid Content-Length "
            f"({', '.join(sorted(values))[:80]}); the file cannot be trusted to be whole.",
        )
    return int(values.pop())


def _cut_short(target: Target, what: str) -> ImageError:
    return ImageError(
        "truncated",
        f"The server at {display(target.url)!r} closed the connection after sending only {what}; "
        "the image was not used. Try again.",
    )


def _too_large(target: Target, limit: int, what: str) -> ImageError:
    return ImageError(
        "too_large",
        f"The image at {display(target.url)!r} {what}, more than MAX_IMAGE_BYTES ({limit:,} bytes); "
        "downscale the image or raise MAX_IMAGE_BYTES.",
    )
