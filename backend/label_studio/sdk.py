"""label-studio-sdk's client, with the URL for messages and the few calls this project needs that it lacks.

Made by :func:`backend.label_studio.client.connect`, which checks the URL and the key and maps errors;
use every SDK call as documented (``ls.projects.create(...)``, ``ls.tasks.list(project=...)``,
``ls.annotations.create(...)``, ``ls.ml.train(...)``) inside
:func:`backend.label_studio.client.label_studio_errors`. What is added here:

- :meth:`LabelStudioApi.export_tasks`: the project's JSON export with every task (the SDK's own
  ``exports.as_json`` also downloads the media files);
- :meth:`LabelStudioApi.label_config`: the project's labeling config;
- :meth:`LabelStudioApi.upload_files`: image files as tasks, a multipart upload the SDK has no call for
  (its ``import_tasks`` sends JSON only); it goes through the SDK's own HTTP client, so the auth, the
  token refresh and the retries are the SDK's;
- :meth:`LabelStudioApi.tasks_page`: one page of the data manager's task list as Label Studio's own JSON
  (the SDK's typed tasks drop the columns a filter computes, such as ``predictions_model_versions``);
- :meth:`LabelStudioApi.model_version_counts`: the model versions of a project's predictions;
- :meth:`LabelStudioApi.task_view`: a data manager tab that shows given tasks (made, or updated in
  place when the project has a tab of that title).

The client owns one ``httpx.Client``: close it (``with connect(...) as ls:``) when done.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError


class LabelStudioApi(LabelStudio):
    """label-studio-sdk's ``LabelStudio`` client for one server and key.

    Args:
        url: the server (a path prefix is kept).
        key: a legacy token or a personal access token.
        timeout: seconds for each request.

    Raises:
        label_studio_sdk.core.api_error.ApiError: a personal access token that expired (the SDK checks).
    """

    def __init__(self, url: str, key: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        # One connection per request: Label Studio's own server (``label-studio start``) answers a
        # kept-alive connection ~45 ms late per request (its small writes wait for the client's delayed
        # ACK); measured 72 ms vs 28 ms per annotation. A new loopback or LAN connection costs far less.
        self._http = httpx.Client(
            timeout=timeout, follow_redirects=True, limits=httpx.Limits(max_keepalive_connections=0)
        )
        try:
            # The trailing slash keeps a path prefix in the SDK's token refresh URL (it uses urljoin).
            super().__init__(  # type: ignore[no-untyped-call]  # the SDK's subclass takes **kwargs
                base_url=f"{self.url}/", api_key=key, httpx_client=self._http
            )
        except BaseException:
            self._http.close()
            raise

    def __repr__(self) -> str:
        return f"LabelStudioApi(url={self.url!r})"

    def close(self) -> None:
        """Close the connections this client holds."""
        self._http.close()

    def __enter__(self) -> LabelStudioApi:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def label_config(self, project: int) -> str:
        """The project's labeling config XML.

        Raises:
            ApiError: the project has no labeling config (or Label Studio refused the call).
        """
        config = self.projects.get(project).label_config
        if not isinstance(config, str) or not config:
            raise ApiError(status_code=None, body={"detail": f"project {project} has no label_config"})
        return config

    def export_tasks(self, project: int) -> list[dict[str, Any]]:
        """Every task of a project with its annotations (Label Studio's JSON export, all tasks).

        Raises:
            ApiError: the export is not a list of tasks (or Label Studio refused the call).
        """
        body = b"".join(
            self.projects.exports.download_sync(project, export_type="JSON", download_all_tasks=True)
        )
        tasks = json.loads(body)
        if not isinstance(tasks, list):
            raise ApiError(
                status_code=None, body={"detail": f"the export of project {project} is not a list"}
            )
        return tasks

    def _request(self, path: str, method: str, **kwargs: Any) -> Any:
        """One call through the SDK's own HTTP client (its base URL, auth, token refresh and retries);
        the answer's JSON body, or ApiError for a status that is not 2xx."""
        response = self._client_wrapper.httpx_client.request(path, method=method, **kwargs)
        try:
            body = response.json() if response.content else None
        except json.JSONDecodeError:
            body = response.text
        if not 200 <= response.status_code < 300:
            raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=body)
        return body

    def tasks_page(
        self,
        project: int,
        filters: list[dict[str, Any]],
        page_size: int,
        fields: str = "task_only",
        ordering: str = "tasks:id",
    ) -> tuple[list[dict[str, Any]], int]:
        """The first ``page_size`` tasks of ``project`` that pass ``filters`` (all of them, the data
        manager's filter items), in ``ordering``, and how many pass in all.

        Raises:
            ApiError: Label Studio refused the call or answered something that is not a task list.
        """
        query = {"filters": {"conjunction": "and", "items": filters}, "ordering": [ordering]}
        params = {
            "project": int(project),
            "query": json.dumps(query),
            "fields": fields,
            "page": 1,
            "page_size": int(page_size),
        }
        body = self._request("api/tasks/", "GET", params=params)
        tasks = body.get("tasks") if isinstance(body, dict) else None
        if not isinstance(tasks, list):
            raise ApiError(
                status_code=None, body={"detail": f"the task list of project {project} is not a list"}
            )
        return tasks, int(body.get("total") or 0)

    def task_view(self, project: int, title: str, task_ids: Sequence[int], ordering: str = "tasks:id") -> int:
        """A data manager tab of ``project`` titled ``title`` that shows exactly ``task_ids`` (none: an
        empty tab), in ``ordering``; the project's tab of that title is updated rather than repeated.
        Its id.

        Raises:
            ApiError: Label Studio refused the call.
        """
        ids = [int(t) for t in task_ids] or [0]  # no task has id 0: an empty tab
        data = {
            "title": title,
            "filters": {
                "conjunction": "or",
                "items": [
                    {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": task}
                    for task in ids
                ],
            },
            "ordering": [ordering],
        }
        views = self._request("api/dm/views/", "GET", params={"project": int(project)}) or []
        found = next(
            (v for v in views if isinstance(v, dict) and (v.get("data") or {}).get("title") == title), None
        )
        if found is not None:
            view = self._request(f"api/dm/views/{int(found['id'])}/", "PATCH", json={"data": data})
        else:
            view = self._request("api/dm/views/", "POST", json={"project": int(project), "data": data})
        return int(view["id"])

    def model_version_counts(self, project: int) -> dict[str, int]:
        """The model versions of the project's predictions, with how many predictions each has."""
        body = self._request(f"api/projects/{int(project)}/model-versions/", "GET")
        return {str(k): int(v) for k, v in body.items()} if isinstance(body, dict) else {}

    def upload_files(self, project: int, files: Sequence[Path], batch: int = 50) -> list[Any]:
        """Upload image files as tasks of ``project``: ``POST /api/projects/{id}/import``, multipart.

        Files go in batches (Django refuses more than 100 files per request), each in its own field
        (Label Studio keeps one file per field name).

        Returns:
            Label Studio's answer for each batch.

        Raises:
            ApiError: Label Studio refused a batch.
        """
        answers = []
        for start in range(0, len(files), batch):
            fields: dict[str, Any] = {
                f"file{i}": (
                    path.name,
                    path.read_bytes(),
                    mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                )
                for i, path in enumerate(files[start : start + batch])
            }
            answers.append(self._request(f"api/projects/{int(project)}/import", "POST", files=fields))
        return answers
