"""Settings, read once from the environment into a frozen object (names as Label Studio's backends use).

``Settings.from_env()`` is called by ``serve`` and the CLI; tests build ``Settings(...)`` directly.
Secrets (the API key, the basic-auth password) never appear in ``repr`` or logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from consensus.db import DEFAULT_URL
from labeling_config.schema import ACQUISITION_STRATEGIES

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SHOW_OUTPUTS = ("validated", "all")
SERVING_ENGINES = ("onnxruntime", "torch")
# The released models of this checkout (backend/serving/release.py); the Docker image sets RELEASE_DIR.
DEFAULT_RELEASE_DIR = Path(__file__).resolve().parents[1] / "models"


class SettingsError(ValueError):
    """An environment variable with a value the backend cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _ids(env: Mapping[str, str], name: str) -> tuple[int, ...]:
    raw = [p.strip() for p in env.get(name, "").split(",") if p.strip()]
    if not all(p.isdigit() for p in raw):
        raise SettingsError(f"{name} must be comma-separated project ids, got {env.get(name)!r}")
    return tuple(int(p) for p in raw)


def _path(raw: str | None) -> Path | None:
    return Path(raw) if raw else None


def _release_dir(raw: str | None) -> Path | None:
    if raw is not None and raw.lower() in ("none", "off", "0", "false"):
        return None
    if raw is None:
        return DEFAULT_RELEASE_DIR
    return Path(raw)


@dataclass(frozen=True)
class Settings:
    """Everything the backend reads from its environment.

    Attributes:
        label_studio_url: ``LABEL_STUDIO_URL``, where images and the export API live (inside Docker,
            the Label Studio service's name, never localhost).
        label_studio_api_key: ``LABEL_STUDIO_API_KEY``, a legacy token or a personal access token.
        model_dir: ``MODEL_DIR``, checkpoints and the promoted model.
        database_url: ``DATABASE_URL`` (default: a SQLite file).
        basic_auth_user: ``BASIC_AUTH_USER``; with ``BASIC_AUTH_PASS`` protects every route but /health.
        basic_auth_pass: ``BASIC_AUTH_PASS``.
        redis_url: ``REDIS_URL``; when set, training jobs go to RQ workers.
        log_level: ``LOG_LEVEL``.
        workers: ``WORKERS``, ``serve`` worker processes (waitress in each; keep 1 with SQLite).
        threads: ``THREADS``, PyTorch threads per process (one is fastest on a busy small machine).
        start_training_each_n_updates: ``START_TRAINING_EACH_N_UPDATES`` (0: only on request).
        model_score_threshold: ``MODEL_SCORE_THRESHOLD``, overrides the checkpoint's thresholds if set.
        allowed_image_hosts: ``ALLOWED_IMAGE_HOSTS``, comma-separated hosts that plain http(s)
            images may come from.
        max_image_bytes: ``MAX_IMAGE_BYTES``, largest image file accepted.
        max_image_pixels: ``MAX_IMAGE_PIXELS``, largest image accepted (decompression bombs).
        image_timeout: ``IMAGE_TIMEOUT``, seconds to fetch one image.
        image_fetch_concurrency: ``IMAGE_FETCH_CONCURRENCY``, images one ``/predict`` fetches at once
            (while the models run on the ones already fetched).
        http_timeout: ``HTTP_TIMEOUT``, seconds a client connection may stay silent (a request's
            headers or body stalled, or an idle keep-alive) before ``serve`` closes it.
        max_tasks: ``MAX_TASKS_PER_REQUEST``, most tasks one /predict may carry.
        train_epochs: ``TRAIN_EPOCHS``, epochs of a retraining job.
        sync_projects: ``SYNC_PROJECTS``, comma-separated Label Studio project ids that ``serve``
            reconciles periodically.
        sync_interval: ``SYNC_INTERVAL``, seconds between those syncs (0: off).
        release_dir: ``RELEASE_DIR``, the released models (default: ``models/`` of this checkout;
            ``none``: no release).
        show_outputs: ``SHOW_OUTPUTS``: ``validated`` (default) pre-annotates only outputs validated
            on real images; ``all`` shows every output (a synthetic study, a model under test).
        serving_engine: ``SERVING_ENGINE``: ``onnxruntime`` (default: a model's ONNX graph, written beside
            its checkpoint when it is registered, run by ONNX Runtime with ``THREADS`` threads; PyTorch
            where there is none) or ``torch`` (always PyTorch).
        acquisition: ``ACQUISITION``, what the task score means (which images sort first):
            ``least_confidence`` (default: the confidence of the diagnosis), ``entropy``, ``bald`` or
            ``tta`` (:mod:`model.common.acquisition`); a project's ``<Image acquisition="...">``
            overrides it.
        metrics_dir: ``PROMETHEUS_MULTIPROC_DIR``, where the workers' counters meet (``serve`` sets it for
            its workers when ``WORKERS`` > 1; see ``backend.metrics``).
        cache_dir: ``DERMASSIST_CACHE`` (default ``~/.cache/dermassist``; the Makefile's too): the
            released lesion pair's exported graphs (``graphs/``), and Label Studio's venv and its
            migrated template for the demo and the end-to-end tests.
    """

    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    model_dir: Path = Path("runs/models")
    database_url: str = DEFAULT_URL
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    redis_url: str | None = None
    log_level: str = "INFO"
    workers: int = 1
    threads: int = 1
    start_training_each_n_updates: int = 0
    model_score_threshold: float | None = None
    allowed_image_hosts: tuple[str, ...] = ()
    max_image_bytes: int = 30 * 1024 * 1024
    max_image_pixels: int = 60_000_000
    image_timeout: float = 20.0
    image_fetch_concurrency: int = 8
    http_timeout: int = 30
    max_tasks: int = 1000
    train_epochs: int = 5
    sync_projects: tuple[int, ...] = ()
    sync_interval: float = 0.0
    release_dir: Path | None = DEFAULT_RELEASE_DIR
    show_outputs: str = "validated"
    serving_engine: str = "onnxruntime"
    acquisition: str = "least_confidence"
    metrics_dir: Path | None = None
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "dermassist")

    def __post_init__(self) -> None:
        if self.show_outputs not in SHOW_OUTPUTS:
            raise SettingsError(
                f"SHOW_OUTPUTS must be one of {', '.join(SHOW_OUTPUTS)}, got {self.show_outputs!r}"
            )
        if self.serving_engine not in SERVING_ENGINES:
            raise SettingsError(
                f"SERVING_ENGINE must be one of {', '.join(SERVING_ENGINES)}, got {self.serving_engine!r}"
            )
        if self.acquisition not in ACQUISITION_STRATEGIES:
            raise SettingsError(
                f"ACQUISITION must be one of {', '.join(ACQUISITION_STRATEGIES)}, got {self.acquisition!r}"
            )
        if (self.basic_auth_user is None) != (self.basic_auth_pass is None):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.label_studio_url is not None and not self.label_studio_url.startswith(
            ("http://", "https://")
        ):
            raise SettingsError(
                f"LABEL_STUDIO_URL must start with http:// or https://, got {self.label_studio_url!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the environment once.

        Raises:
            SettingsError: naming the variable and what is wrong with its value.
        """
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        threshold = env.get("MODEL_SCORE_THRESHOLD", "").strip()
        hosts = tuple(h.strip().lower() for h in env.get("ALLOWED_IMAGE_HOSTS", "").split(",") if h.strip())
        url = text("LABEL_STUDIO_URL")
        return cls(
            label_studio_url=url.rstrip("/") if url else None,
            label_studio_api_key=text("LABEL_STUDIO_API_KEY"),
            model_dir=Path(text("MODEL_DIR") or cls.model_dir),
            database_url=text("DATABASE_URL") or DEFAULT_URL,
            basic_auth_user=text("BASIC_AUTH_USER"),
            basic_auth_pass=text("BASIC_AUTH_PASS"),
            redis_url=text("REDIS_URL"),
            log_level=(text("LOG_LEVEL") or "INFO").upper(),
            workers=_int(env, "WORKERS", 1, 1),
            threads=_int(env, "THREADS", 1, 1),
            start_training_each_n_updates=_int(env, "START_TRAINING_EACH_N_UPDATES", 0, 0),
            model_score_threshold=_float(env, "MODEL_SCORE_THRESHOLD", 0.5, 0.0, 1.0) if threshold else None,
            allowed_image_hosts=hosts,
            max_image_bytes=_int(env, "MAX_IMAGE_BYTES", cls.max_image_bytes, 1),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", cls.max_image_pixels, 1),
            image_timeout=_float(env, "IMAGE_TIMEOUT", cls.image_timeout, 0.1, 600.0),
            image_fetch_concurrency=_int(env, "IMAGE_FETCH_CONCURRENCY", cls.image_fetch_concurrency, 1),
            http_timeout=_int(env, "HTTP_TIMEOUT", cls.http_timeout, 1),
            max_tasks=_int(env, "MAX_TASKS_PER_REQUEST", cls.max_tasks, 1),
            train_epochs=_int(env, "TRAIN_EPOCHS", cls.train_epochs, 1),
            sync_projects=_ids(env, "SYNC_PROJECTS"),
            sync_interval=_float(env, "SYNC_INTERVAL", 0.0, 0.0, 7 * 24 * 3600.0),
            release_dir=_release_dir(text("RELEASE_DIR")),
            show_outputs=(text("SHOW_OUTPUTS") or "validated").lower(),
            serving_engine=(text("SERVING_ENGINE") or "onnxruntime").lower(),
            acquisition=(text("ACQUISITION") or "least_confidence").lower(),
            metrics_dir=_path(text("PROMETHEUS_MULTIPROC_DIR")),
            cache_dir=Path(text("DERMASSIST_CACHE") or Path.home() / ".cache" / "dermassist"),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that :meth:`from_env` reads back into these settings (for child processes)."""
        env = {
            "MODEL_DIR": str(self.model_dir),
            "DATABASE_URL": self.database_url,
            "LOG_LEVEL": self.log_level,
            "WORKERS": str(self.workers),
            "THREADS": str(self.threads),
            "START_TRAINING_EACH_N_UPDATES": str(self.start_training_each_n_updates),
            "ALLOWED_IMAGE_HOSTS": ",".join(self.allowed_image_hosts),
            "MAX_IMAGE_BYTES": str(self.max_image_bytes),
            "MAX_IMAGE_PIXELS": str(self.max_image_pixels),
            "IMAGE_TIMEOUT": str(self.image_timeout),
            "IMAGE_FETCH_CONCURRENCY": str(self.image_fetch_concurrency),
            "HTTP_TIMEOUT": str(self.http_timeout),
            "MAX_TASKS_PER_REQUEST": str(self.max_tasks),
            "TRAIN_EPOCHS": str(self.train_epochs),
            "SYNC_PROJECTS": ",".join(str(p) for p in self.sync_projects),
            "SYNC_INTERVAL": str(self.sync_interval),
            "RELEASE_DIR": str(self.release_dir) if self.release_dir is not None else "none",
            "SHOW_OUTPUTS": self.show_outputs,
            "SERVING_ENGINE": self.serving_engine,
            "ACQUISITION": self.acquisition,
            "DERMASSIST_CACHE": str(self.cache_dir),
        }
        optional = {
            "LABEL_STUDIO_URL": self.label_studio_url,
            "LABEL_STUDIO_API_KEY": self.label_studio_api_key,
            "BASIC_AUTH_USER": self.basic_auth_user,
            "BASIC_AUTH_PASS": self.basic_auth_pass,
            "REDIS_URL": self.redis_url,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir) if self.metrics_dir is not None else None,
            "MODEL_SCORE_THRESHOLD": None
            if self.model_score_threshold is None
            else str(self.model_score_threshold),
        }
        env.update({k: v for k, v in optional.items() if v is not None})
        return env

    def describe(self) -> dict[str, object]:
        """The settings for a log line or /health: secrets shown only as set / not set."""
        secret = {"label_studio_api_key", "basic_auth_pass"}
        return {
            f.name: ("<set>" if getattr(self, f.name) else "<not set>")
            if f.name in secret
            else getattr(self, f.name)
            for f in fields(self)
        }
