"""A Label Studio project's side of a background pre-annotation: the tasks still to predict, and
predictions posted in batches.

What is still to do is read from Label Studio itself, never from a list kept here: a task is pending
when it has no prediction of the model version being served. So a run that was killed after a batch
was posted does not predict that batch again, and one that died before posting it does.

- **Reading** goes through the data manager's task list, one page at a time, in task id order from a
  cursor (``id > after``), so tasks that fail (an unreadable image) are passed over within a run but
  stay pending for the next one. Label Studio's filter "prediction model versions does not contain V"
  is a *substring* match: a task whose only prediction is of a version that contains V (``V+lesion``)
  would be missed, so when the project holds such a version a second sweep reads the tasks the filter
  matched and keeps those without V itself (the versions column; a truncated one is read per task).
- **Posting** is one ``POST /api/projects/{id}/import/predictions`` per batch (at most
  :data:`MAX_BATCH` predictions: Label Studio creates them with one ``bulk_create``, in one
  transaction, so a batch lands whole or not at all). It is not retried: after an error the job stops,
  and the next run reads from Label Studio which tasks have their prediction.
- **Replacing** (``--all``): every task is predicted again; its earlier predictions of the same version
  are deleted once the new one is posted, so a kill between the two leaves two, which the next run's
  replacement of that batch reduces to one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.label_studio.sdk import LabelStudioApi

logger = logging.getLogger(__name__)

MAX_BATCH = 500
"""Predictions per post: Label Studio's ``PREDICTION_IMPORT_BATCH_SIZE``, one ``bulk_create``."""

MISSING = "missing"  # tasks whose prediction versions do not contain V (Label Studio's filter)
SUPERSTRING = "superstring"  # tasks whose versions contain V: those without V itself
ALL = "all"  # every task (to replace its prediction of V)

_VERSIONS_SHOWN = 500  # Label Studio truncates the versions column at this many characters
_TASK_FIELDS = ("id", "data", "meta", "project")


@dataclass
class Page:
    """One page of pending tasks.

    Attributes:
        tasks: the tasks to predict (``id`` and ``data``), in id order.
        last_id: the last task id read (the next page starts after it), even if it was not pending.
        total: how many tasks the sweep's filter matched in all, from ``after``.
        replaced: per task, its earlier predictions of V (deleted once its new one is posted).
    """

    tasks: list[dict[str, Any]]
    last_id: int
    total: int
    replaced: dict[int, list[int]] = field(default_factory=dict)


def versions_of(column: str) -> set[str]:
    """The versions in the data manager's ``predictions_model_versions`` column (``a,b`` on SQLite,
    ``a, b`` on PostgreSQL)."""
    return {part.strip() for part in column.split(",") if part.strip()}


class ProjectPredictions:
    """A project's pending tasks and the posting of its predictions, for model version ``version``.

    Args:
        ls: label-studio-sdk's client (errors are the caller's to map).
        project: the project id.
        version: the model version predicted (what ``/setup`` and ``/predict`` report).
    """

    def __init__(self, ls: LabelStudioApi, project: int, version: str) -> None:
        self.ls, self.project, self.version = ls, int(project), version

    def sweeps(self, replace: bool) -> tuple[str, ...]:
        """The sweeps over the project a run makes: every task when replacing; otherwise the tasks
        Label Studio's filter finds, and a second sweep where that filter may have missed some."""
        if replace:
            return (ALL,)
        counts = self.ls.model_version_counts(self.project)
        if any(self.version in other and other != self.version for other in counts):
            return (MISSING, SUPERSTRING)
        return (MISSING,)

    def page(self, sweep: str, after: int, limit: int) -> Page:
        """The next pending tasks of ``sweep`` with an id above ``after``, at most ``limit`` of them."""
        after_filter = {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after}
        version_filter = {
            "filter": "filter:tasks:predictions_model_versions",
            "type": "String",
            "value": [self.version],
        }
        if sweep == MISSING:
            found, total = self.ls.tasks_page(
                self.project, [after_filter, {**version_filter, "operator": "not_contains"}], limit
            )
            return Page([_slim(t) for t in found], _last_id(found, after), total)
        if sweep == SUPERSTRING:
            found, total = self.ls.tasks_page(
                self.project, [after_filter, {**version_filter, "operator": "contains"}], limit
            )
            return Page([_slim(t) for t in found if not self._has_version(t)], _last_id(found, after), total)
        if sweep == ALL:
            found, total = self.ls.tasks_page(self.project, [after_filter], limit, fields="all")
            replaced = {
                int(t["id"]): [
                    int(p["id"])
                    for p in t.get("predictions") or []
                    if isinstance(p, dict) and p.get("model_version") == self.version
                ]
                for t in found
            }
            return Page([_slim(t) for t in found], _last_id(found, after), total, replaced)
        raise ValueError(f"unknown sweep {sweep!r}")

    def _has_version(self, task: dict[str, Any]) -> bool:
        column = task.get("predictions_model_versions")
        if isinstance(column, str) and len(column) < _VERSIONS_SHOWN:
            return self.version in versions_of(column)
        # Truncated (or absent): ask for the task's predictions themselves.
        return any(p.model_version == self.version for p in self.ls.predictions.list(task=int(task["id"])))

    def post(self, predictions: Sequence[dict[str, Any]]) -> int:
        """Post one batch (``task``, ``result``, ``score``, ``model_version`` each) in one request.

        Raises:
            ValueError: more than :data:`MAX_BATCH` predictions.
            ApiError: Label Studio refused the batch (none of it was stored), or said it stored fewer.
        """
        from label_studio_sdk import PredictionRequest
        from label_studio_sdk.core.api_error import ApiError

        if len(predictions) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} predictions per post, got {len(predictions)}")
        if not predictions:
            return 0
        request = [
            PredictionRequest(
                task=int(p["task"]),
                result=p["result"],
                score=p.get("score"),
                model_version=p["model_version"],
            )
            for p in predictions
        ]
        # No retry: a post that failed after Label Studio stored it must not be stored twice.
        answer = self.ls.projects.import_predictions(
            id=self.project, request=request, request_options={"max_retries": 0}
        )
        created = int(getattr(answer, "created", 0) or 0)
        if created != len(predictions):
            raise ApiError(
                status_code=None,
                body={"detail": f"Label Studio stored {created} of {len(predictions)} predictions"},
            )
        return created

    def remove(self, prediction_ids: Sequence[int]) -> None:
        """Delete predictions (one already gone is fine)."""
        from label_studio_sdk.core.api_error import ApiError

        for prediction_id in prediction_ids:
            try:
                self.ls.predictions.delete(id=int(prediction_id))
            except ApiError as exc:
                if exc.status_code != 404:
                    raise


def _slim(task: dict[str, Any]) -> dict[str, Any]:
    return {key: task[key] for key in _TASK_FIELDS if key in task}


def _last_id(tasks: list[dict[str, Any]], after: int) -> int:
    return int(tasks[-1]["id"]) if tasks else after
