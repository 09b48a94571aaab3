"""The Label Studio ML backend: a Flask app speaking Label Studio 1.23's protocol (docs/label-studio.md).

Two blueprints: the protocol (:mod:`backend.api.protocol`: ``GET /health``, ``POST /setup``,
``POST /predict``, ``POST /webhook``, ``GET /versions``) and operations (:mod:`backend.api.operations`:
``GET /jobs``, ``GET /metrics``, ``POST /projects/<id>/predict``). Every route but ``/health`` asks for
basic auth when ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` are set. Every error is JSON
``{"error": code, "message": sentence}`` with its 4xx / 5xx status; a traceback never reaches a client
(it goes to the log, without the API key). Nothing a client sends yields a 5xx (:mod:`backend.api.requests`).
"""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, jsonify, request
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from backend import metrics
from backend.api.operations import operations
from backend.api.protocol import keep_refused, protocol
from backend.api.requests import MAX_BODY_BYTES, MAX_EVENT_BYTES, MAX_JSON_DEPTH, ApiError, check_auth
from backend.api.state import Backend
from backend.collection.spool import EventSpool
from backend.images import ImageError, ImageFetcher
from backend.serving.holder import Holder, Serving
from backend.serving.release import ReleaseError, install_configured
from backend.settings import Settings, SettingsError
from backend.training import jobs
from backend.training.policy import Retraining
from consensus.db import write_lock
from labeling_config import load_config

__all__ = ["MAX_BODY_BYTES", "MAX_EVENT_BYTES", "MAX_JSON_DEPTH", "ApiError", "create_app"]

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session] | None = None,
    start_runner: bool = False,
) -> Flask:
    """The backend's Flask app.

    Args:
        settings: read once (``Settings.from_env()``), never again.
        sessions: the store's session factory (default: ``init_db(settings.database_url)``).
        start_runner: run training jobs from this process (``serve`` does; tests choose).

    Raises:
        SettingsError: a setting, or the release folder, is unusable (the message says which).
    """
    from consensus.db import init_db

    if sessions is None:
        _, sessions = init_db(settings.database_url)
    try:
        fetcher = ImageFetcher(settings)
    except ImageError as exc:  # a bad ALLOWED_IMAGE_HOSTS or LABEL_STUDIO_URL: say so at start
        raise SettingsError(str(exc)) from None
    try:
        release = install_configured(sessions, settings)
    except ReleaseError as exc:  # an altered or damaged release: refuse to start, say which file
        raise SettingsError(str(exc)) from None
    runner: jobs.Runner | None = None
    if settings.redis_url:
        runner = jobs.RQQueue(settings.redis_url)
    elif start_runner:
        runner = jobs.JobRunner(settings, sessions).start()
    state = Backend(
        settings=settings,
        sessions=sessions,
        fetcher=fetcher,
        serving=Serving(sessions, Holder(engine=settings.serving_engine, threads=settings.threads)),
        retraining=Retraining(sessions, settings.start_training_each_n_updates, runner),
        release=release,
    )
    bind = sessions.kw.get("bind")
    if bind is not None:
        state.write_lock = write_lock(bind)
    state.parse(load_config("bcc"))  # the fallback config, parsed before the first webhook's 1 s
    state.spool = EventSpool(settings.model_dir / "event-spool")
    if start_runner:
        state.spool.start(state.apply_spooled)
    if start_runner and settings.sync_interval > 0 and settings.sync_projects:
        from backend.collection.sync import PeriodicSync

        PeriodicSync(settings, sessions).start()

    app = Flask("dermassist")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["dermassist"] = state
    app.register_blueprint(protocol)
    app.register_blueprint(operations)
    _observe(app, settings)
    _answer_errors_as_json(app)
    return app


def _observe(app: Flask, settings: Settings) -> None:
    """Auth before every request; its latency and status counted after (:mod:`backend.metrics`)."""

    @app.before_request
    def _before() -> None:
        request.environ["dermassist.t0"] = time.perf_counter()
        check_auth(settings)

    @app.after_request
    def _after(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else metrics.UNMATCHED
        t0 = request.environ.get("dermassist.t0")
        if t0 is not None:
            metrics.LATENCY.labels(route).observe(time.perf_counter() - t0)
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        return response


def _answer_errors_as_json(app: Flask) -> None:
    """Every error as ``{error, message}``; an unexpected one logged with its traceback, answered 500."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int, dict[str, str]]:
        headers = {"WWW-Authenticate": 'Basic realm="dermassist"'} if exc.status == 401 else {}
        return jsonify(error=exc.error, message=exc.message), exc.status, headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        messages = {
            404: f"no route {request.path}; this backend serves /health, /setup, /predict, /webhook, "
            "/versions, /jobs, /metrics, /projects/<id>/predict",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB",
        }
        name = (exc.name or "error").lower().replace(" ", "_")
        if code == 413 and request.path == "/webhook":
            keep_refused({"bytes": request.content_length}, messages[413])
        return jsonify(error=name, message=messages.get(code, exc.description or name)), code

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error="internal", message="the backend hit an internal error; its log says more"), 500
