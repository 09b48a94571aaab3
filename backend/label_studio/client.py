"""A small Label Studio API client: both token kinds, JSON in and out, clear errors, no secrets in logs.

Label Studio 1.23 accepts two kinds of key (../shared/docs/label-studio.md, "Auth"):

- a legacy token (40 hex characters): ``Authorization: Token <key>``;
- a personal access token (a JWT): exchanged at ``POST /api/token/refresh/`` for an access token that
  lives 300 s, sent as ``Authorization: Bearer <access>``; refreshed before it expires and once more
  on a 401.
"""

from __future__ import annotations

import json
import mimetypes
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ACCESS_TOKEN_LIFETIME_S = 240.0  # Label Studio's access tokens live 300 s


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a request; the message says which and why."""


def is_personal_access_token(key: str) -> bool:
    """A JWT (three dot-separated parts) rather than a legacy 40-character token."""
    return key.count(".") == 2


class LabelStudioAuth:
    """The ``Authorization`` header for a Label Studio key, refreshing personal access tokens."""

    def __init__(self, url: str, key: str, timeout: float = 20.0) -> None:
        self.url = url.rstrip("/")
        self._key = key
        self._timeout = timeout
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LabelStudioAuth(url={self.url!r}, key=<set>)"

    def header(self, refresh: bool = False) -> str:
        """The header value; ``refresh=True`` forces a new access token (after a 401)."""
        if not is_personal_access_token(self._key):
            return f"Token {self._key}"
        with self._lock:
            if refresh or self._access is None or time.monotonic() >= self._expires:
                self._access = self._refresh()
                self._expires = time.monotonic() + ACCESS_TOKEN_LIFETIME_S
            return f"Bearer {self._access}"

    def _refresh(self) -> str:
        body = json.dumps({"refresh": self._key}).encode()
        request = urllib.request.Request(
            f"{self.url}/api/token/refresh/",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                access = json.loads(response.read()).get("access")
        except urllib.error.HTTPError as exc:
            raise LabelStudioError(
                f"Label Studio refused the personal access token (HTTP {exc.code}): "
                "check LABEL_STUDIO_API_KEY (Account & Settings > Personal Access Token)"
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            raise LabelStudioError(f"could not refresh the access token at {self.url}: {exc}") from None
        if not isinstance(access, str) or not access:
            raise LabelStudioError("Label Studio's token refresh answered without an access token")
        return access


class LabelStudioClient:
    """``get_json`` against the Label Studio API with the right auth header."""

    def __init__(self, url: str, key: str, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"LABEL_STUDIO_URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.auth = LabelStudioAuth(self.url, key, timeout=min(timeout, 20.0))
        self.timeout = timeout

    def get_json(self, path: str) -> Any:
        """GET ``path`` (starting with /api/) and decode its JSON.

        Raises:
            LabelStudioError: unreachable, a non-2xx answer (after one token refresh on 401), or not JSON.
        """
        return self.request("GET", path)

    def post_json(self, path: str, body: Any) -> Any:
        """POST a JSON body to ``path`` and decode the answer (None when empty)."""
        return self.request("POST", path, json.dumps(body).encode(), "application/json")

    def request(
        self, method: str, path: str, data: bytes | None = None, content_type: str | None = None
    ) -> Any:
        """One API call with the right auth header; its JSON answer decoded (None when empty).

        Raises:
            LabelStudioError: unreachable, a non-2xx answer (after one token refresh on 401), or not JSON.
        """
        payload = b""
        for attempt in range(2):
            headers = {"Authorization": self.auth.header(refresh=attempt > 0), "Accept": "application/json"}
            if content_type:
                headers["Content-Type"] = content_type
            request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 0:
                    continue
                detail = exc.read()[:300].decode("utf-8", errors="replace")
                raise LabelStudioError(
                    f"Label Studio answered HTTP {exc.code} to {method} {path}: {detail}"
                ) from None
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                raise LabelStudioError(f"could not reach Label Studio at {self.url}: {exc}") from None
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise LabelStudioError(f"{method} {path} did not answer JSON") from None

    def import_files(self, project: int, files: Sequence[Path], batch: int = 50) -> list[Any]:
        """Upload image files as tasks, in batches (Django refuses more than 100 files per request), each
        file in its own multipart field (Label Studio keeps one file per field name)."""
        answers = []
        for start in range(0, len(files), batch):
            boundary = f"dermassist-{uuid.uuid4().hex}"
            parts: list[bytes] = []
            for i, path in enumerate(files[start : start + batch]):
                kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                head = (
                    f"--{boundary}\r\n"
                    f'Content-Disposition: form-data; name="file{i}"; filename="{path.name}"\r\n'
                    f"Content-Type: {kind}\r\n\r\n"
                )
                parts.append(head.encode() + path.read_bytes() + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            kind = f"multipart/form-data; boundary={boundary}"
            answers.append(self.request("POST", f"/api/projects/{project}/import", body, kind))
        return answers

    def export(self, project: int) -> list[dict[str, Any]]:
        """Every task of a project with its annotations (Label Studio's JSON export)."""
        tasks = self.get_json(f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=true")
        if not isinstance(tasks, list):
            raise LabelStudioError(f"the export of project {project} is not a list of tasks")
        return tasks

    def label_config(self, project: int) -> str:
        """The project's labeling config XML."""
        data = self.get_json(f"/api/projects/{project}/")
        config = data.get("label_config") if isinstance(data, dict) else None
        if not isinstance(config, str):
            raise LabelStudioError(f"project {project} has no label_config")
        return config
