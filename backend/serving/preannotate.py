"""A whole project pre-annotated: pending tasks read page by page, predicted, posted in batches.

Label Studio's "Retrieve predictions" calls ``/predict`` synchronously and gives up after 100 s, so
a large project cannot be pre-annotated that way (label-studio issues #6330, #6422, #1773, #9098);
this loop is what a background job (``POST /projects/<id>/predict``) and ``dermassist predict`` run
instead. Each batch: the next pending tasks (read from Label Studio:
:mod:`backend.label_studio.project_predictions`), their images fetched ``IMAGE_FETCH_CONCURRENCY``
at a time while the models run (:func:`backend.serving.predict.predict_tasks`), and their predictions
posted in one request. A task whose image cannot be had is counted as failed and not posted, so it
stays pending for the next run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backend.label_studio.project_predictions import ALL, SUPERSTRING, Page

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 32
"""Tasks per batch: one page read, one post."""


class TaskSource(Protocol):
    """Where the pending tasks come from and the predictions go (a Label Studio project)."""

    def sweeps(self, replace: bool) -> tuple[str, ...]: ...

    def page(self, sweep: str, after: int, limit: int) -> Page: ...

    def post(self, predictions: Sequence[dict[str, Any]]) -> int: ...

    def remove(self, prediction_ids: Sequence[int]) -> None: ...


@dataclass
class Progress:
    """Where a run stands: tasks to do (when known), posted, failed, the last task id handled."""

    total: int | None = None
    done: int = 0
    failed: int = 0
    cursor: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        """Tasks handled per second so far."""
        elapsed = time.monotonic() - self.started
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0


def preannotate(
    source: TaskSource,
    predict: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    *,
    replace: bool = False,
    batch_size: int = DEFAULT_BATCH,
    cursor: int = 0,
    on_batch: Callable[[Progress], bool] | None = None,
) -> Progress:
    """Predict and post every pending task of ``source``.

    Args:
        source: the project.
        predict: tasks -> one prediction each, in order (``model_version`` set; ``error`` where the task
            could not be predicted).
        replace: predict every task and replace its prediction of the same version (``--all``);
            otherwise only tasks without a prediction of the version (``--missing``).
        batch_size: tasks per page and per post.
        cursor: with ``replace``, start after this task id (an interrupted run's last handled task).
        on_batch: called once the number of tasks to do is known, then after each batch is posted;
            returning False stops the run there.

    Returns:
        The final progress.
    """
    progress = Progress(cursor=cursor if replace else 0)
    for sweep in source.sweeps(replace):
        after = progress.cursor if sweep == ALL else 0
        first = True
        while True:
            page = source.page(sweep, after, batch_size)
            if sweep == SUPERSTRING:  # its filter's count is not what is pending: count what it finds
                progress.total = (progress.total or 0) + len(page.tasks)
            elif first:
                progress.total = (progress.total or 0) + page.total
                if on_batch is not None and not on_batch(progress):  # the total is known: say so
                    return progress
            first = False
            if page.last_id == after:
                break
            if page.tasks:
                _run_batch(source, predict, page, progress)
            after = page.last_id
            progress.cursor = after
            if on_batch is not None and not on_batch(progress):
                logger.info("pre-annotation stopped after task %d", after)
                return progress
    return progress


def _run_batch(
    source: TaskSource,
    predict: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    page: Page,
    progress: Progress,
) -> None:
    predictions = predict(page.tasks)
    posted: list[dict[str, Any]] = []
    for task, prediction in zip(page.tasks, predictions, strict=True):
        if "error" in prediction:
            logger.debug("task %s: not posted: %s", task.get("id"), prediction["error"])  # logged already
            progress.failed += 1
            continue
        posted.append(
            {"task": task["id"], **{k: prediction.get(k) for k in ("result", "score", "model_version")}}
        )
    source.post(posted)
    old = [pid for p in posted for pid in page.replaced.get(int(p["task"]), [])]
    if old:
        source.remove(old)
    progress.done += len(posted)
