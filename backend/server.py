"""``dermassist serve``'s HTTP stack: waitress, in ``WORKERS`` processes that share one listening socket.

Why waitress. Label Studio gives a webhook 1 s and never retries, so a worker thread must never wait
on a client. waitress reads every request, headers and body, in its event loop (the body buffered in
memory, spilled to a temporary file above ``inbuf_overflow``) and hands it to one of ``--http-threads``
threads only once it is complete. A client that stalls (headers never finished, a body announced
and never sent) costs a socket, not a thread, and is closed after ``HTTP_TIMEOUT`` seconds (30)
without activity. gunicorn's ``gthread`` worker, used before, parses the request on the worker thread: eight
stalled connections held its eight threads and ``/health`` went unanswered for as long as they
stayed open. A reverse proxy in front would buffer too, but then the protection would hold only
where the proxy is deployed; with waitress it holds wherever ``serve`` runs (Docker, the demo, a
bare host).

Workers. waitress is one process; ``WORKERS`` > 1 (PostgreSQL) runs that many children of this
process, each with its own app, connection pool and model, all accepting on the one socket bound
here. A child that dies is restarted; SIGTERM / SIGINT stop them all.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from backend.settings import Settings

logger = logging.getLogger(__name__)

#: Open connections per process; more wait in the listen backlog (each costs a socket, no thread).
CONNECTION_LIMIT = 1000
BACKLOG = 1024
#: The largest request body waitress buffers (spilled to a temporary file): twice the app's own
#: limit, so a body over that limit still reaches the app and gets its JSON 413 (and a webhook's is
#: kept in the raw log); beyond this, waitress answers 413 itself without reading further.
MAX_REQUEST_BODY = 128 * 1024 * 1024


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        OSError: the address is taken or not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def waitress_options(threads: int, timeout: int) -> dict[str, Any]:
    """The waitress adjustments ``serve`` runs with (see the module's docstring)."""
    return {
        "threads": threads,
        "channel_timeout": timeout,  # a connection silent this long (a stalled client) is closed
        "cleanup_interval": max(1, min(5, timeout // 2)),
        "connection_limit": CONNECTION_LIMIT,
        "backlog": BACKLOG,
        "max_request_body_size": MAX_REQUEST_BODY,
        "asyncore_use_poll": True,  # select() stops at 1,024 descriptors
        "ident": "dermassist",
        "expose_tracebacks": False,
    }


#: Buffers at least this large are mapped on their own and given back to the system when freed.
MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def give_back_large_buffers() -> bool:
    """Have glibc return freed large buffers (a batch's decoded images, the networks' activations) to the
    system: once its dynamic mmap threshold has risen it keeps them in its heap, and a worker's resident
    memory stays at its peak for good (measured: 429 -> 324 MB after 100 predictions). Whether it applied
    (not on another C library)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def run_worker(settings: Settings, sock: socket.socket, threads: int) -> None:
    """Serve the app on ``sock`` in this process until it is stopped."""
    import waitress

    give_back_large_buffers()
    from backend.api.app import create_app
    from consensus.db import make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(settings.database_url))
    app = create_app(settings, sessions=sessions, start_runner=True)
    waitress.serve(app, sockets=[sock], **waitress_options(threads, settings.http_timeout))


def supervise(settings: Settings, sock: socket.socket, threads: int) -> int:
    """Run ``settings.workers`` worker processes on ``sock``; restart any that dies; stop on a signal."""
    # The workers' counters meet in one folder (prometheus-client's multiprocess mode), emptied now so a
    # restart starts from zero; each worker reads PROMETHEUS_MULTIPROC_DIR before importing the client.
    metrics_dir = Path(settings.model_dir) / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env = {**os.environ, **settings.to_env(), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [
        sys.executable,
        "-m",
        "backend.server",
        "--fd",
        str(sock.fileno()),
        "--http-threads",
        str(threads),
    ]
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def spawn(slot: int) -> None:
        children[slot] = subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),))

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(settings.workers):
        spawn(slot)
    restarts: dict[int, float] = {}
    while not stopping:
        time.sleep(0.5)
        for slot, child in list(children.items()):
            if child.poll() is not None and not stopping:
                logger.error(
                    "worker %d (pid %d) exited with %s; restarting it", slot, child.pid, child.returncode
                )
                if time.monotonic() - restarts.get(slot, 0.0) < 5.0:
                    time.sleep(2.0)  # a worker that dies at start must not spin
                restarts[slot] = time.monotonic()
                spawn(slot)
    for child in children.values():
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def serve(settings: Settings, host: str, port: int, threads: int) -> int:
    """``dermassist serve``: one process when ``WORKERS`` is 1, else a supervisor and its workers."""
    sock = listen(host, port)
    logger.info(
        "serving on http://%s:%d (waitress, %d worker(s) x %d threads) with %s",
        host,
        port,
        settings.workers,
        threads,
        settings.describe(),
    )
    if settings.workers == 1:
        run_worker(settings, sock, threads)
        return 0
    return supervise(settings, sock, threads)


def main(argv: list[str] | None = None) -> int:
    """A worker process of :func:`supervise` (``python -m backend.server --fd N``)."""
    parser = argparse.ArgumentParser(prog="python -m backend.server")
    parser.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    parser.add_argument("--http-threads", type=int, default=8)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_worker(settings, socket.socket(fileno=args.fd), args.http_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
