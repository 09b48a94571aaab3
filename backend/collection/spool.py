"""Events that could not reach the store wait on disk and are applied once it is back.

A webhook arrives once (Label Studio never retries). When the store cannot take it, even after the
bounded retries of :func:`backend.collection.ingest.ingest_webhook` (a PostgreSQL restart, a failover, a full
disk), the event is written here, fsynced, and acknowledged: the spool is part of the raw log.
Every ``serve`` worker replays the spool in the background (every few seconds, and at start), through
the same ingestion as a live event, with the time it was received, so ordering rules (older versions
and deletions) hold as if it had been applied at once.

One file per event, written atomically (temporary file, fsync, rename). A replayer claims a file by
renaming it to carry its pid, so two workers never apply the same event; a claim left by a dead
process is taken back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.common.files import atomic_write_bytes

logger = logging.getLogger(__name__)

SUFFIX = ".event.json"
REPLAY_INTERVAL_S = 3.0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EventSpool:
    """The folder of events waiting for the store (``MODEL_DIR/event-spool``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def put(self, payload: Any, received_at: datetime) -> Path:
        """Write one event durably; return its file.

        Raises:
            OSError: the folder cannot be written (then nothing is acknowledged).
        """
        name = f"{received_at.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:12]}"
        record = {"received_at": received_at.isoformat(), "payload": payload}
        final = self.folder / f"{name}{SUFFIX}"
        atomic_write_bytes(final, json.dumps(record).encode("utf-8"))  # fsynced, the rename too
        return final

    def pending(self) -> list[Path]:
        """Waiting events, oldest first (claims of dead processes included)."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            if path.name.endswith(SUFFIX):
                found.append(path)
            elif SUFFIX + ".claimed-" in path.name:
                pid = path.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not pid_alive(int(pid)):
                    original = path.with_name(path.name.split(".claimed-", 1)[0])
                    with contextlib.suppress(OSError):
                        os.replace(path, original)
                        found.append(original)
        return sorted(found)

    def replay(self, apply: Callable[[Any, datetime], bool]) -> int:
        """Apply every waiting event with ``apply(payload, received_at)``; return how many were applied.

        ``apply`` returns True once the event is in the store (applied, or kept with its reason), and
        False when the store is still away: then the event stays and the round stops.
        """
        done = 0
        for path in self.pending():
            claimed = path.with_name(f"{path.name}.claimed-{os.getpid()}")
            try:
                os.replace(path, claimed)  # atomic: one replayer wins each file
            except FileNotFoundError:
                continue
            try:
                record = json.loads(claimed.read_text(encoding="utf-8"))
                received = datetime.fromisoformat(record["received_at"])
                ok = apply(record["payload"], received.astimezone(UTC))
            except Exception:
                logger.exception("replaying %s failed; it stays in the spool", path.name)
                ok = False
            if ok:
                claimed.unlink(missing_ok=True)
                done += 1
            else:
                os.replace(claimed, path)
                break
        if done:
            logger.info("applied %d spooled event(s) to the store", done)
        return done

    def start(
        self, apply: Callable[[Any, datetime], bool], interval: float = REPLAY_INTERVAL_S
    ) -> EventSpool:
        """Replay in a background thread now and every ``interval`` seconds."""

        def loop() -> None:
            while True:
                try:
                    self.replay(apply)
                except Exception:  # the loop outlives any one round
                    logger.exception("the event spool replay hit an error")
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=loop, name="dermassist-spool", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
