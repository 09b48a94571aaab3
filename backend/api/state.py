"""The state of one backend process: settings, store, image fetcher, served models, retraining, configs.

Built once by :func:`backend.api.app.create_app` and kept in ``app.extensions``; the routes reach it
through :func:`backend`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from backend.api.requests import ApiError
from backend.collection.ingest import TRAIN_EVENT, EventError, ingest_webhook
from backend.collection.spool import EventSpool
from backend.images import ImageFetcher
from backend.serving.holder import Serving, systems_for
from backend.serving.registry import LESION, MULTITASK
from backend.serving.release import Release
from backend.settings import Settings
from backend.training.policy import Retraining
from labeling_config import load_config
from labeling_config.parse import ConfigError, ProjectConfig, parse_config

logger = logging.getLogger(__name__)


@dataclass
class Backend:
    """The state of one backend process."""

    settings: Settings
    sessions: sessionmaker[Session]
    fetcher: ImageFetcher
    serving: Serving
    retraining: Retraining
    release: Release | None = None  # the released models (backend/serving/release.py)
    write_lock: Any = None  # SQLite: one writer thread at a time in this process
    spool: EventSpool | None = None  # events waiting for the store
    configs: dict[str, ProjectConfig] = field(default_factory=dict)  # by config hash
    projects: dict[int, ProjectConfig] = field(default_factory=dict)  # from /setup
    _lock: threading.Lock = field(default_factory=threading.Lock)

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

    def remember(self, project: int, config: ProjectConfig) -> None:
        """A project's config from /setup, for its later requests that do not send one."""
        with self._lock:
            self.projects[project] = config

    def servable(self, config: ProjectConfig) -> ProjectConfig:
        """``config`` if this backend can fill some of its controls, else a 422 that says what to add."""
        systems = systems_for(config)
        if MULTITASK in systems:
            return config
        if LESION in systems:
            if self.serving.available(LESION):
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
                raise EventError(exc.message) from None
        if project is not None and project in self.projects:
            return self.projects[project]
        return self.parse(load_config("bcc"))

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
            self.retraining.queue(TRAIN_EVENT)
        return True


def backend() -> Backend:
    """This app's :class:`Backend`."""
    state: Backend = current_app.extensions["dermassist"]
    return state
