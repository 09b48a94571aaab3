"""When to retrain, and queueing a job whatever asked for it.

Three triggers queue the same job (:func:`backend.training.jobs.request_training`): Label Studio's Train
button (``START_TRAINING``), the update policy (:func:`should_retrain`: ``START_TRAINING_EACH_N_UPDATES``
items gained or changed annotations since the last job) and ``dermassist train --from-db``. The update
policy's count runs on its own thread, never on the webhook's 1 s.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from backend.training.jobs import Runner, request_training
from consensus.models import TrainingJob
from consensus.repository import items_changed_since_last_job

logger = logging.getLogger(__name__)


def should_retrain(changed_items: int, every_n: int) -> bool:
    """The retraining policy: a job once ``every_n`` items gained or changed annotations since the last
    job (``START_TRAINING_EACH_N_UPDATES``; 0 turns it off)."""
    return every_n > 0 and changed_items >= every_n


class Retraining:
    """Queues jobs for one backend process: on request, and when the update policy says so."""

    def __init__(self, sessions: sessionmaker[Session], every_n: int, runner: Runner | None = None) -> None:
        self.sessions = sessions
        self.every_n = every_n
        self.runner = runner
        self._checks = ThreadPoolExecutor(1, "dermassist-policy")
        self._pending = threading.Event()

    def queue(self, trigger: str, params: dict[str, Any] | None = None) -> tuple[TrainingJob, bool]:
        """Queue a job (or coalesce into the queued one) and hand it to the runner; (job, created)."""
        job, created = request_training(self.sessions, trigger, params)
        if created and self.runner is not None:
            self.runner.submit(job.id)
        return job, created

    def annotations_changed(self) -> None:
        """Count, on the policy's thread, and queue a job if the policy says so (one count at a time)."""
        if self.every_n <= 0 or self._pending.is_set():
            return
        self._pending.set()
        self._checks.submit(self._check)

    def _check(self) -> None:
        try:
            with self.sessions() as session:
                changed = items_changed_since_last_job(session)
            if should_retrain(changed, self.every_n):
                self.queue("updates", {"items": changed})
        except Exception:
            logger.exception("the retraining policy check failed")
        finally:
            self._pending.clear()
