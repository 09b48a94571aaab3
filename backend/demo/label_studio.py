"""A local Label Studio for the demo and the end-to-end tests: own venv, pre-migrated template, loopback.

Label Studio 1.23.2 pins Django and friends, so it lives in its own virtual environment outside the
repository (``~/.cache/dermassist/ls-venv``, or ``$DERMASSIST_CACHE``); ``make label-studio`` creates
it. A first start migrates a fresh database (75–120 s); that data folder is kept as a template and
copied for every later start, which then takes seconds. Each server listens on 127.0.0.1 on a free
port, with the variables ../shared/docs/label-studio.md found necessary (local ML backends allowed,
no analytics, no Sentry, legacy tokens on), and is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.demo.processes import free_port
from backend.label_studio.client import connect, label_studio_errors

logger = logging.getLogger(__name__)

LS_VERSION = "1.23.2"
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "dermassist-demo-123"
ADMIN_TOKEN = "d3e4a55157000000000000000000000000000001"  # 40 hex: a legacy token, loopback only
START_TIMEOUT_S = 240.0
#: Variables Label Studio falls back to when its own are unset; they must not leak in.
_LEAKY = ("HOST", "PORT", "USERNAME", "PASSWORD", "DEBUG")


class LabelStudioUnavailableError(RuntimeError):
    """Label Studio is not installed here, or would not start; the message says which and what to do."""


def cache_dir() -> Path:
    """``DERMASSIST_CACHE`` (the settings read it): Label Studio's venv and template live there."""
    from backend.settings import Settings

    return Settings.from_env().cache_dir


def venv_dir() -> Path:
    return cache_dir() / "ls-venv"


def executable() -> Path:
    """The ``label-studio`` command of the dedicated venv.

    Raises:
        LabelStudioUnavailableError: when the venv is missing or holds another version.
    """
    exe = venv_dir() / "bin" / "label-studio"
    stamp = venv_dir() / f".installed-{LS_VERSION}"
    if not exe.is_file() or not stamp.is_file():
        raise LabelStudioUnavailableError(
            f"Label Studio {LS_VERSION} is not installed in {venv_dir()}: run `make label-studio` "
            "(its own venv, ~1 GB, ~2.5 min with network access to PyPI)"
        )
    return exe


def environment(data_dir: Path, port: int, files_root: Path | None = None) -> dict[str, str]:
    """The environment a loopback Label Studio needs (docs/label-studio.md, "A loopback-only LS")."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY and not k.startswith("LABEL_STUDIO_")}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}",
            "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
            "LABEL_STUDIO_PASSWORD": ADMIN_PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": ADMIN_TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root or data_dir),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            "DJANGO_DB": "sqlite",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class LabelStudioServer:
    """A running Label Studio; :meth:`stop` ends it (and its children) by PID."""

    url: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    token: str = ADMIN_TOKEN
    started_in_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> LabelStudioServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _launch(data_dir: Path, port: int, files_root: Path | None, log: Path) -> LabelStudioServer:
    exe = executable()
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = log.open("ab")
    t0 = time.monotonic()
    process = subprocess.Popen(
        [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
        env=environment(data_dir, port, files_root),
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=data_dir,
        start_new_session=True,
    )
    handle.close()
    server = LabelStudioServer(f"http://127.0.0.1:{port}", port, data_dir, process, log)
    deadline = t0 + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise LabelStudioUnavailableError(
                f"Label Studio exited with status {process.returncode}:\n{tail}"
            )
        if _healthy(server.url):
            server.started_in_s = time.monotonic() - t0
            return server
        time.sleep(0.5)
    server.stop()
    raise LabelStudioUnavailableError(
        f"Label Studio did not answer /health within {START_TIMEOUT_S:.0f} s; see {log}"
    )


def template_dir() -> Path:
    return cache_dir() / f"ls-template-{LS_VERSION}"


def ensure_template() -> Path:
    """A migrated data folder with the admin user and token, made once (the slow first start)."""
    template = template_dir()
    if (template / ".ready").is_file():
        return template
    building = template.with_name(template.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    logger.info("first start of Label Studio: migrating a template database (1-2 minutes, once)")
    server = _launch(building, free_port(), None, cache_dir() / "ls-template.log")
    try:
        with label_studio_errors(server.url), connect(server.url, server.token) as ls:
            ls.users.whoami()  # the token works
    finally:
        server.stop()
    (building / ".ready").write_text(LS_VERSION)
    shutil.rmtree(template, ignore_errors=True)
    building.rename(template)
    return template


def start(data_dir: Path, files_root: Path | None = None, port: int | None = None) -> LabelStudioServer:
    """Start Label Studio on a free loopback port from a copy of the template data folder.

    Raises:
        LabelStudioUnavailableError: not installed, or it would not start.
    """
    template = ensure_template()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise FileExistsError(
            f"{data_dir} is not empty: Label Studio starts from a fresh copy of its template"
        )
    shutil.copytree(template, data_dir, dirs_exist_ok=True)
    return _launch(data_dir, port or free_port(), files_root, data_dir / "label-studio.log")
