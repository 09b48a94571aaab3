"""Operations routes: ``GET /jobs`` (recent training and pre-annotation jobs), ``GET /metrics``
(Prometheus text) and ``POST /projects/<id>/predict`` (pre-annotate a whole project in the background)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request

from backend import metrics
from backend.api.requests import ApiError, parse_json
from backend.api.state import backend
from backend.collection.ingest import MAX_ID
from backend.label_studio.project_predictions import MAX_BATCH
from backend.training import preannotation
from consensus.models import PreannotationJob, PreannotationMode
from consensus.repository import recent_jobs, recent_preannotations, store_counts

logger = logging.getLogger(__name__)

operations = Blueprint("operations", __name__)


def _iso(moment: datetime | None) -> str | None:
    """A time as ISO 8601 in UTC (SQLite gives back naive UTC)."""
    if moment is None:
        return None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).isoformat()


def _preannotation_dict(job: PreannotationJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": "preannotation",
        "project": job.project,
        "mode": job.mode.value,
        "status": job.status.value,
        "trigger": job.trigger,
        "version": job.version,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "resumed_from": job.resumed_from,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": job.error,
    }


@operations.get("/jobs")
def list_jobs() -> Response:
    with backend().sessions() as session:
        listed = [
            {
                "id": j.id,
                "trigger": j.trigger,
                "status": j.status.value,
                "triggers": j.triggers,
                "version": j.version,
                "promoted": j.promoted,
                "error": j.error,
                "log": (j.log or "").splitlines()[-4:],  # the last lines: why it was (not) promoted
            }
            for j in recent_jobs(session)
        ]
        preannotations = [_preannotation_dict(j) for j in recent_preannotations(session)]
    return jsonify(jobs=listed, preannotation=preannotations)


@operations.post("/projects/<int:project>/predict")
def predict_project(project: int) -> tuple[Response, int]:
    """Start pre-annotating a whole project in the background (or answer with the job already running)."""
    state = backend()
    if not 0 < project <= MAX_ID:
        raise ApiError(
            422, "invalid_project", f"a Label Studio project id is a positive integer, got {project}"
        )
    raw = request.get_data(cache=True)
    body = parse_json(raw) if raw.strip() else {}
    mode_name = body.get("mode", request.args.get("mode", PreannotationMode.MISSING.value))
    modes = [m.value for m in PreannotationMode]
    if mode_name not in modes:
        raise ApiError(422, "invalid_mode", f"'mode' must be one of {', '.join(modes)}, got {mode_name!r}")
    batch_size = body.get("batch_size", request.args.get("batch_size", 32))
    if isinstance(batch_size, str) and batch_size.isascii() and batch_size.isdigit() and len(batch_size) < 6:
        batch_size = int(batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise ApiError(422, "invalid_batch_size", f"'batch_size' must be an integer from 1 to {MAX_BATCH}")
    if not state.settings.label_studio_url or not state.settings.label_studio_api_key:
        raise ApiError(
            409,
            "label_studio_not_configured",
            "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the backend: the project's tasks are read "
            "from Label Studio and the predictions posted there",
        )
    try:
        job, created = preannotation.request_preannotation(
            state.sessions, project, PreannotationMode(mode_name), "api", batch_size
        )
    except preannotation.PreannotationError as exc:  # other processes kept changing it: try again
        raise ApiError(409, "busy", str(exc)) from None
    if created:
        try:
            preannotation.launch(state.settings, state.sessions, job.id)
        except OSError as exc:
            logger.exception("could not start the pre-annotation process of job %d", job.id)
            preannotation.fail(state.sessions, job.id, f"could not start its process: {exc}")
            raise ApiError(503, "not_started", "the pre-annotation process could not be started") from None
    return jsonify(job=_preannotation_dict(job), created=created), 202 if created else 200


@operations.get("/metrics")
def metrics_route() -> Response:
    state = backend()

    def store() -> dict[str, float]:
        with state.sessions() as session:
            return {k: float(v) for k, v in store_counts(session).items()}

    body = metrics.exposition(state.settings.metrics_dir, store, state.serving.version())
    return Response(
        body, mimetype=metrics.CONTENT_TYPE_LATEST.split(";")[0], content_type=metrics.CONTENT_TYPE_LATEST
    )
