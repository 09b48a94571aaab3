"""SQLite's writers queue on one lock across threads and processes (consensus.db.write_lock)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from consensus.db import WriteLock, make_engine, write_lock

ROOT = Path(__file__).resolve().parents[2]

# Read, pause, write: without the lock, two writers lose each other's increments.
BUMP = """
import sys, time
from pathlib import Path
from consensus.db import WriteLock
counter, lock, n = Path(sys.argv[1]), WriteLock(Path(sys.argv[2])), int(sys.argv[3])
for _ in range(n):
    with lock:
        value = int(counter.read_text())
        time.sleep(0.0005)
        counter.write_text(str(value + 1))
"""


def test_the_lock_serialises_writers_in_two_processes(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", BUMP, str(counter), str(tmp_path / "store.sqlite"), "200"], cwd=ROOT
        )
        for _ in range(2)
    ]
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    assert counter.read_text() == "400"
    assert (tmp_path / "store.sqlite.write-lock").is_file()


def test_the_lock_serialises_threads_and_is_released_on_error(tmp_path):
    lock = WriteLock(tmp_path / "store.sqlite")
    inside, most = [0], [0]

    def work() -> None:
        for _ in range(50):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    with pytest.raises(RuntimeError), lock:
        raise RuntimeError("a failed write")
    assert lock._thread.acquire(timeout=1)  # released after the error
    lock._thread.release()


def test_only_sqlite_files_get_the_file_lock(tmp_path):
    assert isinstance(write_lock(make_engine(f"sqlite:///{tmp_path / 'a.sqlite'}")), WriteLock)
    memory = write_lock(make_engine("sqlite://"))
    assert memory is not None and not isinstance(memory, WriteLock)
    assert write_lock(make_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")) is None
