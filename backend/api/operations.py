"""Operations routes: ``GET /jobs`` (recent training jobs) and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from backend import metrics
from backend.api.state import backend
from consensus.repository import recent_jobs, store_counts

operations = Blueprint("operations", __name__)


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
    return jsonify(jobs=listed)


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
