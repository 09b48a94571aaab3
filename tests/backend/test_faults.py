"""Faults against real processes: slow clients, concurrent writers on PostgreSQL, a PostgreSQL restart
under webhook load. Everything listens on 127.0.0.1 (free ports) and is stopped by PID.

The figures these tests print (``-s``) are the ones in docs/RESULTS.md ("Nothing lost").
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from backend.demo.processes import free_port, start_serve, stop
from consensus.db import init_db
from consensus.models import Annotation, AnnotationEvent, Item, Rater
from labeling_config import load_config

BCC_XML = load_config("bcc")


def event(task: int, rater: int, base: int = 0) -> dict[str, Any]:
    """Rater ``rater``'s first annotation of task ``task`` (ids unique per (task, rater))."""
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": base + task * 100 + rater,
            "task": task,
            "completed_by": {"id": rater + 1, "email": f"derm{rater}@example.org"},
            "result": [
                {"from_name": "diagnosis", "to_name": "image", "type": "choices",
                 "value": {"choices": ["BCC" if (task + rater) % 3 else "non-BCC"]}}
            ],
            "updated_at": "2026-11-20T10:00:00Z",
        },
        "task": {"id": task, "data": {"image": f"/data/upload/1/{task}.png"}},
        "project": {"id": 1, "label_config": BCC_XML},
    }  # fmt: skip


def post_all(
    port: int,
    events: list[dict[str, Any]],
    answers: list[tuple[int, int, float]],
    start: threading.Barrier | None,
) -> None:
    """POST each event on one keep-alive connection; record (annotation id, status, seconds); 0: no answer."""
    if start is not None:
        start.wait()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for payload in events:
        t0 = time.monotonic()
        try:
            conn.request(
                "POST", "/webhook", body=json.dumps(payload), headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            status = 0
        now = time.monotonic()
        answers.append((payload["annotation"]["id"], status, now - t0, now))
    conn.close()


def serve_env(tmp_path: Path, database: str, workers: int) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database,
        "MODEL_DIR": str(tmp_path / "models"),
        "RELEASE_DIR": "none",  # these tests serve their own tiny model
        "SHOW_OUTPUTS": "all",  # which validated nothing: show every output
        "LOG_LEVEL": "WARNING",
        "WORKERS": str(workers),
    }


def store_counts(database: str) -> dict[str, int]:
    engine, sessions = init_db(database)
    try:
        with sessions() as session:
            return {
                m.__tablename__: session.scalar(select(func.count()).select_from(m)) or 0
                for m in (Annotation, AnnotationEvent, Item, Rater)
            }
    finally:
        engine.dispose()


def stored_ids(database: str) -> list[int]:
    engine, sessions = init_db(database)
    try:
        with sessions() as session:
            return [i for i in session.scalars(select(Annotation.ls_annotation_id)) if i is not None]
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------ slow clients


def test_fifty_slow_clients_do_not_starve_health_or_a_webhook_and_are_closed(tmp_path):
    port = free_port()
    env = {**serve_env(tmp_path, f"sqlite:///{tmp_path / 's.sqlite'}", 1), "HTTP_TIMEOUT": "2"}
    server = start_serve(env, port, tmp_path / "serve.log")
    held: list[socket.socket] = []
    try:
        for i in range(50):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:  # a body announced and never sent
                sock.sendall(
                    b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
                )
            else:  # headers never finished
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append(sock)
        time.sleep(0.5)
        timings = {}
        for name in ("health", "webhook", "health-again"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            t0 = time.monotonic()
            if name == "webhook":
                conn.request(
                    "POST",
                    "/webhook",
                    body=json.dumps(event(1, 0)),
                    headers={"Content-Type": "application/json"},
                )
            else:
                conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            timings[name] = time.monotonic() - t0
            conn.close()
            assert response.status == 200, name
        print(
            f"\nslow clients: 50 held; answers in {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in timings.items())}"
        )
        assert max(timings.values()) < 1.0, timings
        # HTTP_TIMEOUT=2: the stalled connections are closed by the server after their silence.
        time.sleep(4.5)
        closed = 0
        for sock in held:
            sock.settimeout(1)
            with contextlib.suppress(TimeoutError, OSError):
                closed += sock.recv(1) == b""
        assert closed == len(held), f"{len(held) - closed} stalled connections still open"
    finally:
        for sock in held:
            sock.close()
        stop(server)


# ------------------------------------------------------------------------- concurrent writers, PostgreSQL


def test_eight_clients_first_events_of_the_same_tasks_two_workers_postgres(tmp_path, pg_url):
    """8 raters x 150 tasks = 1,200 first events, every task's eight racing each other."""
    port = free_port()
    server = start_serve(serve_env(tmp_path, pg_url, 2), port, tmp_path / "serve.log")
    answers: list[tuple[int, int, float, float]] = []
    try:
        barrier = threading.Barrier(8)
        clients = [
            threading.Thread(
                target=post_all, args=(port, [event(t, r) for t in range(1, 151)], answers, barrier)
            )
            for r in range(8)
        ]
        t0 = time.monotonic()
        for c in clients:
            c.start()
        for c in clients:
            c.join(300)
        elapsed = time.monotonic() - t0
    finally:
        stop(server)
    statuses = [s for _, s, _, _ in answers]
    latencies = sorted(s for _, _, s, _ in answers)
    print(
        f"\n1,200 concurrent first events, WORKERS=2, PostgreSQL: {statuses.count(200)} x 200, "
        f"{statuses.count(422)} x 422, {sum(s >= 500 for s in statuses)} x 5xx in {elapsed:.1f} s; "
        f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {latencies[int(0.99 * len(latencies))] * 1000:.0f} ms"
    )
    assert len(answers) == 1200 and statuses.count(200) == 1200, {s: statuses.count(s) for s in set(statuses)}
    assert store_counts(pg_url) == {"annotations": 1200, "annotation_events": 1200, "items": 150, "raters": 8}


# ------------------------------------------------------------------------------ PostgreSQL restarted


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


class OwnPostgres:
    """A PostgreSQL instance of the test's own: initdb into a temporary folder, a free port, trust auth."""

    def __init__(self) -> None:
        initdb, self.pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            pytest.skip("initdb / pg_ctl not found: the PostgreSQL restart test needs a server of its own")
        self.root = Path(tempfile.mkdtemp(prefix="dermassist-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run([initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, command: list[str]) -> None:
        subprocess.run([*self.as_user, *command], check=True, capture_output=True, timeout=120)

    def ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._run(
            [
                str(self.pg_ctl),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "log"),
                "-w",
                action,
                *extra,
            ]
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    try:
        pg.ctl("start")
        yield pg
    finally:
        pg.close()


def test_postgres_restart_under_webhook_load_loses_no_acknowledged_event(tmp_path, own_postgres):
    port = free_port()
    server = start_serve(serve_env(tmp_path, own_postgres.url, 2), port, tmp_path / "serve.log")
    answers: list[tuple[int, int, float, float]] = []
    events = [[event(t, r) for t in range(1, 101)] for r in range(4)]
    try:
        clients = [threading.Thread(target=post_all, args=(port, shard, answers, None)) for shard in events]
        for c in clients:
            c.start()
        while len(answers) < 100:
            time.sleep(0.01)
        restarted_at = time.monotonic()
        own_postgres.ctl("restart", "-m", "fast")
        restart_s = time.monotonic() - restarted_at
        while len(answers) < 200:
            time.sleep(0.01)
        # Then an outage longer than the retries (a failover, a slow restart): events go to the spool.
        outage_at = time.monotonic()
        own_postgres.ctl("stop", "-m", "fast")
        # Whatever the clients' pace, these arrive while the store is certainly down.
        post_all(port, [event(t, 9) for t in range(1, 6)], answers, None)
        time.sleep(max(0.0, 3.0 - (time.monotonic() - outage_at)))
        own_postgres.ctl("start")
        back_at = time.monotonic()
        outage_s = back_at - outage_at
        for c in clients:
            c.join(300)
        # The spooled events are applied by the workers' replay once the store is back.
        spool = tmp_path / "models" / "event-spool"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(spool.glob("*.event.json*")):
            time.sleep(0.2)
        drained_s = time.monotonic() - outage_at
        assert not any(spool.glob("*.event.json*")), "the spool was not drained"
    finally:
        stop(server)
    statuses = [s for _, s, _, _ in answers]
    acknowledged = [i for i, s, _, _ in answers if s in (200, 202)]
    ids = stored_ids(own_postgres.url)
    resumed = min((t for _, s, _, t in answers if s == 200 and t > back_at), default=float("nan")) - back_at
    print(
        f"\nPostgreSQL restart (-m fast, {restart_s:.1f} s) and outage ({outage_s:.1f} s) under 400 events "
        "from 4 clients (+5 sent while it was down), WORKERS=2: "
        f"{statuses.count(200)} x 200, {statuses.count(202)} x 202 (spooled), {sum(s >= 500 for s in statuses)} x 5xx, "
        f"{statuses.count(422)} x 422, {statuses.count(0)} unanswered; slowest answer "
        f"{max(s for _, _, s, _ in answers) * 1000:.0f} ms; writes resumed {resumed:.2f} s after the store was back; spool drained {drained_s:.1f} s after the outage began"
    )
    assert sum(s >= 500 for s in statuses) == 0 and statuses.count(422) == 0
    assert len(ids) == len(set(ids)), "an event was applied twice"
    assert set(acknowledged) <= set(ids), f"{len(set(acknowledged) - set(ids))} acknowledged events lost"
    assert len(acknowledged) == 405
    down = [s for i, s, _, _ in answers if i % 100 == 9]
    assert down == [202] * 5, "events sent while the store was down go to the spool"
    counts = store_counts(own_postgres.url)
    assert counts["annotations"] == 405 and counts["annotation_events"] == 405


def test_the_real_server_answers_oversized_and_deeply_nested_bodies_in_json(tmp_path):
    port = free_port()
    database = f"sqlite:///{tmp_path / 's.sqlite'}"
    server = start_serve(serve_env(tmp_path, database, 1), port, tmp_path / "serve.log")
    try:
        probes = {
            "70 MB event": (b'{"action": "x", "pad": "' + b"x" * (70 * 1024 * 1024) + b'"}', 413),
            "100,000-deep JSON": (b"[" * 100_000 + b"]" * 100_000, 400),
        }
        for name, (body, status) in probes.items():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/webhook", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            conn.close()
            assert response.status == status and answer["error"] and answer["message"], name
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        stop(server)
    assert store_counts(database)["annotation_events"] == 2  # both kept, with their reasons
