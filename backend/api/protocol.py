"""The ML-backend protocol Label Studio speaks (docs/label-studio.md): ``/health``, ``/setup``,
``/predict``, ``/webhook``, ``/versions``.

Each route checks what the request must be and calls a service: :func:`backend.serving.predict.predict_tasks`,
:func:`backend.collection.ingest.ingest_webhook`, the registry's repository.

``/webhook`` answers within milliseconds (Label Studio waits 1 s and never retries): it stores the raw
event and what it says in one small transaction; anything slow (the retraining policy's count, a
training job) happens on other threads or processes. When the store is away past a bounded retry, the
event is spooled to disk and answered ``202`` (:mod:`backend.collection.spool`); every refused event is
kept in the raw log with its reason. An event's ids, texts and numbers are checked against what the
store holds (``422`` naming the field).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from backend import metrics
from backend.api.requests import MAX_EVENT_BYTES, ApiError, json_body, parse_json, project_id
from backend.api.state import backend
from backend.collection.ingest import KNOWN_ACTIONS, TRAIN_EVENT, ingest_webhook, record_refused
from backend.serving import registry
from backend.serving.predict import predict_tasks
from backend.serving.registry import LESION, MULTITASK
from consensus.repository import model_versions

logger = logging.getLogger(__name__)

protocol = Blueprint("protocol", __name__)


@protocol.get("/health")
def health() -> Response:
    state = backend()
    served = state.serving.promoted(MULTITASK)  # the registry's word: /health loads nothing
    dermnet = state.release.models.get("dermnet") if state.release is not None else None
    is_release = dermnet is not None and served is not None and dermnet.version == served[0]
    released = state.release.label("dermnet") if is_release and state.release is not None else None
    return jsonify(
        status="UP", model_class="DermNet", model_version=state.serving.version(), release=released
    )


@protocol.post("/setup")
def setup() -> Response:
    state = backend()
    body = json_body()
    schema = body.get("schema")
    if not isinstance(schema, str) or not schema.strip():
        raise ApiError(400, "bad_request", "/setup needs the project's labeling config in 'schema'")
    config = state.servable(state.parse(schema))
    project = project_id(body.get("project"))
    if project is not None:
        state.remember(project, config)
    return jsonify(model_version=state.serving.version(config))


@protocol.post("/predict")
def predict() -> Response:
    state = backend()
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise ApiError(400, "bad_request", "/predict needs a 'tasks' list")
    if len(tasks) > state.settings.max_tasks:
        raise ApiError(
            413,
            "too_many_tasks",
            f"{len(tasks)} tasks in one request; this backend takes at most {state.settings.max_tasks} "
            "(MAX_TASKS_PER_REQUEST): send them in batches",
        )
    xml = body.get("label_config")
    project = project_id(body.get("project"))
    if isinstance(xml, str) and xml.strip():
        config = state.parse(xml)
    elif project is not None and project in state.projects:
        config = state.projects[project]
    else:
        raise ApiError(400, "bad_request", "/predict needs the project's 'label_config' (or a /setup first)")
    config = state.servable(config)
    served = state.serving.for_config(config)
    if served.multitask is None and MULTITASK in served.systems:
        raise ApiError(
            503,
            "no_model",
            "no model is promoted yet: register one with `dermassist models promote CHECKPOINT` or train one",
        )
    predictions = predict_tasks(
        tasks,
        config,
        served,
        state.fetcher,
        state.settings.model_score_threshold,
        show_all=state.settings.show_outputs == "all",
        concurrency=state.settings.image_fetch_concurrency,
        acquisition=state.settings.acquisition,
    )
    return jsonify(results=predictions, model_version=served.version)


def keep_refused(payload: Any, reason: str) -> int | None:
    """Keep a refused event in the raw log; None when even that fails (the log says why)."""
    try:
        return record_refused(backend().sessions, payload, reason).event_id
    except SQLAlchemyError:
        logger.exception("a refused event could not be kept (%s)", reason)
        return None


@protocol.post("/webhook")
def webhook() -> tuple[Response, int]:
    state = backend()
    raw = request.get_data(cache=True)
    if len(raw) > MAX_EVENT_BYTES:
        too_large = (
            f"the event is {len(raw):,} bytes; Label Studio's events are far smaller "
            f"(at most {MAX_EVENT_BYTES // (1024 * 1024)} MiB is taken)"
        )
        head = raw[:4096].decode("utf-8", errors="replace")
        keep_refused({"raw": head, "bytes": len(raw)}, too_large)
        raise ApiError(413, "event_too_large", too_large)
    try:
        body = parse_json(raw, constants=True)
    except ApiError as exc:  # keep what arrived, even when it is not JSON
        keep_refused({"raw": raw[:1_000_000].decode("utf-8", errors="replace")}, exc.message)
        raise
    if not isinstance(body.get("action"), str):
        missing = "a webhook event needs an 'action' (text)"
        keep_refused(body, missing)
        raise ApiError(400, "bad_request", missing)
    try:
        outcome, reason = ingest_webhook(
            state.sessions, body, state.resolve, state.write_lock, spool=state.spool
        )
    except (SQLAlchemyError, OSError):
        logger.exception("an event could be neither stored nor spooled")
        raise ApiError(
            503, "store_unavailable", "the store and the event spool are both unavailable; try again"
        ) from None
    metrics.WEBHOOK_EVENTS.labels(outcome.action if outcome.action in KNOWN_ACTIONS else "other").inc()
    if reason is not None:
        return jsonify(error="invalid_event", message=reason, event_id=outcome.event_id), 422
    if outcome.queued:
        return jsonify(status="queued", action=outcome.action), 202
    answer: dict[str, Any] = {"status": "ignored" if outcome.ignored else "ok", **outcome.as_dict()}
    if outcome.train:
        job, created = state.retraining.queue(TRAIN_EVENT)
        answer["job"] = {"id": job.id, "status": job.status.value, "coalesced": not created}
    elif outcome.created or outcome.changed:
        state.retraining.annotations_changed()
    return jsonify(answer), 200


@protocol.get("/versions")
def versions() -> Response:
    state = backend()
    with state.sessions() as session:
        rows = model_versions(session)
        models = [
            {
                "version": v.version,
                "system": v.system,
                "status": v.status.value,
                "release": v.release,
                "created_at": v.created_at.isoformat(),
                "outputs": registry.provenance(v),
            }
            for v in rows
        ]
    served = {m["system"]: m for m in models if m["status"] == "promoted"}
    pair = served.get(LESION)
    lesion = (
        {"version": pair["version"], "released": pair["release"] is not None, "outputs": pair["outputs"]}
        if pair is not None
        else None
    )
    return jsonify(
        versions=[m["version"] for m in models if m["system"] == MULTITASK],
        model_version=state.serving.version(),
        show_outputs=state.settings.show_outputs,
        models=models,
        lesion=lesion,
    )
