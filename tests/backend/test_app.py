"""The ML backend's routes, with the Flask test client, the real bcc.xml and images over HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from sqlalchemy import func, select

from backend.api.app import create_app
from consensus.models import Annotation, AnnotationEvent, TrainingJob
from labeling_config import load_config
from tests.backend.conftest import png_bytes, with_settings

BCC_XML = load_config("bcc")
RENAMED_XML = """<View>
  <Image name="dermoscopy" value="$img"/>
  <Choices name="dx" toName="dermoscopy" choice="single">
    <Choice value="Basal cell carcinoma" alias="BCC"/><Choice value="Not BCC" alias="non-BCC"/>
  </Choices>
  <Choices name="structures" toName="dermoscopy" choice="multiple">
    <Choice value="Ulceration"/><Choice value="Arborizing telangiectasia"/><Choice value="Other"/>
  </Choices>
  <BrushLabels name="where" toName="dermoscopy"><Label value="Ulceration"/></BrushLabels>
</View>"""
UNMATCHED_XML = """<View><Image name="img" value="$image"/>
  <Choices name="quality" toName="img"><Choice value="good"/><Choice value="blurry"/></Choices></View>"""


def serve_upload(files: Any, name: str, body: bytes, content_type: str = "image/png") -> str:
    path = f"/data/upload/1/{name}"
    files.routes[path] = (200, {"Content-Type": content_type}, body)
    return path


def predict(client: Any, tasks: list[dict[str, Any]], config: str = BCC_XML, **kw: Any) -> Any:
    return client.post(
        "/predict", json={"tasks": tasks, "label_config": config, "project": "1.1700000000"}, **kw
    )


def counts(sessions: Any) -> tuple[int, int]:
    with sessions() as session:
        events = session.scalar(select(func.count()).select_from(AnnotationEvent))
        rows = session.scalar(select(func.count()).select_from(Annotation))
    return events, rows


# --------------------------------------------------------------------------------------------- predict
def test_health_is_open_and_names_the_promoted_version(client, promoted):
    body = client.get("/health").get_json()
    assert body == {"status": "UP", "model_class": "DermNet", "model_version": promoted, "release": None}


def test_setup_and_predict_return_the_same_version(client, promoted):
    setup = client.post("/setup", json={"project": "1.1700000000", "schema": BCC_XML})
    assert setup.status_code == 200 and setup.get_json()["model_version"] == promoted


def test_predictions_validate_and_masks_have_the_image_size(client, image_server, promoted):
    _, files = image_server
    sizes = [(96, 72), (50, 130)]
    tasks = [
        {"id": i + 1, "data": {"image": serve_upload(files, f"x{i}.png", png_bytes(w, h, seed=i))}}
        for i, (w, h) in enumerate(sizes)
    ]
    response = predict(client, tasks)
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == 2
    interface = LabelInterface(BCC_XML)
    for (w, h), prediction in zip(sizes, results, strict=True):
        assert prediction["model_version"] == promoted
        assert 0.5 <= prediction["score"] <= 1.0  # confidence of the chosen diagnosis
        assert interface.validate_prediction(prediction), prediction
        by_name = {}
        for item in prediction["result"]:
            by_name.setdefault(item["from_name"], []).append(item)
            assert 0.0 <= item["score"] <= 1.0
        assert len(by_name["diagnosis"]) == 1
        assert by_name["diagnosis"][0]["value"]["choices"][0] in ("BCC", "non-BCC")
        assert len(by_name["patterns"][0]["value"]["choices"]) == 7  # thresholds 0: all predicted
        for brush in by_name.get("regions", []):
            assert (brush["original_width"], brush["original_height"]) == (w, h)
            decoded = np.asarray(decode_rle(brush["value"]["rle"])).reshape(h, w, 4)
            assert decoded[..., 3].any()
        assert by_name.get("regions"), "every predicted pattern with a map gets a brush mask"


def test_the_ls_token_is_sent_to_label_studio(client, image_server):
    _, files = image_server
    path = serve_upload(files, "a.png", png_bytes())
    assert predict(client, [{"id": 1, "data": {"image": path}}]).status_code == 200
    assert any(p == path and h.get("Authorization", "").startswith("Token ") for p, h in files.seen)


def test_a_renamed_config_gets_its_own_names_and_values(client, image_server):
    _, files = image_server
    path = serve_upload(files, "a.png", png_bytes())
    result = predict(client, [{"id": 1, "data": {"img": path}}], config=RENAMED_XML).get_json()["results"][0]
    names = {item["from_name"] for item in result["result"]}
    assert names == {"dx", "structures", "where"}
    chosen = next(i for i in result["result"] if i["from_name"] == "structures")["value"]["choices"]
    assert sorted(chosen) == ["Arborizing telangiectasia", "Ulceration"]
    assert LabelInterface(RENAMED_XML).validate_prediction(result)


def test_setup_config_is_used_when_predict_has_none(client, image_server):
    _, files = image_server
    path = serve_upload(files, "a.png", png_bytes())
    client.post("/setup", json={"project": "7.1700000000", "schema": RENAMED_XML})
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"img": path}}], "project": "7.1"})
    assert response.status_code == 200
    assert {i["from_name"] for i in response.get_json()["results"][0]["result"]} >= {"dx"}


def test_no_promoted_model_is_a_clear_503(settings, sessions, image_server):
    client = create_app(settings, sessions=sessions).test_client()
    _, files = image_server
    response = predict(client, [{"id": 1, "data": {"image": serve_upload(files, "a.png", png_bytes())}}])
    assert response.status_code == 503 and response.get_json()["error"] == "no_model"
    assert client.post("/setup", json={"schema": BCC_XML}).get_json()["model_version"] == "untrained"


# --------------------------------------------------------------------------------------- bad inputs
def _png_bomb(side: int = 20_000) -> bytes:
    """A valid PNG header for side x side pixels with a tiny compressed body (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\x00" * (side + 1)
    idat = zlib.compress(row * 64, 9)  # only the first rows: Pillow must refuse before decoding
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _truncated() -> bytes:
    data = png_bytes(200, 200)
    return data[: len(data) // 2]


BAD_FILES = {
    "corrupt": b"\x89PNG\r\n\x1a\n" + b"garbage" * 50,
    "truncated": _truncated(),
    "zero-byte": b"",
    "not-an-image": b"this is a text file, not an image\n" * 10,
    "png-bomb": _png_bomb(),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_files_get_an_empty_result_and_the_batch_goes_on(name, client, image_server, sessions):
    _, files = image_server
    good = serve_upload(files, "good.png", png_bytes())
    bad = serve_upload(files, f"{name}.png", BAD_FILES[name])
    before = counts(sessions)
    response = predict(client, [{"id": 1, "data": {"image": bad}}, {"id": 2, "data": {"image": good}}])
    assert response.status_code == 200
    first, second = response.get_json()["results"]
    assert first["result"] == [] and first["error"]
    assert second["result"] and "error" not in second
    assert counts(sessions) == before  # /predict writes nothing


def _bad_refs(url: str, files: Any, other_port: int) -> dict[str, str]:
    files.routes["/redirect-metadata"] = (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"")
    files.routes["/redirect-file"] = (302, {"Location": "file:///etc/passwd"}, b"")
    files.routes["/redirect-gopher"] = (302, {"Location": "gopher://127.0.0.1:70/"}, b"")
    files.routes["/redirect-port"] = (302, {"Location": f"http://127.0.0.1:{other_port}/x.png"}, b"")
    return {
        "file-scheme": "file:///etc/passwd",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "loopback-other-port": f"http://127.0.0.1:{other_port}/x.png",
        "gopher": "gopher://127.0.0.1:70/_x",
        "s3": "s3://bucket/key.png",
        "dotdot-upload": "/data/upload/../../etc/passwd",
        "dotdot-local-files": "/data/local-files/?d=images/../../../etc/passwd",
        "redirect-to-metadata": f"{url}/redirect-metadata",
        "redirect-to-file": f"{url}/redirect-file",
        "redirect-to-gopher": f"{url}/redirect-gopher",
        "redirect-to-other-port": f"{url}/redirect-port",
    }


BAD_REFS = [
    "file-scheme",
    "metadata",
    "loopback-other-port",
    "gopher",
    "s3",
    "dotdot-upload",
    "dotdot-local-files",
    "redirect-to-metadata",
    "redirect-to-file",
    "redirect-to-gopher",
    "redirect-to-other-port",
]


@pytest.mark.parametrize("case", BAD_REFS)
def test_refused_image_references(case, client, image_server, sessions):
    url, files = image_server
    files.require_token = None
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        ref = _bad_refs(url, files, other.getsockname()[1])[case]
        response = predict(client, [{"id": 1, "data": {"image": ref}}])
    assert response.status_code == 200
    result = response.get_json()["results"][0]
    assert result["result"] == [] and result["error"]
    assert not any("passwd" in path or "meta-data" in path for path, _ in files.seen)


def test_missing_image_key_is_a_per_task_error(client):
    result = predict(client, [{"id": 1, "data": {"picture": "/data/upload/1/a.png"}}]).get_json()["results"][
        0
    ]
    assert result["result"] == [] and "image" in result["error"]


BAD_REQUESTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "malformed-json": ("/predict", {"data": b"{tasks: [", "content_type": "application/json"}, 400),
    "json-list": ("/predict", {"json": [1, 2]}, 400),
    "missing-tasks": ("/predict", {"json": {"label_config": BCC_XML}}, 400),
    "tasks-not-a-list": ("/predict", {"json": {"tasks": "all", "label_config": BCC_XML}}, 400),
    "10000-tasks": ("/predict", {"json": {"tasks": [{"data": {}}] * 10_000, "label_config": BCC_XML}}, 413),
    "config-no-matching-controls": ("/predict", {"json": {"tasks": [], "label_config": UNMATCHED_XML}}, 422),
    "config-not-xml": ("/predict", {"json": {"tasks": [], "label_config": "<View><Image"}}, 422),
    "config-lesion-only": ("/setup", {"json": {"schema": load_config("lesion")}}, 422),
    "setup-no-schema": ("/setup", {"json": {"project": "1.1"}}, 400),
    "setup-unmatched": ("/setup", {"json": {"schema": UNMATCHED_XML}}, 422),
    "empty-body": ("/predict", {"data": b""}, 400),
    "unknown-route": ("/nope", {"json": {}}, 404),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_json_error(case, client, sessions):
    path, kwargs, status = BAD_REQUESTS[case]
    before = counts(sessions)
    response = client.post(path, **kwargs)
    assert response.status_code == status
    body = response.get_json()
    assert set(body) == {"error", "message"} and len(body["message"]) > 10
    assert "Traceback" not in response.get_data(as_text=True)
    assert counts(sessions) == before


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "headers",
    [{}, _basic("ls", "wrong"), _basic("other", "s3cret-pass"), {"Authorization": "Bearer abc"}],
    ids=["missing", "wrong-password", "wrong-user", "not-basic"],
)
def test_basic_auth_guards_every_route_but_health(headers, settings, sessions, promoted):
    secured = with_settings(settings, basic_auth_user="ls", basic_auth_pass="s3cret-pass")
    client = create_app(secured, sessions=sessions).test_client()
    assert client.get("/health").status_code == 200
    for method, path in [
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
        ("get", "/versions"),
    ]:
        response = getattr(client, method)(path, json={}, headers=headers)
        assert response.status_code == 401 and response.get_json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert (
        client.post("/setup", json={"schema": BCC_XML}, headers=_basic("ls", "s3cret-pass")).status_code
        == 200
    )


# --------------------------------------------------------------------------------------------- webhook
def annotation_event(
    action: str = "ANNOTATION_CREATED",
    annotation_id: int = 11,
    task_id: int = 5,
    user: int = 3,
    diagnosis: str = "BCC",
    patterns: tuple[str, ...] = ("Ulceration",),
    updated_at: str = "2026-11-20T10:00:00.000000Z",
) -> dict[str, Any]:
    result = [
        {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [diagnosis]}}
    ]
    if patterns:
        result.append(
            {
                "from_name": "patterns",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": list(patterns)},
            }
        )
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "completed_by": user,
            "result": result,
            "task": task_id,
            "was_cancelled": False,
            "updated_at": updated_at,
        },
        "task": {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"}, "project": 1},
        "project": {"id": 1, "label_config": BCC_XML},
    }


def stored(sessions: Any) -> list[Annotation]:
    with sessions() as session:
        return list(session.scalars(select(Annotation).order_by(Annotation.id)))


def test_webhook_stores_updates_replays_and_deletes(client, sessions):
    assert client.post("/webhook", json=annotation_event()).status_code == 200
    (row,) = stored(sessions)
    assert row.labels["bcc"] == 1 and row.labels["ulceration"] == 1 and row.labels["pigment_network"] == 0
    assert len(row.labels) == 8 and row.diagnosis == "BCC"
    # the same event again (a replay): no change
    assert client.post("/webhook", json=annotation_event()).status_code == 200
    assert len(stored(sessions)) == 1
    # an update replaces the values
    newer = annotation_event(
        "ANNOTATION_UPDATED", diagnosis="non-BCC", patterns=(), updated_at="2026-11-21T00:00:00Z"
    )
    client.post("/webhook", json=newer)
    (row,) = stored(sessions)
    assert row.labels["bcc"] == 0 and row.labels["ulceration"] == 0
    # an older version arriving late is ignored
    client.post("/webhook", json=annotation_event("ANNOTATION_UPDATED", updated_at="2026-11-19T00:00:00Z"))
    assert stored(sessions)[0].labels["bcc"] == 0
    # deletes are soft
    client.post(
        "/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 11}], "project": {"id": 1}}
    )
    assert stored(sessions)[0].deleted
    events, _ = counts(sessions)
    assert events == 5  # every event kept


def test_other_events_are_acknowledged_and_kept(client, sessions):
    response = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert response.status_code == 200 and response.get_json()["status"] == "ignored"
    assert counts(sessions) == (1, 0)


BAD_EVENTS = {
    "unknown-label": lambda: annotation_event(patterns=("Dragon scales",)),
    "unknown-diagnosis": lambda: annotation_event(diagnosis="Melanoma"),
    "unknown-control": lambda: {
        **annotation_event(),
        "annotation": {
            **annotation_event()["annotation"],
            "result": [{"from_name": "mood", "type": "choices", "value": {"choices": ["x"]}}],
        },
    },
    "no-annotation-id": lambda: {
        **annotation_event(),
        "annotation": {"completed_by": 3, "result": [], "task": 5},
    },
    "no-user": lambda: {
        **annotation_event(),
        "annotation": {**annotation_event()["annotation"], "completed_by": None},
    },
    "deleted-not-a-list": lambda: {"action": "ANNOTATIONS_DELETED", "annotations": 11},
}


@pytest.mark.parametrize("case", list(BAD_EVENTS))
def test_unreadable_events_are_kept_with_their_reason_and_write_nothing_else(case, client, sessions):
    response = client.post("/webhook", json=BAD_EVENTS[case]())
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "invalid_event" and body["message"]
    with sessions() as session:
        (event,) = session.scalars(select(AnnotationEvent)).all()
        assert event.error == body["message"]
    assert stored(sessions) == []


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'{"annotation": {}}'], ids=["malformed", "list", "no-action"]
)
def test_webhook_bad_bodies_are_400(raw, client, sessions):
    response = client.post("/webhook", data=raw, content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"] in ("malformed_json", "bad_request")
    assert stored(sessions) == []


def test_malformed_webhook_body_is_kept_in_the_event_log(client, sessions):
    client.post("/webhook", data=b'{"action": "ANNOTATION_CREATED", ', content_type="application/json")
    with sessions() as session:
        (event,) = session.scalars(select(AnnotationEvent)).all()
    assert event.action == "MALFORMED" and event.payload["raw"].startswith('{"action"') and event.error


def test_start_training_queues_one_job_and_coalesces(client, sessions):
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).get_json()
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).get_json()
    assert first["job"]["id"] == second["job"]["id"] and second["job"]["coalesced"]
    with sessions() as session:
        (job,) = session.scalars(select(TrainingJob)).all()
    assert job.status.value == "queued" and job.triggers == 2


def test_versions_and_metrics(client, promoted):
    listed = client.get("/versions").get_json()
    assert listed["versions"] == [promoted] and listed["model_version"] == promoted
    (model,) = listed["models"]
    assert model["version"] == promoted and model["status"] == "promoted" and model["release"] is None
    # a checkpoint that records no provenance: every output counts as untrained
    assert {o["status"] for o in model["outputs"].values()} == {"untrained"} and len(model["outputs"]) == 8
    assert listed["lesion"] is None and listed["show_outputs"] == "all"
    from tests.backend.test_serve import _count

    before = _count(client.get("/metrics").get_data(as_text=True), "/health")
    client.get("/health")
    client.get("/no/such/route")
    page = client.get("/metrics")
    assert page.content_type.startswith("text/plain")  # Prometheus's text format
    text = page.get_data(as_text=True)
    assert _count(text, "/health") == before + 1
    assert f'dermassist_model_info{{version="{promoted}"}} 1.0' in text
    assert 'route="<unmatched>",status="404"' in text and "/no/such/route" not in text


def test_internal_errors_are_json_without_traceback(client, image_server, monkeypatch):
    import backend.serving.predict as predict_module

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(predict_module, "run_batch", boom)
    _, files = image_server
    response = predict(client, [{"id": 1, "data": {"image": serve_upload(files, "a.png", png_bytes())}}])
    assert response.status_code == 500
    assert response.get_json()["error"] == "internal"
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(
        as_text=True
    )


def test_a_bad_allowed_host_fails_at_start_with_the_setting_named(settings, sessions):
    from backend.settings import SettingsError

    with pytest.raises(SettingsError, match="ALLOWED_IMAGE_HOSTS"):
        create_app(with_settings(settings, allowed_image_hosts=("http://bad/host",)), sessions=sessions)


def test_a_dermatologists_outline_and_bcc_region_are_stored_under_their_keys():
    import numpy as np

    from backend.label_studio.annotations import parse_result
    from backend.label_studio.predictions import brush_item

    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    result = [
        {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": ["BCC"]}},
        brush_item("regions", "image", "Lesion", mask),
        brush_item("regions", "image", "BCC", mask),
    ]
    from labeling_config import parse_config

    parsed = parse_result(result, parse_config(load_config("bcc_lesion")))
    assert parsed.labels["bcc"] == 1
    assert sorted(r["label"] for r in parsed.regions) == ["bcc", "lesion"]


def test_scoring_without_maps_gives_the_same_probabilities(tiny_checkpoint):
    """A retraining job scores its validation split with maps=False: same numbers, no Grad-CAM."""
    from PIL import Image as PILImage

    from backend.serving.multitask import load_served, run_batch

    served = load_served(tiny_checkpoint)
    images = [PILImage.new("RGB", (40 + 8 * k, 30), (30 * k, 90, 120)) for k in range(3)]
    with_maps, without = run_batch(served, images), run_batch(served, images, maps=False)
    for a, b in zip(with_maps, without, strict=True):
        assert a.probs == pytest.approx(b.probs, abs=1e-6)
        assert a.maps.size > 0 and b.maps.size == 0


def test_the_lesion_outline_is_computed_only_for_a_task_that_draws_a_region():
    """Segmenting costs more than the BCC model's pass: /predict asks for the outline lazily."""
    import torch

    from backend.label_studio.predictions import task_prediction
    from backend.serving.multitask import ImageOutput
    from labeling_config import TARGETS, parse_config

    config = parse_config(BCC_XML)
    calls: list[int] = []

    def outline() -> np.ndarray:
        calls.append(1)
        return np.ones((30, 40), bool)

    maps = torch.rand(len(TARGETS), 4, 4)
    validated = {"bcc": {"status": "validated"}}
    thresholds = dict.fromkeys(TARGETS, 0.5)
    non_bcc = ImageOutput(probs=dict.fromkeys(TARGETS, 0.1), maps=maps)
    task_prediction(non_bcc, config, "v", 40, 30, thresholds, provenance=validated, outline=outline)
    assert calls == []  # nothing drawn, nothing segmented
    bcc = ImageOutput(probs=dict.fromkeys(TARGETS, 0.9), maps=maps)
    found = task_prediction(bcc, config, "v", 40, 30, thresholds, provenance=validated, outline=outline)
    assert calls == [1]  # once, for the BCC region (the patterns are not validated)
    assert [i["value"]["brushlabels"] for i in found["result"] if i["type"] == "brushlabels"] == [["BCC"]]


def test_images_are_fetched_concurrently_and_predictions_keep_the_task_order(
    settings, sessions, promoted, image_server
):
    """A slow Label Studio: IMAGE_FETCH_CONCURRENCY fetches at once, bounded, while the model runs;
    each task keeps its place, a missing image among them included."""
    import time

    from backend.api.app import create_app

    _, files = image_server
    for i in range(40):
        files.routes[f"/data/upload/1/{i}.png"] = (
            200,
            {"Content-Type": "image/png"},
            png_bytes(60 + i, 40, i),
        )
    files.delay_s = 0.2
    client = create_app(with_settings(settings, image_fetch_concurrency=4), sessions=sessions).test_client()
    tasks = [{"id": i + 1, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(40)]
    tasks[17]["data"]["image"] = "/data/upload/1/missing.png"
    t0 = time.monotonic()
    results = client.post("/predict", json={"tasks": tasks, "label_config": BCC_XML}).get_json()["results"]
    elapsed = time.monotonic() - t0
    assert files.most_in_flight == 4  # bounded, and used
    assert elapsed < 40 * 0.2 / 2  # one at a time would take 8 s
    assert "error" in results[17] and "404" in results[17]["error"]
    for i, result in enumerate(results):
        if i != 17:
            brush = next(item for item in result["result"] if item["type"] == "brushlabels")
            assert brush["original_width"] == 60 + i  # each prediction is its own task's
