"""The Label Studio ML backend: Flask app speaking Label Studio 1.23's protocol (docs/label-studio.md).

Routes: ``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``GET /versions``,
``GET /metrics`` (Prometheus text, :mod:`backend.api.metrics`) and ``GET /jobs`` (recent training jobs).
Every route but ``/health`` asks for basic auth when ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` are set.
Every error is JSON ``{"error": code, "message": sentence}`` with its 4xx / 5xx status; a traceback
never reaches a client (it goes to the log, without the API key).

``/webhook`` answers within milliseconds (Label Studio waits 1 s and never retries): it stores the raw
event and what it says in one small transaction; anything slow (the retraining policy's count, a
training job) happens on other threads or processes. When the store is away past a bounded retry,
the event is spooled to disk and answered ``202`` (:mod:`backend.collection.spool`); every refused event is
kept in the raw log with its reason.

Nothing a client sends yields a 5xx: bodies are bounded in size (``MAX_BODY_BYTES``; an event in
``MAX_EVENT_BYTES``) and JSON in depth (``MAX_JSON_DEPTH``), ``NaN`` / ``Infinity`` are not JSON,
and an event's ids, texts and numbers are checked against what the store holds (``422`` naming the
field).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from backend.api import metrics
from backend.collection.ingest import KNOWN_ACTIONS, MAX_ID, TRAIN_EVENT, ingest_webhook, record_refused
from backend.collection.spool import EventSpool
from backend.images import ImageError, ImageFetcher
from backend.label_studio.predictions import MODEL_ROLES, empty_prediction, task_prediction
from backend.serving import registry
from backend.serving.lesion import LesionHolder, lesion_prediction, metadata_row, run_lesion, segment
from backend.serving.multitask import ModelHolder, ServedModel, run_batch
from backend.serving.release import Release, ReleaseError, install, lesion_pair, read_release
from backend.settings import Settings, SettingsError
from backend.training import jobs
from consensus.models import TrainingJob
from consensus.repository import items_changed_since_last_job, model_versions, recent_jobs, store_counts
from labeling_config import load_config
from labeling_config.parse import ConfigError, ProjectConfig, Role, parse_config

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
#: A Label Studio event is kilobytes (a brush annotation's RLE, a few MB at most); larger is refused.
MAX_EVENT_BYTES = 16 * 1024 * 1024
#: Label Studio's payloads nest about six deep; deeper is refused before anything walks it.
MAX_JSON_DEPTH = 64
PROMOTED_CHECK_S = 1.0
UNTRAINED = "untrained"


LESION_ROLES = (Role.HAM_DIAGNOSIS, Role.LESION)


def uses_dermnet(config: ProjectConfig) -> bool:
    """Whether the config has a control the BCC model fills."""
    return any(role in config.controls for role in MODEL_ROLES)


def uses_lesion(config: ProjectConfig) -> bool:
    """Whether the config has a control the second system fills (HAM10000 diagnosis, lesion mask)."""
    return any(role in config.controls for role in LESION_ROLES)


class ApiError(Exception):
    """An error answered as JSON ``{error, message}`` with ``status``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


@dataclass
class Backend:
    """The state of one backend process."""

    settings: Settings
    sessions: sessionmaker[Session]
    fetcher: ImageFetcher
    holder: ModelHolder = field(default_factory=ModelHolder)
    lesion: LesionHolder = field(default_factory=lambda: LesionHolder(Path("runs/models")))
    runner: Any = None  # JobRunner or RQQueue
    configs: dict[str, ProjectConfig] = field(default_factory=dict)  # by config hash
    projects: dict[int, ProjectConfig] = field(default_factory=dict)  # from /setup
    _promoted: tuple[float, str | None, str | None] = (0.0, None, None)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _policy: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "dermassist-policy"))
    _policy_pending: threading.Event = field(default_factory=threading.Event)
    write_lock: Any = None  # SQLite: one writer thread at a time in this process
    spool: EventSpool | None = None  # events waiting for the store
    release: Release | None = None  # the released models (backend/serving/release.py)

    # -- configs
    def parse(self, xml: str) -> ProjectConfig:
        """The project's config mapped onto the model's vocabulary (cached by content)."""
        key = hashlib.sha256(xml.encode()).hexdigest()
        config = self.configs.get(key)
        if config is None:
            try:
                config = parse_config(xml)
            except ConfigError as exc:
                raise ApiError(422, "labeling_config", str(exc)) from None
            with self._lock:
                self.configs[key] = config
        return config

    def servable(self, config: ProjectConfig) -> ProjectConfig:
        """``config`` if this backend can fill some of its controls, else a 422 that says what to add."""
        if uses_dermnet(config):
            return config
        if uses_lesion(config):
            if self.lesion.available():
                return config
            raise ApiError(
                422,
                "labeling_config",
                "this config asks for the HAM10000 diagnosis and the lesion mask (the second system), and no "
                "such model is promoted here: `dermassist models promote-lesion SEGNET DUAL` (see "
                "dermassist train-seg / train-dual)",
            )
        found = ", ".join(f"{c.name} ({c.role.value})" for c in config.controls.values())
        raise ApiError(
            422,
            "labeling_config",
            f"this model fills a BCC / non-BCC diagnosis, the seven patterns and their regions; the "
            f"config's controls map only onto {found}. Add a diagnosis, patterns or regions control "
            "(see labeling_config/bcc.xml).",
        )

    def resolve(self, project: int | None, project_obj: Mapping[str, Any] | None) -> ProjectConfig:
        """The config of a webhook's project: the event's own, else /setup's, else bcc.xml."""
        xml = project_obj.get("label_config") if project_obj is not None else None
        if isinstance(xml, str) and xml.strip():
            try:
                return self.parse(xml)
            except ApiError as exc:
                from backend.collection.ingest import EventError

                raise EventError(exc.message) from None
        if project is not None and project in self.projects:
            return self.projects[project]
        return self.parse(load_config("bcc"))

    # -- model
    def served(self) -> ServedModel | None:
        checked, version, path = self._promoted
        now = time.monotonic()
        if now - checked > PROMOTED_CHECK_S:
            with self.sessions() as session:
                current = registry.promoted(session)
                version, path = (current.version, current.path) if current is not None else (None, None)
            self._promoted = (now, version, path)
        if version is None or path is None:
            return None
        return self.holder.ensure(version, path)

    def version(self, config: ProjectConfig | None = None) -> str:
        """The model version that fills ``config`` (DermNet's, the lesion pair's, or both joined by +)."""
        parts = []
        if config is None or uses_dermnet(config):
            served = self.served()
            parts.append(served.version if served is not None else UNTRAINED)
        if config is not None and uses_lesion(config):
            system = self.lesion.get()
            parts.append(system.version if system is not None else UNTRAINED)
        return "+".join(parts)

    # -- training
    def queue_training(self, trigger: str, params: dict[str, Any] | None = None) -> tuple[TrainingJob, bool]:
        job, created = jobs.request_training(self.sessions, trigger, params)
        if created and self.runner is not None:
            if isinstance(self.runner, jobs.JobRunner):
                self.runner.submit()
            else:
                self.runner.submit(job.id)
        return job, created

    def check_policy(self) -> None:
        """Queue a job once N items gained annotations since the last job (off when N is 0)."""
        n = self.settings.start_training_each_n_updates
        if n <= 0 or self._policy_pending.is_set():
            return
        self._policy_pending.set()
        self._policy.submit(self._check_policy, n)

    def _check_policy(self, n: int) -> None:
        try:
            with self.sessions() as session:
                changed = items_changed_since_last_job(session)
            if jobs.should_retrain(changed, n):
                self.queue_training("updates", {"items": changed})
        except Exception:
            logger.exception("the retraining policy check failed")
        finally:
            self._policy_pending.clear()

    # -- events
    def apply_spooled(self, payload: Any, received_at: Any) -> bool:
        """Apply one spooled event (:mod:`backend.collection.spool`); False while the store is still away."""
        try:
            outcome, _ = ingest_webhook(
                self.sessions, payload, self.resolve, self.write_lock, received_at=received_at, budget_s=0
            )
        except SQLAlchemyError as exc:
            logger.info("the store is still away (%s); spooled events wait", type(exc).__name__)
            return False
        if outcome.train:
            self.queue_training(TRAIN_EVENT)
        return True


def backend() -> Backend:
    state: Backend = current_app.extensions["dermassist"]
    return state


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(raw: bytes, constants: bool = False) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 that says what is wrong with it.

    Args:
        raw: the body.
        constants: read ``NaN`` / ``Infinity`` (not JSON) as floats, for a later check to name the
            field that holds one (an event is refused with 422 and kept); else they are a 400.
    """
    if not raw:
        raise ApiError(400, "bad_request", "the request has no body; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=None if constants else _refuse_constant)
    except RecursionError:
        raise ApiError(400, "malformed_json", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", f"the body must be a JSON object, got {type(body).__name__}")
    if _depth_exceeds(body, MAX_JSON_DEPTH):
        raise ApiError(400, "malformed_json", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _json_body() -> dict[str, Any]:
    return parse_json(request.get_data(cache=True))


def _project_id(raw: Any) -> int | None:
    """Label Studio sends ``project`` as ``"<id>.<created timestamp>"`` to /setup and /predict."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        head = raw.split(".", 1)[0]
        if head.isascii() and head.isdigit() and len(head) <= 19 and 0 < int(head) <= MAX_ID:
            return int(head)
    return None


def _check_auth(settings: Settings) -> None:
    if settings.basic_auth_user is None or request.path == "/health":
        return
    auth = request.authorization
    ok = (
        auth is not None
        and auth.type == "basic"
        and hmac.compare_digest(str(auth.username or "").encode(), settings.basic_auth_user.encode())
        and hmac.compare_digest(str(auth.password or "").encode(), str(settings.basic_auth_pass).encode())
    )
    if not ok:
        raise ApiError(
            401,
            "unauthorized",
            "this backend needs basic auth: set the user and password in Label Studio's model settings",
        )


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
    """
    from consensus.db import init_db

    if sessions is None:
        _, sessions = init_db(settings.database_url)
    app = Flask("dermassist")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    try:
        fetcher = ImageFetcher(settings)
    except ImageError as exc:  # a bad ALLOWED_IMAGE_HOSTS or LABEL_STUDIO_URL: say so at start
        raise SettingsError(str(exc)) from None
    try:
        release = read_release(settings.release_dir)
    except ReleaseError as exc:  # an altered or damaged release: refuse to start, say which file
        raise SettingsError(str(exc)) from None
    state = Backend(
        settings=settings,
        sessions=sessions,
        fetcher=fetcher,
        lesion=LesionHolder(settings.model_dir, lesion_pair(release)),
        release=release,
    )
    if release is not None:
        install(sessions, settings.model_dir, release)
    bind = sessions.kw.get("bind")
    if bind is not None and bind.dialect.name == "sqlite":
        state.write_lock = threading.Lock()
    state.parse(load_config("bcc"))  # the fallback config, parsed before the first webhook's 1 s
    state.spool = EventSpool(settings.model_dir / "event-spool")
    if start_runner:
        state.spool.start(state.apply_spooled)
    if settings.redis_url:
        state.runner = jobs.RQQueue(settings.redis_url)
    elif start_runner:
        state.runner = jobs.JobRunner(settings, sessions).start()
    if start_runner and settings.sync_interval > 0 and settings.sync_projects:
        from backend.label_studio.sync import PeriodicSync

        PeriodicSync(settings, sessions).start()
    app.extensions["dermassist"] = state

    @app.before_request
    def _before() -> None:
        request.environ["dermassist.t0"] = time.perf_counter()
        _check_auth(settings)

    @app.after_request
    def _after(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else metrics.UNMATCHED
        t0 = request.environ.get("dermassist.t0")
        if t0 is not None:
            metrics.LATENCY.labels(route).observe(time.perf_counter() - t0)
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        return response

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int, dict[str, str]]:
        headers = {"WWW-Authenticate": 'Basic realm="dermassist"'} if exc.status == 401 else {}
        return jsonify(error=exc.error, message=exc.message), exc.status, headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        messages = {
            404: f"no route {request.path}; this backend serves /health, /setup, /predict, /webhook, "
            "/versions, /metrics",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB",
        }
        name = (exc.name or "error").lower().replace(" ", "_")
        if code == 413 and request.path == "/webhook":
            _keep_refused({"bytes": request.content_length}, messages[413])
        return jsonify(error=name, message=messages.get(code, exc.description or name)), code

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error="internal", message="the backend hit an internal error; its log says more"), 500

    @app.get("/health")
    def health() -> Response:
        served = state.served()
        dermnet = state.release.models.get("dermnet") if state.release is not None else None
        is_release = dermnet is not None and served is not None and dermnet.version == served.version
        released = state.release.label("dermnet") if is_release and state.release is not None else None
        return jsonify(status="UP", model_class="DermNet", model_version=state.version(), release=released)

    @app.post("/setup")
    def setup() -> Response:
        body = _json_body()
        schema = body.get("schema")
        if not isinstance(schema, str) or not schema.strip():
            raise ApiError(400, "bad_request", "/setup needs the project's labeling config in 'schema'")
        config = state.servable(state.parse(schema))
        project = _project_id(body.get("project"))
        if project is not None:
            with state._lock:
                state.projects[project] = config
        return jsonify(model_version=state.version(config))

    @app.post("/predict")
    def predict() -> Response:
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise ApiError(400, "bad_request", "/predict needs a 'tasks' list")
        if len(tasks) > settings.max_tasks:
            raise ApiError(
                413,
                "too_many_tasks",
                f"{len(tasks)} tasks in one request; this backend takes at most {settings.max_tasks} "
                "(MAX_TASKS_PER_REQUEST): send them in batches",
            )
        xml = body.get("label_config")
        project = _project_id(body.get("project"))
        if isinstance(xml, str) and xml.strip():
            config = state.parse(xml)
        elif project is not None and project in state.projects:
            config = state.projects[project]
        else:
            raise ApiError(
                400, "bad_request", "/predict needs the project's 'label_config' (or a /setup first)"
            )
        config = state.servable(config)
        served = state.served() if uses_dermnet(config) else None
        if uses_dermnet(config) and served is None:
            raise ApiError(
                503,
                "no_model",
                "no model is promoted yet: register one with `dermassist models promote CHECKPOINT` "
                "or train one",
            )
        system = state.lesion.get() if uses_lesion(config) else None
        version = state.version(config)
        show_all = settings.show_outputs == "all"
        predictions: list[dict[str, Any] | None] = [None] * len(tasks)
        good: list[tuple[int, Any]] = []
        for i, task in enumerate(tasks):
            data = task.get("data") if isinstance(task, dict) else None
            ref = data.get(config.image_key) if isinstance(data, dict) else None
            if not isinstance(ref, str):
                reason = f"task has no '{config.image_key}' in its data"
            else:
                try:
                    good.append((i, state.fetcher.fetch(ref)))
                    continue
                except ImageError as exc:
                    reason = str(exc)
            task_id = task.get("id") if isinstance(task, dict) else None
            logger.warning("task %s: no prediction: %s", task_id, reason)
            metrics.PREDICT_TASKS.labels("no image").inc()
            predictions[i] = empty_prediction(version, reason)
        if good:
            images = [loaded.image for _, loaded in good]
            outputs = run_batch(served, images) if served is not None else [None] * len(good)
            lesions = (
                run_lesion(system, images, [metadata_row(tasks[i].get("data"), config) for i, _ in good])
                if system is not None
                else [None] * len(good)
            )
            # Regions are drawn inside the lesion: the U-Net's mask, where a lesion model is served
            # (the one run_lesion made, else segmented only for a task that draws a region).
            outliner = system or (
                state.lesion.get() if served is not None and config.regions is not None else None
            )

            def outline_of(found: Any, image: Any) -> Callable[[], Any] | None:
                if found is not None:
                    return lambda: found.mask
                if outliner is not None:
                    return lambda: segment(outliner, image)[0]
                return None

            outlines = [outline_of(o, image) for o, image in zip(lesions, images, strict=True)]
            for (i, loaded), output, lesion_output, outline in zip(
                good, outputs, lesions, outlines, strict=True
            ):
                prediction: dict[str, Any] = {"result": [], "score": None, "model_version": version}
                if served is not None and output is not None:
                    prediction = task_prediction(
                        output,
                        config,
                        version,
                        loaded.width,
                        loaded.height,
                        served.meta.thresholds,
                        settings.model_score_threshold,
                        provenance=None if show_all else served.meta.provenance,
                        outline=outline,
                    )
                if system is not None and lesion_output is not None:
                    items, score = lesion_prediction(
                        lesion_output, config, version, None if show_all else system.provenance
                    )
                    prediction["result"].extend(items)
                    if prediction["score"] is None:
                        prediction["score"] = score
                predictions[i] = prediction
        metrics.PREDICT_TASKS.labels("predicted").inc(
            len(tasks) - sum(p is None or "error" in p for p in predictions)
        )
        return jsonify(results=predictions, model_version=version)

    def _keep_refused(payload: Any, reason: str) -> int | None:
        """Keep a refused event in the raw log; None when even that fails (the log says why)."""
        try:
            return record_refused(state.sessions, payload, reason).event_id
        except SQLAlchemyError:
            logger.exception("a refused event could not be kept (%s)", reason)
            return None

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        raw = request.get_data(cache=True)
        if len(raw) > MAX_EVENT_BYTES:
            too_large = (
                f"the event is {len(raw):,} bytes; Label Studio's events are far smaller "
                f"(at most {MAX_EVENT_BYTES // (1024 * 1024)} MiB is taken)"
            )
            head = raw[:4096].decode("utf-8", errors="replace")
            _keep_refused({"raw": head, "bytes": len(raw)}, too_large)
            raise ApiError(413, "event_too_large", too_large)
        try:
            body = parse_json(raw, constants=True)
        except ApiError as exc:  # keep what arrived, even when it is not JSON
            _keep_refused({"raw": raw[:1_000_000].decode("utf-8", errors="replace")}, exc.message)
            raise
        if not isinstance(body.get("action"), str):
            missing = "a webhook event needs an 'action' (text)"
            _keep_refused(body, missing)
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
            job, created = state.queue_training(TRAIN_EVENT)
            answer["job"] = {"id": job.id, "status": job.status.value, "coalesced": not created}
        elif outcome.created or outcome.changed:
            state.check_policy()
        return jsonify(answer), 200

    @app.get("/versions")
    def versions() -> Response:
        with state.sessions() as session:
            rows = model_versions(session)
            listed = [v.version for v in rows]
            models = [
                {
                    "version": v.version,
                    "status": v.status.value,
                    "release": v.release,
                    "created_at": v.created_at.isoformat(),
                    "outputs": registry.provenance(v),
                }
                for v in rows
            ]
        system = state.lesion.get()
        lesion = (
            {"version": system.version, "released": system.released, "outputs": system.provenance}
            if system is not None
            else None
        )
        return jsonify(
            versions=listed,
            model_version=state.version(),
            show_outputs=settings.show_outputs,
            models=models,
            lesion=lesion,
        )

    @app.get("/jobs")
    def list_jobs() -> Response:
        with state.sessions() as session:
            rows = recent_jobs(session)
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
                for j in rows
            ]
        return jsonify(jobs=listed)

    @app.get("/metrics")
    def metrics_route() -> Response:
        def store() -> dict[str, float]:
            with state.sessions() as session:
                return {k: float(v) for k, v in store_counts(session).items()}

        body = metrics.exposition(settings.metrics_dir, store, state.version())
        return Response(
            body, mimetype=metrics.CONTENT_TYPE_LATEST.split(";")[0], content_type=metrics.CONTENT_TYPE_LATEST
        )

    return app
