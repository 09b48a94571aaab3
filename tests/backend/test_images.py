"""backend/images/: SSRF, auth and decompression-bomb rules, against real HTTP servers on 127.0.0.1.

Every server here listens on 127.0.0.1 on a free port and is stopped after its test; no other network.
References that must be refused before any connection run with ``socket.getaddrinfo`` and
``socket.socket.connect`` replaced by functions that fail the test, so a broken rule cannot reach out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import socket
import struct
import threading
import time
import types
import warnings
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageFile

from backend.images import ACCESS_TOKEN_TTL, REASONS, ImageError, ImageFetcher, LoadedImage, decode_image
from backend.images import cache as image_cache
from backend.label_studio import client as ls_client
from backend.settings import Settings

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
PAT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCIsImp0aSI6IjEifQ.c2lnbmF0dXJlLW9mLXRoZS1wYXQ"
UPLOAD = "/data/upload/1/abc-x.png"

Route = Callable[[BaseHTTPRequestHandler, bytes], None]


# --------------------------------------------------------------------------- images made in memory


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _noise(width: int = 64, height: int = 48, seed: int = 0) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def one_bit_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size; 20,000² is ~220 kB and builds in ~0.1 s."""
    row = b"\x00" + bytes((width + 7) // 8)
    block = 1000
    compressor = zlib.compressobj(1)
    parts = [compressor.compress(row * block) for _ in range(height // block)]
    parts += [compressor.compress(row * (height % block)), compressor.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def pixels() -> NDArray[np.uint8]:
    return _noise()


@pytest.fixture(scope="session")
def png(pixels: NDArray[np.uint8]) -> bytes:
    return _encode(Image.fromarray(pixels), "PNG")


@pytest.fixture(scope="session")
def jpeg(pixels: NDArray[np.uint8]) -> bytes:
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


@pytest.fixture(scope="session")
def bomb() -> bytes:
    """20,000 × 20,000 pixels (400 M) in a small file."""
    return one_bit_png(20_000, 20_000)


# --------------------------------------------------------------------------- test HTTP servers


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 (free port): exact path (with query) -> route; records requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner._handle(self)

            def do_POST(self) -> None:
                owner._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.seen.append(Seen(handler.command, handler.path, headers, body))
        # the client hanging up is what the limit tests expect
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.routes.get(handler.path, _not_found)(handler, body)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def reply(
    handler: BaseHTTPRequestHandler,
    status: int = 200,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    length: bool = True,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serve(body: bytes, length: bool = True) -> Route:
    return lambda h, _: reply(h, 200, body, {"Content-Type": "image/png"}, length=length)


def redirect(location: str, status: int = 302) -> Route:
    return lambda h, _: reply(h, status, b"", {"Location": location})


def _not_found(handler: BaseHTTPRequestHandler, _: bytes) -> None:
    reply(handler, 404, b"not found")


@pytest.fixture
def other() -> Iterator[Server]:
    """A second server that no setting allows."""
    server = Server()
    server.routes["/good.png"] = serve(b"")
    yield server
    server.close()


@pytest.fixture
def img(png: bytes, jpeg: bytes, bomb: bytes, other: Server) -> Iterator[Server]:
    """The allowed image host."""
    server = Server()
    truncated_png = png[: len(png) * 2 // 3]

    def slow(handler: BaseHTTPRequestHandler, _: bytes) -> None:
        if not server.stop.wait(5):
            reply(handler, 200, png)

    routes: dict[str, Route] = {
        "/good.png": serve(png),
        "/same-bytes-other-name.png": serve(png),
        "/good.jpg": serve(jpeg),
        "/no-length.png": serve(png, length=False),
        "/corrupt.bin": serve(bytes(range(256)) * 8),
        "/notes.txt": serve(b"Dermoscopy notes: nothing to see here.\n" * 20),
        "/truncated.png": serve(truncated_png),
        "/truncated.jpg": serve(jpeg[: len(jpeg) // 2]),
        "/empty.png": serve(b""),
        "/image.ppm": serve(_encode(Image.fromarray(_noise(8, 8)), "PPM")),
        "/bomb.png": serve(bomb),
        "/huge-length.png": lambda h, _: reply(h, 200, png[:100], {"Content-Length": str(10**12)}, False),
        "/short-body.png": lambda h, _: reply(h, 200, png[:100], {"Content-Length": str(len(png))}, False),
        # Pillow decodes a PNG without its IEND chunk: only the announced length tells it is cut short.
        "/short-decodable.png": lambda h, _: reply(
            h, 200, png[:-12], {"Content-Length": str(len(png))}, False
        ),
        "/two-lengths.png": lambda h, _: reply(
            h, 200, png, {"Content-Length": str(len(png)), "content-length": str(len(png) + 1)}, False
        ),
        "/bad-length.png": lambda h, _: reply(h, 200, png, {"Content-Length": "12abc"}, False),
        "/broken-chunks.png": lambda h, _: reply(
            h, 200, b"%x\r\n" % len(png) + png[:-50] + b"\r\nzz\r\n", {"Transfer-Encoding": "chunked"}, False
        ),
        "/unfinished-chunks.png": lambda h, _: reply(
            h, 200, b"%x\r\n" % len(png) + png + b"\r\n", {"Transfer-Encoding": "chunked"}, False
        ),
        "/missing.png": _not_found,
        "/error.png": lambda h, _: reply(h, 500, b"boom"),
        "/slow.png": slow,
        "/drip.png": lambda h, _: _drip(h, server.stop, png),
        "/redirect-ok.png": redirect("/good.png"),
        "/redirect-metadata.png": redirect("http://169.254.169.254/latest/meta-data/iam/"),
        "/redirect-file.png": redirect("file:///etc/passwd"),
        "/redirect-gopher.png": redirect("gopher://127.0.0.1:6379/_FLUSHALL"),
        "/redirect-unlisted.png": redirect(other.url("/good.png")),
        "/redirect-no-location.png": lambda h, _: reply(h, 302),
        "/loop.png": redirect("/loop.png"),
        "/hop0.png": redirect("/hop1.png", 301),
        "/hop1.png": redirect("/hop2.png", 303),
        "/hop2.png": redirect("/hop3.png", 307),
        "/hop3.png": redirect("/good.png", 308),
    }
    server.routes.update(routes)
    yield server
    server.close()


def _drip(handler: BaseHTTPRequestHandler, stop: threading.Event, body: bytes) -> None:
    """Headers at once, then one byte every 50 ms: each read is quick, the whole never ends in time."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for byte in body:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        if stop.wait(0.05):
            return


@pytest.fixture
def ls(png: bytes, img: Server) -> Iterator[Server]:
    """A fake Label Studio that wants ``Authorization: Token <LEGACY_KEY>`` on its media routes."""
    server = Server()

    def guarded(route: Route) -> Route:
        def check(handler: BaseHTTPRequestHandler, body: bytes) -> None:
            if handler.headers.get("Authorization") != f"Token {LEGACY_KEY}":
                reply(handler, 401, b'{"detail": "Authentication credentials were not provided."}')
            else:
                route(handler, body)

        return check

    server.routes.update({
        UPLOAD: guarded(serve(png)),
        "/data/local-files/?d=study/images/x.png": guarded(serve(png)),
        "/data/upload/1/abc-my%20lesion%20..v2.png": guarded(serve(png)),
        "/data/upload/1/moved.png": guarded(redirect(UPLOAD)),
        "/data/upload/1/elsewhere.png": guarded(redirect(img.url("/good.png"))),
        "/data/upload/1/to-metadata.png": guarded(redirect("http://169.254.169.254/latest/meta-data/")),
        "/data/upload/1/login.png": redirect("/user/login/?next=/data/upload/1/login.png"),
        "/tasks/7/presign/?fileuri=czM6Ly9idWNrZXQveC5wbmc=": guarded(redirect(img.url("/good.png"))),
    })  # fmt: skip
    yield server
    server.close()


class PatLabelStudio(Server):
    """A fake Label Studio for personal access tokens: refresh -> access token; media needs a live one."""

    def __init__(self, png: bytes) -> None:
        super().__init__()
        self.issued: list[str] = []
        self.live: set[str] = set()
        self.unauthorized = 0
        self.routes["/api/token/refresh/"] = self._refresh
        self.routes[UPLOAD] = self._media(png)

    def _refresh(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        if handler.command != "POST" or json.loads(body or b"{}").get("refresh") != PAT:
            reply(handler, 401, b'{"detail": "Token is invalid or expired", "code": "token_not_valid"}')
            return
        access = f"access-{len(self.issued) + 1}-{'x' * 20}"
        self.issued.append(access)
        self.live.add(access)
        reply(handler, 200, json.dumps({"access": access}).encode(), {"Content-Type": "application/json"})

    def _media(self, png: bytes) -> Route:
        def route(handler: BaseHTTPRequestHandler, _: bytes) -> None:
            auth = handler.headers.get("Authorization", "")
            if auth.startswith("Bearer ") and auth.removeprefix("Bearer ") in self.live:
                reply(handler, 200, png)
            else:
                self.unauthorized += 1
                reply(handler, 401, b'{"detail": "Given token not valid for any token type"}')

        return route


@pytest.fixture
def pat_ls(png: bytes) -> Iterator[PatLabelStudio]:
    server = PatLabelStudio(png)
    yield server
    server.close()


def make_settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {"image_timeout": 3.0}
    base.update(changes)
    return Settings(**base)


def allowing(server: Server, **changes: Any) -> ImageFetcher:
    return ImageFetcher(make_settings(allowed_image_hosts=(f"127.0.0.1:{server.port}",), **changes))


def assert_sentence(error: ImageError, *secrets: str) -> None:
    """A message is a sentence (capital first, full stop last) and holds no key or token."""
    text = str(error)
    assert text[:1].isupper() and text.endswith("."), text
    assert error.reason in REASONS
    for secret in (LEGACY_KEY, PAT, "access-", *secrets):
        assert secret not in text


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any DNS lookup or connection: the reference must be refused before either."""

    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"DNS lookup for {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    no_connections(monkeypatch)


def fake_dns(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    """Every lookup answers ``answers`` (IPs, real ones for numeric hosts); returns the names looked up."""
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        if not answers:
            return real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test on any outgoing connection (the servers here only accept)."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# --------------------------------------------------------------------------- good images


@pytest.mark.parametrize(
    ("path", "fmt"), [("/good.png", "png"), ("/good.jpg", "jpeg"), ("/no-length.png", "png")]
)
def test_fetches_an_allowed_image(
    img: Server, pixels: NDArray[np.uint8], png: bytes, jpeg: bytes, path: str, fmt: str
) -> None:
    loaded = allowing(img).fetch(img.url(path))
    raw = png if fmt == "png" else jpeg
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.mode == "RGB" and (loaded.width, loaded.height) == loaded.image.size == (64, 48)
    assert loaded.sha256 == hashlib.sha256(raw).hexdigest()
    if fmt == "png":
        assert np.array_equal(np.asarray(loaded.image), pixels)
    assert "authorization" not in img.seen[-1].headers


def test_a_bare_address_entry_allows_every_port_of_that_address(img: Server) -> None:
    fetcher = ImageFetcher(make_settings(allowed_image_hosts=("127.0.0.1",)))
    assert fetcher.fetch(img.url("/good.png")).width == 64


def test_label_studio_upload_local_files_and_absolute_urls_carry_the_legacy_token(ls: Server) -> None:
    fetcher = ImageFetcher(make_settings(label_studio_url=ls.url(""), label_studio_api_key=LEGACY_KEY))
    refs = [
        UPLOAD,
        "/data/local-files/?d=study/images/x.png",
        ls.url(UPLOAD),
        "/data/upload/1/moved.png",
        "/data/upload/1/abc-my lesion ..v2.png",  # spaces are encoded; '..' inside a name is no segment
        "/data/upload/1/abc-my%20lesion%20..v2.png",
    ]
    shas = {fetcher.fetch(ref).sha256 for ref in refs}
    assert len(shas) == 1
    assert [s.headers.get("authorization") for s in ls.seen] == [f"Token {LEGACY_KEY}"] * len(ls.seen)
    assert len(ls.seen) == 7  # the redirect within Label Studio keeps the key: same origin


def test_label_studio_refuses_a_wrong_key_with_its_status(ls: Server) -> None:
    wrong = "f" * 40
    fetcher = ImageFetcher(make_settings(label_studio_url=ls.url(""), label_studio_api_key=wrong))
    with pytest.raises(ImageError) as caught:
        fetcher.fetch(UPLOAD)
    assert caught.value.reason == "http_status" and caught.value.status == 401
    assert "LABEL_STUDIO_API_KEY" in str(caught.value)
    assert_sentence(caught.value, wrong)


def test_a_login_redirect_names_the_key(ls: Server) -> None:
    fetcher = ImageFetcher(make_settings(label_studio_url=ls.url(""), label_studio_api_key=LEGACY_KEY))
    with pytest.raises(ImageError) as caught:
        fetcher.fetch("/data/upload/1/login.png")
    assert caught.value.reason == "redirect" and "LABEL_STUDIO_API_KEY" in str(caught.value)
    assert_sentence(caught.value)


def test_the_key_never_reaches_another_host(ls: Server, img: Server) -> None:
    """Label Studio redirecting to an allowed image host (as presigned storage does): no Authorization."""
    fetcher = ImageFetcher(
        make_settings(
            label_studio_url=ls.url(""),
            label_studio_api_key=LEGACY_KEY,
            allowed_image_hosts=(f"127.0.0.1:{img.port}",),
        )
    )
    fetcher.fetch("/data/upload/1/elsewhere.png")
    fetcher.fetch("/tasks/7/presign/?fileuri=czM6Ly9idWNrZXQveC5wbmc=")
    fetcher.fetch(img.url("/good.png"))
    assert len(img.requests_to("/good.png")) == 3
    assert all("authorization" not in s.headers for s in img.seen)
    assert all(s.headers.get("authorization") == f"Token {LEGACY_KEY}" for s in ls.seen)


def test_a_label_studio_redirect_to_a_host_not_allowed_is_refused(ls: Server, img: Server) -> None:
    fetcher = ImageFetcher(make_settings(label_studio_url=ls.url(""), label_studio_api_key=LEGACY_KEY))
    with pytest.raises(ImageError) as caught:
        fetcher.fetch("/tasks/7/presign/?fileuri=czM6Ly9idWNrZXQveC5wbmc=")
    assert caught.value.reason == "redirect" and "ALLOWED_IMAGE_HOSTS" in str(caught.value)
    assert img.seen == []


# --------------------------------------------------------------------------- personal access tokens


class Clock:
    """``time`` for the Label Studio auth (access token lifetime), with a movable offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_a_personal_access_token_is_refreshed_cached_and_renewed(
    pat_ls: PatLabelStudio, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(ls_client, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    caplog.set_level(logging.DEBUG, logger="backend.images")
    caplog.set_level(logging.DEBUG, logger="backend.label_studio")
    fetcher = ImageFetcher(make_settings(label_studio_url=pat_ls.url(""), label_studio_api_key=PAT))

    fetcher.fetch(UPLOAD)
    fetcher.fetch(UPLOAD)
    assert len(pat_ls.issued) == 1  # cached between fetches

    pat_ls.live.clear()  # Label Studio expired it early: one 401, one refresh, one retry
    fetcher.fetch(UPLOAD)
    assert len(pat_ls.issued) == 2 and pat_ls.unauthorized == 1

    clock.offset += ACCESS_TOKEN_TTL + 1  # past our own lifetime: refreshed before asking, no 401
    fetcher.fetch(UPLOAD)
    assert len(pat_ls.issued) == 3 and pat_ls.unauthorized == 1

    refreshes = pat_ls.requests_to("/api/token/refresh/")
    assert [json.loads(s.body) for s in refreshes] == [{"refresh": PAT}] * 3
    assert all(s.method == "POST" and "authorization" not in s.headers for s in refreshes)
    media = [s.headers.get("authorization", "") for s in pat_ls.requests_to(UPLOAD)]
    assert media[-1] == f"Bearer {pat_ls.issued[-1]}" and all(a.startswith("Bearer ") for a in media)
    assert PAT not in caplog.text and not any(a in caplog.text for a in pat_ls.issued)


def test_a_refused_personal_access_token_is_an_auth_error(pat_ls: PatLabelStudio) -> None:
    other_pat = PAT.replace("c2ln", "AAAA")
    fetcher = ImageFetcher(make_settings(label_studio_url=pat_ls.url(""), label_studio_api_key=other_pat))
    with pytest.raises(ImageError) as caught:
        fetcher.fetch(UPLOAD)
    assert caught.value.reason == "auth" and "LABEL_STUDIO_API_KEY" in str(caught.value)
    assert_sentence(caught.value, other_pat)
    assert pat_ls.requests_to(UPLOAD) == []


# --------------------------------------------------------------------------- references refused up front

OFFLINE_LS = "http://127.0.0.1:9"  # discard port; never contacted: these fail before any connection


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("", "scheme"),
        ("   ", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("FILE:///etc/passwd", "scheme"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme"),
        ("ftp://images.example.org/x.png", "scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "scheme"),
        ("s3://bucket/lesions/x.png", "scheme"),
        ("gs://bucket/lesions/x.png", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("/etc/passwd", "scheme"),
        ("/api/users/", "scheme"),
        ("images/x.png", "scheme"),
        ("C:/images/x.png", "scheme"),
        ("//images.example.org/x.png", "scheme"),
        ("/data/upload/1/../../api/users/", "path"),
        ("/data/upload/1/%2e%2e/%2E%2E/api/users/", "path"),
        ("/data/upload/1/%252e%252e/%252e%252e/api/users/", "path"),
        ("/data/upload/1\\..\\x.png", "path"),
        ("/data/upload/1/x\n.png", "path"),
        ("/data/local-files/?d=../../etc/passwd", "path"),
        ("/data/local-files/?d=study%2F..%2F..%2Fetc%2Fpasswd", "path"),
        ("/data/local-files/?d=study/%252e%252e/%252e%252e/etc/passwd", "path"),
        ("/data/local-files/?d=/etc/passwd", "path"),
        ("/data/local-files/?d=a\\b.png", "path"),
        (f"{OFFLINE_LS}/data/upload/1/../../api/users/", "path"),
        (f"{OFFLINE_LS}/api/projects/", "path"),
        ("http://images.example.org/a/%2e%2e/b.png", "path"),
        ("http://example.com/x.png", "host"),
        ("http://images.example.org:8080/x.png", "host"),
        ("https://images.example.org/x.png", "host"),
        ("http://user:secret@images.example.org/x.png", "host"),
        ("http://images.example.org@169.254.169.254/latest/meta-data/", "host"),
        ("http://169.254.169.254/latest/meta-data/", "host"),
        ("http://[::1/x.png", "host"),
        ("http://127.0.0.1:9/x.png", "path"),  # Label Studio's origin, not a media route
    ],
)
@pytest.mark.usefixtures("offline")
def test_refused_before_any_lookup_or_connection(ref: str, reason: str) -> None:
    fetcher = ImageFetcher(
        make_settings(
            label_studio_url=OFFLINE_LS,
            label_studio_api_key=LEGACY_KEY,
            allowed_image_hosts=("images.example.org:80",),
        )
    )
    with pytest.raises(ImageError) as caught:
        fetcher.fetch(ref)
    assert caught.value.reason == reason, str(caught.value)
    assert_sentence(caught.value, "secret")


@pytest.mark.usefixtures("offline")
def test_cloud_storage_is_sent_back_to_label_studio() -> None:
    with pytest.raises(ImageError, match="presigned") as caught:
        ImageFetcher(make_settings()).fetch("s3://bucket/lesions/x.png")
    assert caught.value.reason == "scheme"


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({}, "LABEL_STUDIO_URL"),
        ({"label_studio_url": OFFLINE_LS}, "LABEL_STUDIO_API_KEY"),
    ],
)
def test_label_studio_references_need_its_url_and_key(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ImageError, match=match) as caught:
        ImageFetcher(make_settings(**changes)).fetch(UPLOAD)
    assert caught.value.reason == "config"
    assert_sentence(caught.value)


@pytest.mark.parametrize(
    "entry", ["http://images.example.org", "images.example.org/x", "host:0", "a:b:c:d:e:f:g:h:i"]
)
def test_an_unusable_allowed_host_entry_fails_at_construction(entry: str) -> None:
    with pytest.raises(ImageError, match="ALLOWED_IMAGE_HOSTS") as caught:
        ImageFetcher(make_settings(allowed_image_hosts=(entry,)))
    assert caught.value.reason == "config"


# --------------------------------------------------------------------------- addresses (rule 3)


@pytest.mark.parametrize(
    ("allowed", "url", "answers"),
    [
        (("169.254.169.254",), "http://169.254.169.254/latest/meta-data/", ()),
        (("[fd00:ec2::254]",), "http://[fd00:ec2::254]/latest/meta-data/", ()),
        (("[::ffff:169.254.169.254]",), "http://[::ffff:169.254.169.254]/", ()),
        (("[64:ff9b::a9fe:a9fe]",), "http://[64:ff9b::a9fe:a9fe]/", ()),
        (("100.100.100.200",), "http://100.100.100.200/latest/meta-data/", ()),
        (("169.254.10.1:8080",), "http://169.254.10.1:8080/x.png", ()),
        (("images.example.org", "169.254.169.254"), "http://images.example.org/x.png", ("169.254.169.254",)),
        (("images.example.org", "fe80::1"), "http://images.example.org/x.png", ("fe80::1",)),
        (("images.example.org",), "http://images.example.org/x.png", ("10.0.0.5",)),
        (("images.example.org",), "http://images.example.org/x.png", ("127.0.0.1",)),
        (("images.example.org",), "http://images.example.org/x.png", ("::1",)),
        (("images.example.org",), "http://images.example.org/x.png", ("0.0.0.0",)),
        (("images.example.org",), "http://images.example.org/x.png", ("224.0.0.1",)),
        (("images.example.org", "10.0.0.5:8080"), "http://images.example.org/x.png", ("10.0.0.5",)),
        (
            ("images.example.org", "127.0.0.1"),
            "http://images.example.org/x.png",
            ("93.184.216.34", "169.254.169.254"),
        ),
    ],
)
def test_forbidden_addresses_are_refused_without_connecting(
    monkeypatch: pytest.MonkeyPatch, allowed: tuple[str, ...], url: str, answers: tuple[str, ...]
) -> None:
    fake_dns(monkeypatch, *answers)
    no_connections(monkeypatch)
    with pytest.raises(ImageError) as caught:
        ImageFetcher(make_settings(allowed_image_hosts=allowed)).fetch(url)
    assert caught.value.reason == "address", str(caught.value)
    assert_sentence(caught.value)


def test_a_name_needs_its_private_address_listed_and_the_checked_address_is_the_one_used(
    img: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name resolving to loopback is refused until the address is listed; then the connection goes to
    the address checked, and a second lookup (DNS rebinding to the metadata service) is never made."""
    url = f"http://images.test:{img.port}/good.png"
    fake_dns(monkeypatch, "127.0.0.1")
    with pytest.raises(ImageError, match=r"127\.0\.0\.1") as caught:
        ImageFetcher(make_settings(allowed_image_hosts=(f"images.test:{img.port}",))).fetch(url)
    assert caught.value.reason == "address" and img.seen == []

    fetcher = ImageFetcher(
        make_settings(allowed_image_hosts=(f"images.test:{img.port}", f"127.0.0.1:{img.port}"))
    )
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", img.port))]])

    def rebinding(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        return next(answers, [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))])

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert fetcher.fetch(url).width == 64
    assert img.seen[-1].headers["host"] == f"images.test:{img.port}"


# --------------------------------------------------------------------------- responses and files refused


@pytest.mark.parametrize(
    ("path", "reason", "changes"),
    [
        ("/corrupt.bin", "not_an_image", {}),
        ("/notes.txt", "not_an_image", {}),
        ("/image.ppm", "not_an_image", {}),  # a format outside FORMATS
        ("/truncated.png", "truncated", {}),
        ("/truncated.jpg", "truncated", {}),
        ("/short-body.png", "truncated", {}),
        ("/short-decodable.png", "truncated", {}),
        ("/two-lengths.png", "truncated", {}),
        ("/bad-length.png", "truncated", {}),
        ("/broken-chunks.png", "truncated", {}),
        ("/unfinished-chunks.png", "truncated", {}),
        ("/empty.png", "empty", {}),
        ("/bomb.png", "too_many_pixels", {}),
        ("/good.png", "too_many_pixels", {"max_image_pixels": 64 * 48 - 1}),
        ("/huge-length.png", "too_large", {}),
        ("/good.png", "too_large", {"max_image_bytes": 1000}),
        ("/no-length.png", "too_large", {"max_image_bytes": 1000}),
        ("/missing.png", "http_status", {}),
        ("/error.png", "http_status", {}),
        ("/redirect-metadata.png", "redirect", {}),
        ("/redirect-file.png", "redirect", {}),
        ("/redirect-gopher.png", "redirect", {}),
        ("/redirect-unlisted.png", "redirect", {}),
        ("/redirect-no-location.png", "redirect", {}),
        ("/loop.png", "redirect", {}),
        ("/hop0.png", "redirect", {}),  # four redirects, one too many
        ("/slow.png", "timeout", {"image_timeout": 0.3}),
        ("/drip.png", "timeout", {"image_timeout": 0.3}),
    ],
)
def test_refused_responses_and_files(
    img: Server, other: Server, path: str, reason: str, changes: dict[str, Any]
) -> None:
    start = time.monotonic()
    with pytest.raises(ImageError) as caught:
        allowing(img, **changes).fetch(img.url(path))
    assert caught.value.reason == reason, str(caught.value)
    assert_sentence(caught.value)
    assert time.monotonic() - start < 2.5
    assert other.seen == []  # the redirect to the other port was never followed
    if reason == "http_status":
        assert caught.value.status in (404, 500)


def test_a_redirect_to_a_listed_metadata_address_is_still_refused(
    img: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetcher = ImageFetcher(make_settings(allowed_image_hosts=(f"127.0.0.1:{img.port}", "169.254.169.254")))
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        assert address[0] == "127.0.0.1", f"connection to {address}"
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(ImageError, match=r"169\.254\.169\.254") as caught:
        fetcher.fetch(img.url("/redirect-metadata.png"))
    assert caught.value.reason == "redirect"


def test_redirects_within_the_rules_are_followed_up_to_three(img: Server, png: bytes) -> None:
    fetcher = allowing(img)
    digest = hashlib.sha256(png).hexdigest()
    assert fetcher.fetch(img.url("/redirect-ok.png")).sha256 == digest
    assert fetcher.fetch(img.url("/hop1.png")).sha256 == digest  # 3 redirects: the limit


def test_the_size_limit_is_inclusive(img: Server, png: bytes) -> None:
    for path in ("/good.png", "/no-length.png"):
        assert allowing(img, max_image_bytes=len(png)).fetch(img.url(path)).sha256
        with pytest.raises(ImageError) as caught:
            allowing(img, max_image_bytes=len(png) - 1).fetch(img.url(path))
        assert caught.value.reason == "too_large"


# --------------------------------------------------------------------------- decoding


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: ImageFile.ImageFile) -> Any:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (20_000, 20_000, 60_000_000),  # Pillow's own DecompressionBombError (above 2 × 89 M)
        (9_000, 9_000, 60_000_000),  # 81 M: under Pillow's limit, over ours
        (10_000, 10_000, 200_000_000),  # Pillow's DecompressionBombWarning, an error under pytest
    ],
)
def test_pixel_bombs_are_refused_from_the_header(width: int, height: int, max_pixels: int) -> None:
    data = one_bit_png(width, height)
    assert len(data) < 300_000
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as caught:
            decode_image(data, max_pixels)
    assert caught.value.reason == "too_many_pixels"
    assert time.monotonic() - start < 1.0
    assert_sentence(caught.value)


def _rgba() -> Image.Image:
    image = Image.new("RGBA", (2, 1), (200, 10, 10, 255))
    image.putpixel((1, 0), (200, 10, 10, 0))
    return image


def _palette() -> Image.Image:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([200, 10, 10, 0, 0, 0])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    return image


def _sixteen_bit() -> Image.Image:
    return Image.fromarray(np.array([[65535, 4096]], dtype=np.uint16))


@pytest.mark.parametrize(
    ("make", "fmt", "expected"),
    [
        (_rgba, "PNG", [(200, 10, 10), (255, 255, 255)]),  # transparent -> white
        (_palette, "PNG", [(200, 10, 10), (255, 255, 255)]),
        (lambda: Image.new("L", (2, 1), 100), "PNG", [(100, 100, 100)] * 2),
        (lambda: Image.new("LA", (2, 1), (100, 255)), "PNG", [(100, 100, 100)] * 2),
        (lambda: Image.new("1", (2, 1), 1), "PNG", [(255, 255, 255)] * 2),
        (_sixteen_bit, "PNG", [(255, 255, 255), (16, 16, 16)]),  # scaled, not clipped to 255
        (_sixteen_bit, "TIFF", [(255, 255, 255), (16, 16, 16)]),
        (lambda: Image.new("CMYK", (2, 1), (0, 0, 0, 0)), "TIFF", [(255, 255, 255)] * 2),
    ],
)
def test_every_mode_becomes_rgb(
    make: Callable[[], Image.Image], fmt: str, expected: list[tuple[int, ...]]
) -> None:
    image = decode_image(_encode(make(), fmt), 1000)
    assert image.mode == "RGB"
    assert [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)] == expected


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _encode(Image.fromarray(_noise(40, 20)), "JPEG", exif=exif)
    image = decode_image(data, 10_000)
    assert image.size == (20, 40)


# --------------------------------------------------------------------------- the content-keyed cache


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts calls to decode_image (the SHA-256 of each decoded file)."""
    calls: list[str] = []
    real = image_cache.decode_image

    def counting(data: bytes, max_pixels: int) -> Image.Image:
        calls.append(hashlib.sha256(data).hexdigest())
        return real(data, max_pixels)

    monkeypatch.setattr(image_cache, "decode_image", counting)
    return calls


def test_the_same_bytes_under_two_urls_decode_once(img: Server, decodes: list[str]) -> None:
    fetcher = allowing(img)
    a = fetcher.fetch(img.url("/good.png"))
    b = fetcher.fetch(img.url("/same-bytes-other-name.png"))
    assert a.sha256 == b.sha256 and len(decodes) == 1
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_a_url_whose_file_changed_is_never_served_stale(img: Server, png: bytes, decodes: list[str]) -> None:
    other_png = _encode(Image.fromarray(_noise(seed=1)), "PNG")
    served = iter([png, other_png])
    img.routes["/changing.png"] = lambda h, _: reply(h, 200, next(served))
    fetcher = allowing(img)
    first = fetcher.fetch(img.url("/changing.png"))
    second = fetcher.fetch(img.url("/changing.png"))
    assert first.sha256 != second.sha256 and len(decodes) == 2
    assert not np.array_equal(np.asarray(first.image), np.asarray(second.image))


def test_the_cache_is_lru_and_can_be_turned_off(img: Server, decodes: list[str]) -> None:
    fetcher = ImageFetcher(make_settings(allowed_image_hosts=(f"127.0.0.1:{img.port}",)), cache_size=1)
    for path in ("/good.png", "/good.jpg", "/good.png"):
        fetcher.fetch(img.url(path))
    assert len(decodes) == 3
    off = ImageFetcher(make_settings(allowed_image_hosts=(f"127.0.0.1:{img.port}",)), cache_size=0)
    off.fetch(img.url("/good.png"))
    off.fetch(img.url("/good.png"))
    assert len(decodes) == 5


def test_each_fetch_gets_its_own_copy(img: Server, pixels: NDArray[np.uint8]) -> None:
    fetcher = allowing(img)
    fetcher.fetch(img.url("/good.png")).image.paste((0, 0, 0), (0, 0, 64, 48))
    assert np.array_equal(np.asarray(fetcher.fetch(img.url("/good.png")).image), pixels)


def test_concurrent_fetches_agree(img: Server, png: bytes, jpeg: bytes) -> None:
    fetcher = allowing(img)
    paths = ["/good.png", "/good.jpg", "/same-bytes-other-name.png"] * 4
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def work(path: str) -> None:
        try:
            results.append((path, fetcher.fetch(img.url(path)).sha256))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and len(results) == len(paths)
    expected = {"/good.jpg": hashlib.sha256(jpeg).hexdigest()}
    assert all(sha == expected.get(path, hashlib.sha256(png).hexdigest()) for path, sha in results)
