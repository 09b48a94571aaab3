"""A live Label Studio 1.23.2 and a live `dermassist serve`, both on free loopback ports, stopped by PID.

Label Studio comes from its own venv (``make label-studio``); where it is not installed the tests skip
and say so. One Label Studio serves the whole session (a fresh copy of the pre-migrated template).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend import ls_server

DERMASSIST = Path(sys.executable).parent / "dermassist"


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls_server.LabelStudioServer]:
    try:
        ls_server.executable()
    except ls_server.LabelStudioUnavailableError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("ls")
    files = root / "files"
    files.mkdir()
    server = ls_server.start(root / "data", files_root=files)
    server.extra["files_root"] = files
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Backend:
    url: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)


def start_backend(port: int, env: dict[str, str], log: Path) -> Backend:
    handle = log.open("ab")
    process = subprocess.Popen(
        [str(DERMASSIST), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    backend = Backend(f"http://127.0.0.1:{port}", port, env, process, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dermassist serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{backend.url}/health", timeout=1) as response:
                if response.status == 200:
                    return backend
        except OSError:
            time.sleep(0.3)
    backend.stop(signal.SIGKILL)
    raise AssertionError("dermassist serve did not answer /health within 90 s")
