"""backend/label_studio/client.py and sdk.py: both key kinds, the SDK client and its clear errors.

A fake Label Studio on 127.0.0.1 (free port) answers the few routes used here; nothing else is reached.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from backend.label_studio.client import LabelStudioAuth, LabelStudioError, connect, label_studio_errors
from backend.label_studio.sdk import LabelStudioApi

LEGACY = "0123456789abcdef0123456789abcdef01234567"
CONFIG = '<View><Image name="image" value="$image"/></View>'


def jwt(claims: dict[str, Any]) -> str:
    """An unsigned-looking JWT (the SDK reads the claims without checking the signature)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


PAT = jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat"})
EXPIRED_PAT = jwt({"token_type": "refresh", "exp": int(time.time()) - 60, "jti": "old"})


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeLabelStudio:
    """Label Studio's API under ``prefix``: a legacy token or access tokens from ``/api/token/refresh/``."""

    prefix: str = ""
    seen: list[Seen] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=lambda: [{"id": 1, "data": {"image": "x"}}])
    html: bool = False
    url: str = ""

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.seen.append(Seen(h.command, h.path, dict(h.headers), body))
        if self.html:
            return self.reply(h, 200, b"<html>a web server, not Label Studio</html>", "text/html")
        path = h.path.removeprefix(self.prefix) if h.path.startswith(self.prefix + "/") else "/outside"
        if path == "/api/token/refresh/" and h.command == "POST":
            if json.loads(body).get("refresh") != PAT:
                return self.reply(
                    h, 401, {"detail": "Token is invalid or expired", "code": "token_not_valid"}
                )
            access = jwt({"token_type": "access", "exp": int(time.time()) + 300, "n": len(self.issued)})
            self.issued.append(access)
            return self.reply(h, 200, {"access": access})
        auth = h.headers.get("Authorization", "")
        if auth != f"Token {LEGACY}" and auth.removeprefix("Bearer ") not in self.issued:
            return self.reply(h, 401, {"detail": "Invalid token."})
        if path == "/api/projects/1/":
            return self.reply(h, 200, {"id": 1, "title": "study", "label_config": CONFIG})
        if path.startswith("/api/projects/1/export?"):
            return self.reply(h, 200, self.tasks)
        if path == "/api/projects/1/import" and h.command == "POST":
            return self.reply(h, 201, {"task_count": body.count(b"filename=")})
        return self.reply(h, 404, {"detail": "Not found."})

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, status: int, body: Any, kind: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", kind)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture(params=["", "/label-studio"], ids=["root", "behind-a-prefix"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeLabelStudio]:
    state = FakeLabelStudio(prefix=request.param)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.handle(self)

        def do_POST(self) -> None:
            state.handle(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}{state.prefix}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_a_legacy_token_reads_the_config_and_the_export(fake: FakeLabelStudio) -> None:
    with connect(fake.url, LEGACY) as ls:
        assert isinstance(ls, LabelStudioApi) and LEGACY not in repr(ls)
        assert ls.label_config(1) == CONFIG
        assert ls.export_tasks(1) == fake.tasks
    assert [s.headers["Authorization"] for s in fake.seen] == [f"Token {LEGACY}"] * 2
    assert all(s.path.startswith(f"{fake.prefix}/api/") for s in fake.seen)
    assert "download_all_tasks=true" in fake.seen[-1].path


def test_a_personal_access_token_is_exchanged_once_and_sent_as_bearer(fake: FakeLabelStudio) -> None:
    with connect(fake.url, PAT) as ls:
        ls.label_config(1)
        ls.export_tasks(1)
    refreshes = [s for s in fake.seen if s.path == f"{fake.prefix}/api/token/refresh/"]
    assert len(refreshes) == 1 and json.loads(refreshes[0].body) == {"refresh": PAT}
    api = [s for s in fake.seen if s not in refreshes]
    assert [s.headers["Authorization"] for s in api] == [f"Bearer {fake.issued[0]}"] * 2


@pytest.mark.parametrize(
    ("url", "key", "match"),
    [
        ("127.0.0.1:8080", LEGACY, "LABEL_STUDIO_URL must start with http"),
        ("http://127.0.0.1:9", "", "LABEL_STUDIO_API_KEY"),
        ("http://127.0.0.1:9", EXPIRED_PAT, "refused LABEL_STUDIO_API_KEY .*expired"),
    ],
)
def test_an_unusable_url_or_key_fails_at_connect(url: str, key: str, match: str) -> None:
    with pytest.raises(LabelStudioError, match=match) as caught:
        connect(url, key)
    assert key not in str(caught.value) or not key


def ask(url: str, key: str, call: Callable[[LabelStudioApi], Any]) -> Any:
    """One call the way sync makes it: connect, call, errors mapped."""
    with connect(url, key) as ls, label_studio_errors(ls.url):
        return call(ls)


def test_refused_keys_and_wrong_urls_say_which(fake: FakeLabelStudio) -> None:
    other_pat = jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "other"})
    for key in ("f" * 40, other_pat):
        with pytest.raises(LabelStudioError, match="refused LABEL_STUDIO_API_KEY") as caught:
            ask(fake.url, key, lambda ls: ls.label_config(1))
        assert key not in str(caught.value) and "Traceback" not in str(caught.value)
    with pytest.raises(LabelStudioError, match=r"HTTP 404 .*LABEL_STUDIO_URL and the project id"):
        ask(fake.url, LEGACY, lambda ls: ls.export_tasks(2))
    fake.html = True
    with pytest.raises(LabelStudioError, match=r"not (Label Studio's )?JSON; check .*LABEL_STUDIO_URL"):
        ask(fake.url, LEGACY, lambda ls: ls.label_config(1))


def test_an_unreachable_label_studio_names_its_url() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once this closes
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(LabelStudioError, match=rf"could not reach Label Studio at {url}.*LABEL_STUDIO_URL"):
        ask(url, LEGACY, lambda ls: ls.label_config(1))


def test_upload_files_sends_each_file_in_its_own_field_in_batches(
    fake: FakeLabelStudio, tmp_path: Path
) -> None:
    files = []
    for i in range(5):
        files.append(tmp_path / f"lesion{i}.png")
        files[-1].write_bytes(b"\x89PNG fake " + bytes([i]))
    with connect(fake.url, LEGACY) as ls:
        answers = ls.upload_files(1, files, batch=2)
    assert answers == [{"task_count": 2}, {"task_count": 2}, {"task_count": 1}]
    uploads = [s for s in fake.seen if s.path == f"{fake.prefix}/api/projects/1/import"]
    names = []
    for upload in uploads:
        head = f"Content-Type: {upload.headers['Content-Type']}\r\n\r\n".encode()
        form = email.message_from_bytes(head + upload.body, policy=email.policy.HTTP)
        names.append(
            [(p.get_param("name", header="content-disposition"), p.get_filename()) for p in form.iter_parts()]
        )
    assert names == [
        [("file0", "lesion0.png"), ("file1", "lesion1.png")],
        [("file0", "lesion2.png"), ("file1", "lesion3.png")],
        [("file0", "lesion4.png")],
    ]


# --------------------------------------------------------------------------- the one auth's rules


def test_a_legacy_token_is_sent_as_it_is() -> None:
    auth = LabelStudioAuth(LEGACY)

    def never(key: str) -> str:
        raise AssertionError("a legacy token is never exchanged")

    assert not auth.personal
    assert auth.header(never) == auth.header(never, stale=f"Token {LEGACY}") == f"Token {LEGACY}"
    assert LEGACY not in repr(auth)


def test_an_access_token_is_cached_and_a_refused_one_replaced_once_across_threads() -> None:
    auth = LabelStudioAuth(PAT)
    issued: list[str] = []
    gate = threading.Event()

    def exchange(key: str) -> str:
        assert key == PAT
        gate.wait(1)
        issued.append(f"access-{len(issued)}")
        return issued[-1]

    gate.set()
    first = auth.header(exchange)
    assert auth.header(exchange) == first == "Bearer access-0" and len(issued) == 1
    gate.clear()
    # Two threads saw the same token refused: the first replaces it, the second uses the new one.
    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(auth.header(exchange, stale=first))) for _ in "ab"
    ]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert answers == ["Bearer access-1"] * 2 and len(issued) == 2
    assert PAT not in repr(auth)


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="key"):
        LabelStudioAuth("")
