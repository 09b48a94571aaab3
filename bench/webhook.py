"""Webhook throughput and latency against `dermassist serve` (a script, not a timed test).

Starts the real server (waitress, ``--workers`` processes) on a free loopback port with a fresh store
(SQLite, or with ``--database postgres`` a new database on the local PostgreSQL server, dropped
afterwards), sends N distinct
ANNOTATION_CREATED events from C concurrent clients (keep-alive connections), then checks that every
event and every annotation landed. Prints events/s, p50 / p99 / max latency, the status counts, and
the row counts; exits non-zero if anything was lost or answered 5xx, or if p99 reaches Label Studio's
1 s webhook timeout.

    .venv/bin/python bench/webhook.py --events 5000 --clients 8 [--workers 2] [--database postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.demo.processes import free_port, start_serve, stop  # noqa: E402
from labeling_config import load_config  # noqa: E402

BCC_XML = load_config("bcc")
PATTERNS = ["Ulceration", "Multiple blue-grey globules", "Arborizing telangiectasia"]


def event(i: int, raters: int = 4) -> bytes:
    task = i // raters + 1
    body = {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": i + 1,
            "completed_by": i % raters + 1,
            "task": task,
            "was_cancelled": False,
            "updated_at": "2026-11-20T10:00:00Z",
            "result": [
                {"from_name": "diagnosis", "to_name": "image", "type": "choices",
                 "value": {"choices": ["BCC" if i % 3 else "non-BCC"]}},
                {"from_name": "patterns", "to_name": "image", "type": "choices",
                 "value": {"choices": PATTERNS[: i % 4]}},
            ],
        },
        "task": {"id": task, "data": {"image": f"/data/upload/1/{task}.png"}, "project": 1},
        "project": {"id": 1, "label_config": BCC_XML},
    }  # fmt: skip
    return json.dumps(body).encode()


def send(
    port: int, indices: list[int], latencies: list[float], statuses: Counter[int], lock: threading.Lock
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    bodies = [event(i) for i in indices]  # encoded before the clock starts: the bench times the server
    for body in bodies:
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/webhook", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            status = response.status
        except OSError:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            status = 0  # connection error
        elapsed = time.perf_counter() - t0
        with lock:
            latencies.append(elapsed)
            statuses[status] += 1
    conn.close()


@contextlib.contextmanager
def store(kind: str, folder: Path, server: str) -> Iterator[str]:
    """A fresh, empty store's URL: a SQLite file in ``folder``, or a new PostgreSQL database (dropped
    after)."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'bench.sqlite'}"
        return
    from sqlalchemy import create_engine, text

    name = f"dermassist_bench_{os.getpid()}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def counts(url: str) -> tuple[int, int]:
    """Stored raw events and annotation rows."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            events = conn.execute(text("SELECT count(*) FROM annotation_events")).scalar_one()
            rows = conn.execute(text("SELECT count(*) FROM annotations")).scalar_one()
    finally:
        engine.dispose()
    return int(events), int(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="serve worker processes")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432", help="the server (trust auth)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, store(args.database, Path(tmp), args.postgres) as url:
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "MODEL_DIR": str(Path(tmp) / "models"),
            "WORKERS": str(args.workers),
            "RELEASE_DIR": "none",  # webhooks need no model (and a fresh store would install the release)
            "LOG_LEVEL": "WARNING",
        }
        proc = start_serve(env, port, Path(tmp) / "serve.log")
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        lock = threading.Lock()
        shards = [list(range(c, args.events, args.clients)) for c in range(args.clients)]
        threads = [
            threading.Thread(target=send, args=(port, shard, latencies, statuses, lock)) for shard in shards
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop(proc)
        events, rows = counts(url)

    ordered = sorted(latencies)
    p50, p99 = ordered[len(ordered) // 2], ordered[int(0.99 * (len(ordered) - 1))]
    five = sum(n for s, n in statuses.items() if s >= 500 or s == 0)
    name = {"sqlite": "SQLite", "postgres": "PostgreSQL"}[args.database]
    print(f"{args.events} webhook events, {args.clients} clients, {args.workers} serve workers, {name}")
    print(f"throughput {args.events / wall:.0f} events/s ({wall:.1f} s)")
    print(f"latency p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms, max {1000 * ordered[-1]:.1f} ms")
    print(f"statuses {dict(sorted(statuses.items()))}; 5xx or connection errors: {five}")
    print(f"stored events {events}, annotations {rows}; lost {args.events - rows}")
    ok = rows == args.events and events == args.events and five == 0 and p99 < 1.0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
