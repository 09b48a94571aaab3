"""What every subcommand shares: the version, the settings with the options laid over them."""

from __future__ import annotations

import argparse
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.settings import Settings


logger = logging.getLogger("dermassist")


def _version() -> str:
    try:
        return version("dermassist")
    except PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


def _settings(args: argparse.Namespace) -> Settings:
    from backend.settings import Settings

    settings = Settings.from_env()
    overrides = {}
    if getattr(args, "db", None):
        overrides["database_url"] = args.db
    if getattr(args, "model_dir", None):
        overrides["model_dir"] = Path(args.model_dir)
    if overrides:
        import dataclasses

        settings = dataclasses.replace(settings, **overrides)
    return settings


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` the user gave (their defaults are None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _database_url(args: argparse.Namespace) -> str:
    from backend.settings import Settings

    return str(args.db or Settings.from_env().database_url)


def _synced_label_studio(settings: Settings, sessions: Any, project: int) -> tuple[Any, Any]:
    """Sync ``project`` into the store, then a client of its Label Studio: ``(sync outcome, client)``.

    Raises:
        ValueError: Label Studio cannot be reached or refused (its message).
    """
    from backend.collection.sync import sync_from_label_studio
    from backend.label_studio.client import LabelStudioError, connect

    try:
        synced = sync_from_label_studio(settings, sessions, project)
        return synced, connect(settings.label_studio_url or "", settings.label_studio_api_key or "")
    except LabelStudioError as exc:
        raise ValueError(str(exc)) from None
