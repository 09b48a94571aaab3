"""Local server processes on loopback: a free port, ``dermassist serve`` started and stopped by PID.

Used by the demo, the end-to-end tests and ``bench/webhook.py``, so all of them start the backend the
same way: its own process group (so a stop reaches its worker processes too), output to a log file, and
ready once ``/health`` answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DERMASSIST = Path(sys.executable).parent / "dermassist"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Signal a process group started here; SIGKILL it if it outlives ``timeout``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def start_serve(env: dict[str, str], port: int, log: Path, timeout: float = 120.0) -> subprocess.Popen[bytes]:
    """Start ``dermassist serve`` on 127.0.0.1:``port`` with ``env``; return once ``/health`` answers.

    Raises:
        RuntimeError: the process exited (the log's tail says why) or did not answer in ``timeout``.
    """
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [str(DERMASSIST), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"dermassist serve exited with status {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    stop(process, signal.SIGKILL)
    raise RuntimeError(f"dermassist serve did not answer /health within {timeout:.0f} s; see {log}")
