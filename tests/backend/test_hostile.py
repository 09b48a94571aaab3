"""The hostile-input suite: every class of input a client controls, against the app with its real store.

Each probe asserts the status, a clear JSON message, the server still alive, and nothing stored that
should not be. No outside address is ever contacted: name resolution answers from a table here (no
DNS query leaves), and every socket connect goes through a guard that lets only the stand-in servers on
127.0.0.1 through and counts (and refuses) anything else, so the SSRF probes also prove that no
connection to a forbidden address was even attempted. The slow-client probes run against a real
``dermassist serve`` on 127.0.0.1.

``python -m pytest tests/backend/test_hostile.py -q`` runs it; docs/RESULTS.md has the table.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from typing import Any

import pytest
from sqlalchemy import func, select

from backend.api.app import MAX_EVENT_BYTES, MAX_JSON_DEPTH, create_app
from consensus.models import Annotation, AnnotationEvent, Item, Rater
from labeling_config import load_config
from tests.backend.conftest import LS_TOKEN, png_bytes, with_settings
from tests.backend.test_images import one_bit_png

BCC_XML = load_config("bcc")
HOST = "images.test"  # an allowed image host, resolved here to the stand-in on 127.0.0.1

# --------------------------------------------------------------------------------------------- guards


class Guard:
    """Fake resolver + connect guard; ``forbidden`` lists every refused connection attempt."""

    def __init__(self) -> None:
        self.allowed_ports: set[int] = set()
        self.forbidden: list[Any] = []
        self.names = {
            HOST: "127.0.0.1",
            "metadata.test": "169.254.169.254",
            "private.test": "10.1.2.3",
            "mapped.test": "::ffff:169.254.169.254",
            "loopback.test": "127.0.0.1",
        }


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> Guard:
    state = Guard()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in state.names:
            name = state.names[name]
        flags = socket.AI_NUMERICHOST  # never a DNS query
        try:
            return real_getaddrinfo(name, port, 0, socket.SOCK_STREAM, 0, flags)
        except socket.gaierror:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not known here") from None

    def connect(sock: socket.socket, address: Any) -> None:
        host, port = address[0], address[1]
        if host == "127.0.0.1" and port in state.allowed_ports:
            return real_connect(sock, address)
        state.forbidden.append(address)
        raise ConnectionRefusedError(f"the test guard refused a connection to {address}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return state


@pytest.fixture
def hostile(settings, sessions, promoted, image_server, guard, tmp_path) -> Any:
    """The app with an allow list naming the stand-in image host (by name, and its address:port)."""
    url, files = image_server
    port = int(url.rsplit(":", 1)[1])
    guard.allowed_ports.add(port)
    configured = with_settings(
        settings,
        allowed_image_hosts=(HOST, f"127.0.0.1:{port}", "metadata.test", "private.test", "mapped.test"),
        image_timeout=1.0,
        max_image_bytes=2 * 1024 * 1024,
    )
    app = create_app(configured, sessions=sessions)
    app.config["TESTING"] = True
    files.routes.update(IMAGE_ROUTES)
    files.routes["/data/upload/1/good.png"] = (200, {"Content-Type": "image/png"}, png_bytes())
    return app.test_client(), files, port


def counts(sessions: Any) -> dict[str, int]:
    with sessions() as session:
        return {
            m.__tablename__: session.scalar(select(func.count()).select_from(m)) or 0
            for m in (Annotation, AnnotationEvent, Item, Rater)
        }


def assert_json_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    body = response.get_json()
    assert body is not None and isinstance(body.get("error"), str), response.get_data(as_text=True)[:300]
    assert isinstance(body.get("message"), str) and len(body["message"]) > 10
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def assert_alive(client: Any) -> None:
    assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------ SSRF through task images

SSRF = {
    "metadata": "http://169.254.169.254/latest/meta-data/iam/",
    "metadata-v6": "http://[fd00:ec2::254]/latest/meta-data/",
    "metadata-alibaba": "http://100.100.100.200/latest/meta-data/",
    "private-10": "http://10.0.0.1/x.png",
    "private-192": "http://192.168.1.1/x.png",
    "private-172": "http://172.16.0.1/x.png",
    "loopback-unlisted-port": "http://127.0.0.1:22/x.png",
    "localhost": "http://localhost/x.png",
    "ipv6-loopback": "http://[::1]/x.png",
    "ipv6-mapped": "http://[::ffff:169.254.169.254]/x.png",
    "ipv6-mapped-hex": "http://[::ffff:a9fe:a9fe]/x.png",
    "nat64": "http://[64:ff9b::a9fe:a9fe]/x.png",
    "6to4": "http://[2002:a9fe:a9fe::]/x.png",
    "ipv6-link-local": "http://[fe80::1]/x.png",
    "ipv6-unique-local": "http://[fd12:3456::1]/x.png",
    "unspecified": "http://0.0.0.0/x.png",
    "zero": "http://0/x.png",
    "decimal": "http://2852039166/x.png",
    "hex": "http://0xa9fea9fe/x.png",
    "hex-dotted": "http://0xa9.0xfe.0xa9.0xfe/x.png",
    "octal": "http://0251.0376.0251.0376/x.png",
    "short-form": "http://169.254.43518/x.png",
    "fullwidth-digits": "http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/x.png",
    "arabic-digits": "http://\u0661\u0666\u0669.\u0662\u0665\u0664.\u0661\u0666\u0669.\u0662\u0665\u0664/x.png",
    "userinfo": f"http://{HOST}@169.254.169.254/x.png",
    "userinfo-reversed": f"http://169.254.169.254@{HOST}/x.png",
    "fragment": f"http://169.254.169.254#@{HOST}/x.png",
    "backslash": f"http://169.254.169.254\\@{HOST}/x.png",
    "dns-to-metadata": "http://metadata.test/x.png",
    "dns-to-private": "http://private.test/x.png",
    "dns-to-mapped": "http://mapped.test/x.png",
    "dns-unlisted-to-loopback": "http://loopback.test/x.png",
    "unlisted-public": "http://93.184.216.34/x.png",
    "file": "file:///etc/passwd",
    "gopher": "gopher://127.0.0.1:6379/_FLUSHALL",
    "ftp": f"ftp://{HOST}/x.png",
    "dict": "dict://127.0.0.1:11211/stats",
    "data": "data:image/png;base64,iVBORw0KGgo=",
    "protocol-relative": "//169.254.169.254/x.png",
    "bare-path": "/etc/passwd",
    "s3": "s3://bucket/x.png",
    "ls-traversal": "/data/upload/../../../etc/passwd",
    "ls-traversal-encoded": "/data/upload/%2e%2e/%2e%2e/etc/passwd",
    "ls-traversal-double-encoded": "/data/upload/%252e%252e/%252e%252e/etc/passwd",
    "ls-local-files-traversal": "/data/local-files/?d=../../etc/passwd",
    "ls-local-files-absolute": "/data/local-files/?d=/etc/passwd",
    "ls-api-route": "/api/projects/",
    "redirect-to-metadata": f"http://{HOST}/redirect-metadata.png",
    "redirect-to-private": f"http://{HOST}/redirect-private.png",
    "redirect-to-file": f"http://{HOST}/redirect-file.png",
    "redirect-chain": f"http://{HOST}/hop1.png",
    "redirect-loop": f"http://{HOST}/loop.png",
    "not-a-string": 12345,
    "empty": "",
    "nul-in-url": f"http://{HOST}/x\x00.png",
    "newline-injection": f"http://{HOST}/x.png HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
}

IMAGE_ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/redirect-metadata.png": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    "/redirect-private.png": (302, {"Location": "http://10.0.0.1/x.png"}, b""),
    "/redirect-file.png": (302, {"Location": "file:///etc/passwd"}, b""),
    "/hop1.png": (301, {"Location": "/hop2.png"}, b""),
    "/hop2.png": (302, {"Location": "/hop3.png"}, b""),
    "/hop3.png": (307, {"Location": "http://metadata.test/"}, b""),
    "/loop.png": (302, {"Location": "/loop.png"}, b""),
}


def predict(client: Any, ref: Any) -> Any:
    return client.post(
        "/predict", json={"tasks": [{"id": 1, "data": {"image": ref}}], "label_config": BCC_XML}
    )


@pytest.mark.parametrize("name", list(SSRF))
def test_ssrf_forms_are_refused_without_a_connection(name, hostile, guard, sessions):
    client, files, _ = hostile
    before = counts(sessions)
    response = predict(client, SSRF[name])
    assert response.status_code == 200
    prediction = response.get_json()["results"][0]
    assert prediction["result"] == [] and len(prediction["error"]) > 10, prediction
    assert guard.forbidden == []
    assert [seen for seen, _ in files.seen if "169.254" in seen or "passwd" in seen] == []
    assert counts(sessions) == before
    assert_alive(client)


def test_the_guard_refuses_and_counts_a_connection_elsewhere(guard):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("10.0.0.1", 80), timeout=1)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.org", 80)  # no DNS query leaves
    assert guard.forbidden == [("10.0.0.1", 80)]


def test_the_allowed_host_still_works_under_the_guard(hostile, guard):
    client, files, port = hostile
    files.routes["/ok.png"] = (200, {"Content-Type": "image/png"}, png_bytes())
    prediction = predict(client, f"http://{HOST}:{port}/ok.png").get_json()["results"][0]
    assert prediction["result"] and "error" not in prediction
    assert guard.forbidden == []


# ---------------------------------------------------------------------------------------- hostile images


def _text_png() -> bytes:
    return b"Dermoscopy notes, not an image.\n" * 40


HOSTILE_IMAGES: dict[str, tuple[tuple[int, dict[str, str], bytes], str]] = {
    "decompression-bomb": ((200, {"Content-Type": "image/png"}, b"BOMB"), "too_many_pixels"),
    "truncated": ((200, {"Content-Type": "image/png"}, png_bytes()[:300]), "truncated"),
    "short-body": ((200, {"Content-Length": "999999"}, png_bytes()), "truncated"),
    "wrong-type": ((200, {"Content-Type": "image/png"}, _text_png()), "not_an_image"),
    "empty": ((200, {"Content-Type": "image/png"}, b""), "empty"),
    "huge": ((200, {"Content-Length": str(10**12)}, b"x" * 100), "too_large"),
    "over-limit": ((200, {"Content-Type": "image/png"}, b"\x89PNG" + b"0" * (3 * 1024 * 1024)), "too_large"),
    "error-status": ((500, {}, b"boom"), "http_status"),
}


@pytest.mark.parametrize("name", [*HOSTILE_IMAGES, "slow"])
def test_hostile_images_give_an_empty_prediction_with_the_reason(name, hostile, guard, sessions):
    client, files, port = hostile
    if name == "slow":
        url = f"http://{HOST}:{_silent_server(guard)}/slow.png"
    else:
        route, _ = HOSTILE_IMAGES[name]
        if route[2] == b"BOMB":
            route = (200, route[1], one_bit_png(20_000, 20_000))
        files.routes[f"/{name}.png"] = route
        url = f"http://{HOST}:{port}/{name}.png"
    good = f"http://{HOST}:{port}/data-ok.png"
    files.routes["/data-ok.png"] = (200, {"Content-Type": "image/png"}, png_bytes(seed=3))
    response = client.post(
        "/predict",
        json={
            "tasks": [{"id": 1, "data": {"image": url}}, {"id": 2, "data": {"image": good}}],
            "label_config": BCC_XML,
        },
    )
    assert response.status_code == 200
    bad, ok = response.get_json()["results"]
    assert bad["result"] == [] and len(bad["error"]) > 10
    assert ok["result"], "one hostile image must not fail the batch"
    assert guard.forbidden == []
    assert_alive(client)


def _silent_server(guard: Guard) -> int:
    """A server on 127.0.0.1 that accepts and never answers (closed when the test process ends)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    port = int(server.getsockname()[1])
    guard.allowed_ports.add(port)
    return port


# ------------------------------------------------------------------------------------- malformed bodies

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = (b'{"a":' * 100_000) + b"1" + b"}" * 100_000
JUST_TOO_DEEP = json.dumps(json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))).encode()
BODIES: dict[str, tuple[bytes, int]] = {
    "empty": (b"", 400),
    "not-json": (b"this is not json", 400),
    "invalid-utf8": (b'{"a": "\xff\xfe"}', 400),
    "array": (b"[1, 2, 3]", 400),
    "string": (b'"text"', 400),
    "null": (b"null", 400),
    "nested-100000-arrays": (DEEP, 400),
    "nested-100000-objects": (DEEP_OBJECT, 400),
    "nested-just-too-deep": (b'{"x": ' + JUST_TOO_DEEP + b"}", 400),
    "giant-integer": (b'{"a": ' + b"9" * 5000 + b"}", 400),
    "truncated-json": (b'{"action": "ANNOTATION_CREATED", "annotation": {', 400),
    "duplicate-keys-wrong-types": (b'{"schema": 1, "schema": 2, "tasks": 3, "action": 4}', 400),
}


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize("name", list(BODIES))
def test_malformed_bodies_are_4xx_with_a_reason_and_webhooks_keep_them(name, path, hostile, sessions):
    client, _, _ = hostile
    raw, status = BODIES[name]
    before = counts(sessions)
    response = client.post(path, data=raw, content_type="application/json")
    assert_json_error(response, status)
    after = counts(sessions)
    expected = dict(before)
    if path == "/webhook":
        expected["annotation_events"] += 1  # kept, with the reason
    assert after == expected
    assert_alive(client)


@pytest.mark.parametrize("path", ["/setup", "/predict"])
def test_nan_and_infinity_are_not_json(path, hostile):
    client, _, _ = hostile
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"schema": ' + constant + b', "tasks": [], "label_config": ' + constant + b"}"
        assert_json_error(client.post(path, data=body, content_type="application/json"), 400)


def test_oversized_bodies_are_413_and_a_webhook_is_still_kept(hostile, sessions):
    client, _, _ = hostile
    before = counts(sessions)
    event = json.dumps({"action": "ANNOTATION_CREATED", "blob": "x" * (MAX_EVENT_BYTES + 10)}).encode()
    assert_json_error(client.post("/webhook", data=event, content_type="application/json"), 413)
    with sessions() as session:
        kept = session.scalars(select(AnnotationEvent).order_by(AnnotationEvent.id.desc())).first()
        assert kept is not None and "bytes" in kept.error and len(json.dumps(kept.payload)) < 10_000
    big = b'{"tasks": [], "pad": "' + b"x" * (64 * 1024 * 1024 + 10) + b'"}'
    assert_json_error(client.post("/predict", data=big, content_type="application/json"), 413)
    assert counts(sessions)["annotations"] == before["annotations"]
    assert_alive(client)


# ------------------------------------------------------------------------------------------------ events


def annotation(annotation_id: Any = 11, task: Any = 5, user: Any = 3, **extra: Any) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": annotation_id,
            "completed_by": user,
            "task": task,
            "result": [
                {
                    "from_name": "diagnosis",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": ["BCC"]},
                }
            ],
            "updated_at": "2026-11-20T10:00:00Z",
            **extra,
        },
        "task": {"id": task, "data": {"image": "/data/upload/1/good.png"}},
        "project": {"id": 1, "label_config": BCC_XML},
    }


def _with(event: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target = event
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return event


def _result(item: dict[str, Any]) -> dict[str, Any]:
    return _with(annotation(), "annotation.result", [item])


EVENTS: dict[str, tuple[dict[str, Any], str]] = {
    "annotation-id-2**63": (annotation(annotation_id=2**63), "annotation.id"),
    "annotation-id-10**20": (annotation(annotation_id=10**20), "annotation.id"),
    "annotation-id-below-int64": (annotation(annotation_id=-(2**63) - 1), "annotation.id"),
    "annotation-id-zero": (annotation(annotation_id=0), "annotation.id"),
    "annotation-id-negative": (annotation(annotation_id=-5), "annotation.id"),
    "annotation-id-text": (annotation(annotation_id="11"), "annotation.id"),
    "annotation-id-float": (annotation(annotation_id=11.5), "annotation.id"),
    "annotation-id-bool": (annotation(annotation_id=True), "annotation.id"),
    "task-id-10**20": (annotation(task=10**20), "task.id"),
    "completed-by-10**20": (annotation(user=10**20), "completed_by"),
    "completed-by-object-10**20": (annotation(user={"id": 10**20, "email": "a@x.org"}), "completed_by"),
    "delete-id-10**20": (
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 10**20}]},
        "annotations[0].id",
    ),
    "delete-id-text": ({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "x"}]}, "annotations[0].id"),
    "delete-not-a-list": ({"action": "ANNOTATIONS_DELETED", "annotations": {"id": 1}}, "annotations list"),
    "nul-in-email": (annotation(user={"id": 3, "email": "nul\x00@x.org"}), "NUL"),
    "nul-in-action": (_with(annotation(), "action", "ANNOTATION_CREATED\x00"), "NUL"),
    "nul-in-choice": (
        _result(
            {
                "from_name": "diagnosis",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["B\x00CC"]},
            }
        ),
        "NUL",
    ),
    "nul-in-key": (_with(annotation(), "task.data", {"ima\x00ge": "x"}), "NUL"),
    "nul-in-task-data": (_with(annotation(), "task.data", {"image": "/data/upload/1/\x00.png"}), "NUL"),
    "nan-in-task-data": (_with(annotation(), "task.data", {"image": "x", "age": float("nan")}), "finite"),
    "infinity-in-annotation": (_with(annotation(), "annotation.lead_time", float("inf")), "finite"),
    "email-too-long": (annotation(user={"id": 3, "email": "a" * 300 + "@x.org"}), "email"),
    "email-not-text": (annotation(user={"id": 3, "email": ["a@x.org"]}), "email"),
    "action-too-long": (_with(annotation(), "action", "A" * 100), "action"),
    "unknown-control": (
        _result({"from_name": "nope", "to_name": "image", "type": "choices", "value": {"choices": ["BCC"]}}),
        '"nope"',
    ),
    "rectanglelabels-on-bcc": (
        _result(
            {
                "from_name": "regions",
                "to_name": "image",
                "type": "rectanglelabels",
                "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Ulceration"]},
            }
        ),
        "rectanglelabels",
    ),
    "brush-on-choices": (
        _result(
            {
                "from_name": "diagnosis",
                "to_name": "image",
                "type": "brushlabels",
                "value": {"brushlabels": ["BCC"]},
            }
        ),
        "brush",
    ),
    "unknown-choice": (
        _result(
            {
                "from_name": "diagnosis",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["Melanoma"]},
            }
        ),
        "Melanoma",
    ),
    "unknown-brush-label": (
        _result(
            {
                "from_name": "regions",
                "to_name": "image",
                "type": "brushlabels",
                "value": {"brushlabels": ["Vessels"], "rle": [1]},
            }
        ),
        "Vessels",
    ),
    "two-diagnoses": (
        _result(
            {
                "from_name": "diagnosis",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": ["BCC", "non-BCC"]},
            }
        ),
        "single choice",
    ),
    "choices-not-a-list": (
        _result(
            {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": "BCC"}}
        ),
        "list",
    ),
    "result-not-a-list": (_with(annotation(), "annotation.result", {"a": 1}), "list"),
    "result-item-not-object": (_with(annotation(), "annotation.result", [1]), "object"),
    "annotation-missing": ({"action": "ANNOTATION_CREATED", "task": {"id": 1}}, "annotation"),
    "annotation-not-object": ({"action": "ANNOTATION_UPDATED", "annotation": [1]}, "annotation"),
    "task-not-object": (_with(annotation(), "task", "five"), "task"),
    "no-user": (_with(annotation(), "annotation.completed_by", None), "completed_by"),
    "bad-label-config": (_with(annotation(), "project.label_config", "<View><Choices"), "config"),
}


@pytest.mark.parametrize("name", list(EVENTS))
def test_refused_events_are_422_naming_the_field_kept_and_store_nothing(name, hostile, sessions):
    client, _, _ = hostile
    payload, named = EVENTS[name]
    before = counts(sessions)
    response = client.post(
        "/webhook", data=json.dumps(payload, allow_nan=True), content_type="application/json"
    )
    body = assert_json_error(response, 422)
    assert named.lower() in body["message"].lower(), body["message"]
    after = counts(sessions)
    assert after == {**before, "annotation_events": before["annotation_events"] + 1}
    with sessions() as session:
        kept = session.get_one(AnnotationEvent, body["event_id"])
        assert kept.error and "\x00" not in json.dumps(kept.payload) and "\x00" not in kept.action
    assert_alive(client)


@pytest.mark.parametrize(
    "payload",
    [
        _with(
            annotation(), "project", {"id": 10**20, "label_config": BCC_XML}
        ),  # an unusable project id: ignored
        _with(annotation(), "task.data", {"image": "/data/upload/1/good.png", "note": "ünïcödé ✓ 🙂"}),
        annotation(user={"id": 3, "email": 'o\'brien, "dr"\n<derm>@x.org'}),
        annotation(user={"id": 4, "email": "x" * 200}),
    ],
    ids=["project-id-out-of-range", "unicode-data", "odd-email", "longest-email"],
)
def test_odd_but_valid_events_are_stored(payload, hostile, sessions):
    client, _, _ = hostile
    assert client.post("/webhook", json=payload).status_code == 200
    assert counts(sessions)["annotations"] == 1


def test_replays_are_idempotent_and_a_stale_replay_stays_deleted(hostile, sessions):
    client, _, _ = hostile
    created = annotation()
    for _ in range(5):
        assert client.post("/webhook", json=created).status_code == 200
    assert counts(sessions)["annotations"] == 1
    assert (
        client.post(
            "/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 11}]}
        ).status_code
        == 200
    )
    for _ in range(3):
        assert client.post("/webhook", json=created).status_code == 200
    with sessions() as session:
        assert [a.deleted for a in session.scalars(select(Annotation))] == [True]


def test_the_export_works_on_whatever_the_store_accepted(hostile, sessions, tmp_path):
    """Odd names (quotes, commas, newlines, unicode, 200 characters, one e-mail for two users) and
    odd task data: consensus, then every export format."""
    from consensus.export import build_study, write_csv, write_json, write_report
    from consensus.service import run_consensus

    client, _, _ = hostile
    emails = ['o\'brien, "dr"\n<derm>@x.org', "ünïcödé@x.org", "x" * 200, "same@x.org", "same@x.org"]
    for task in range(1, 7):
        for user, email in enumerate(emails, start=1):
            event = annotation(annotation_id=task * 10 + user, task=task, user={"id": user, "email": email})
            event["annotation"]["result"][0]["value"]["choices"] = ["BCC" if (task + user) % 3 else "non-BCC"]
            assert client.post("/webhook", json=event).status_code == 200
    with sessions() as session:
        run_consensus(session)
        session.commit()
        study = build_study(session)
    assert len(study.consensus) > 0
    write_json(study, tmp_path / "study.json")
    assert write_csv(study, tmp_path / "csv")
    write_report(study, tmp_path / "report.html")
    assert json.loads((tmp_path / "study.json").read_text())


# -------------------------------------------------------------------------------------------------- auth


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


AUTH = {
    "missing": None,
    "wrong-password": _basic("ls", "wrong"),
    "wrong-user": _basic("other", "s3cret-pass"),
    "empty-password": _basic("ls", ""),
    "bearer": "Bearer s3cret-pass",
    "token": f"Token {LS_TOKEN}",
    "not-base64": "Basic !!!not-base64!!!",
    "no-colon": "Basic " + base64.b64encode(b"ls").decode(),
    "nul-in-password": _basic("ls", "s3cret-pass\x00"),
    "huge-header": "Basic " + "A" * 20_000,
}


@pytest.mark.parametrize("name", list(AUTH))
def test_auth_refuses_every_wrong_credential_with_401(name, settings, sessions, promoted):
    secured = with_settings(settings, basic_auth_user="ls", basic_auth_pass="s3cret-pass")
    client = create_app(secured, sessions=sessions).test_client()
    headers = {} if AUTH[name] is None else {"Authorization": AUTH[name]}
    before = counts(sessions)
    for method, path in [
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
        ("get", "/versions"),
        ("get", "/metrics"),
    ]:
        response = getattr(client, method)(path, json=annotation(), headers=headers)
        assert_json_error(response, 401)
    assert counts(sessions) == before
    assert client.get("/health").status_code == 200
    right = client.post(
        "/setup", json={"schema": BCC_XML}, headers={"Authorization": _basic("ls", "s3cret-pass")}
    )
    assert right.status_code == 200


def test_unknown_routes_and_methods_are_json(hostile):
    client, _, _ = hostile
    assert_json_error(client.get("/../../etc/passwd"), 404)
    assert_json_error(client.delete("/webhook"), 405)
    assert_json_error(client.get("/predict"), 405)
