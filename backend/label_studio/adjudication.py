"""The adjudication project in Label Studio: disputed images for a senior dermatologist.

For a source project, one adjudication project (found again by a marker in its description, so a
second ``dermassist adjudicate`` adds to it instead of making another) with the source's labeling
config. Each disputed image becomes one task: the source task's data (the image, lesion and patient
ids), plus what the adjudicator needs and what brings the answer back:

- ``dermassist_source_item`` / ``dermassist_source_task``: the adjudicated item (its annotation is
  stored as gold of that item, :mod:`backend.collection.adjudication`);
- ``dermassist_disputed`` / ``dermassist_disputed_keys``: which labels are disputed and why (posterior,
  votes); the adjudicator's answer is gold for these labels (and for any pattern marked present);
- every reader's annotation as a read-only prediction named ``reader: <email>``, with its result as the
  reader left it (choices and painted regions), so the adjudicator sees each reading and may start from
  any of them.

Webhooks of the source project are copied to the adjudication project, so its annotations come back
as they are made; ``dermassist sync --project <adjudication id>`` brings back what a webhook missed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from backend.label_studio.sdk import LabelStudioApi

logger = logging.getLogger(__name__)

#: Task data field of an adjudication task: the external id of the item it adjudicates.
SOURCE_ITEM = "dermassist_source_item"
#: Task data field: the Label Studio task it was made from.
SOURCE_TASK = "dermassist_source_task"
#: Task data field: the disputed label keys, comma-separated (the labels the adjudication decides).
DISPUTED_KEYS = "dermassist_disputed_keys"
#: Task data field: the disputed labels and why, as text the adjudicator can read.
DISPUTED = "dermassist_disputed"
#: Task data field: the dermatologist named to adjudicate.
ADJUDICATOR = "dermassist_adjudicator"
#: Task data field: the consensus run the queue came from.
RUN = "dermassist_run"
#: Marker in the adjudication project's description: ``dermassist-adjudication-of:<source project id>``.
MARKER = "dermassist-adjudication-of:"
#: The fields of a Label Studio webhook that are copied to the adjudication project.
WEBHOOK_FIELDS = ("url", "send_payload", "send_for_all_actions", "headers", "is_active", "actions")
#: Label Studio's limit on a project title.
MAX_TITLE = 50


@dataclass(frozen=True)
class AdjudicationQueue:
    """What :func:`queue_adjudication` did."""

    project: int  # the adjudication project's id
    created: bool  # made now (else found)
    added: int  # tasks added now
    already: int  # disputed items that already had a task
    webhooks: int  # webhooks copied from the source project (when created)


def reader_predictions(
    task: Mapping[str, Any], emails: Mapping[int, str] | None = None
) -> list[dict[str, Any]]:
    """Every live annotation of an exported task as a prediction named after its reader.

    Args:
        task: an exported task with its ``annotations``.
        emails: Label Studio user id -> e-mail (an export names the reader by id only).
    """
    emails = emails or {}
    predictions = []
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, Mapping) or annotation.get("was_cancelled"):
            continue
        result = annotation.get("result")
        if not isinstance(result, list) or not result:
            continue
        who = annotation.get("completed_by")
        user = who.get("id") if isinstance(who, Mapping) else who
        email = who.get("email") if isinstance(who, Mapping) else None
        name = (
            email if isinstance(email, str) and email else emails.get(user) if isinstance(user, int) else None
        )
        predictions.append({"model_version": f"reader: {name or f'user {user}'}"[:200], "result": result})
    return predictions


def disputed_text(rows: pd.DataFrame) -> str:
    """One line per disputed label: ``bcc: uncertain+no majority (posterior 0.55 for 1; votes 0:2 1:2)``."""
    return "; ".join(
        f"{r.label_key}: {r.reason} (posterior {r.posterior:.2f} for {r.value}; votes {r.votes})"
        for r in rows.itertuples(index=False)
    )


def adjudication_tasks(
    source_tasks: Sequence[Mapping[str, Any]],
    disputed: pd.DataFrame,
    adjudicator: str,
    run_id: int,
    emails: Mapping[int, str] | None = None,
) -> list[dict[str, Any]]:
    """The adjudication tasks of the disputed items (``task`` = ``ls-<source task id>``), in task order."""
    by_item = {f"ls-{t['id']}": t for t in source_tasks if isinstance(t.get("id"), int)}
    tasks = []
    for item, rows in disputed.groupby("task", sort=True):
        source = by_item.get(str(item))
        if source is None:
            continue
        data = dict(source.get("data") or {})
        data.update({SOURCE_ITEM: str(item), SOURCE_TASK: int(source["id"]), DISPUTED: disputed_text(rows),
                     DISPUTED_KEYS: ",".join(sorted(set(rows["label_key"]))), ADJUDICATOR: adjudicator,
                     RUN: int(run_id)})  # fmt: skip
        tasks.append({"data": data, "predictions": reader_predictions(source, emails)})
    return tasks


def _find_project(ls: LabelStudioApi, source_project: int) -> int | None:
    marker = f"{MARKER}{int(source_project)}"
    found: Any
    for found in ls.projects.list():
        description = getattr(found, "description", None) or ""
        if any(line.strip() == marker for line in description.splitlines()):
            return int(found.id)
    return None


def _copy_webhooks(ls: LabelStudioApi, source_project: int, project: int) -> int:
    hooks = ls._request("api/webhooks/", "GET", params={"project": int(source_project)}) or []
    copied = 0
    for hook in hooks:
        if not isinstance(hook, Mapping) or hook.get("project") != int(source_project):
            continue  # organisation-wide webhooks reach every project already
        body = {k: hook[k] for k in WEBHOOK_FIELDS if k in hook}
        ls._request("api/webhooks/", "POST", json={**body, "project": int(project)})
        copied += 1
    return copied


def queue_adjudication(
    ls: LabelStudioApi,
    source_project: int,
    source_tasks: Sequence[Mapping[str, Any]],
    disputed: pd.DataFrame,
    adjudicator: str,
    run_id: int,
) -> AdjudicationQueue:
    """Create (or find) the adjudication project of ``source_project`` and add the disputed items.

    Items that already have a task there are not added again; tasks are never removed (an item that
    is no longer disputed keeps its task, and its adjudication still counts).

    Raises:
        label_studio_sdk.core.api_error.ApiError: Label Studio refused a call.
    """
    project = _find_project(ls, source_project)
    created = project is None
    webhooks = 0
    if project is None:
        source = ls.projects.get(source_project)
        title = f"Adjudication: {source.title or source_project}"[:MAX_TITLE]
        made = ls.projects.create(
            title=title,
            label_config=ls.label_config(source_project),
            description=f"Disputed images of project {source_project} for {adjudicator}.\n"
            f"{MARKER}{int(source_project)}",
        )
        project = int(made.id)  # type: ignore[arg-type]
        webhooks = _copy_webhooks(ls, source_project, project)
    existing = {
        t.get("data", {}).get(SOURCE_ITEM)
        for t in ls.export_tasks(project)
        if isinstance(t.get("data"), Mapping)
    }
    emails = {int(u.id): str(u.email) for u in ls.users.list() if u.id is not None and u.email}
    tasks = [
        t
        for t in adjudication_tasks(source_tasks, disputed, adjudicator, run_id, emails)
        if t["data"][SOURCE_ITEM] not in existing
    ]
    if tasks:
        ls._request(f"api/projects/{project}/import", "POST", json=tasks)
    already = len(set(disputed["task"].astype(str)) & existing)
    logger.info("adjudication project %d: %d tasks added, %d already there", project, len(tasks), already)
    return AdjudicationQueue(project, created, len(tasks), int(already), webhooks)
