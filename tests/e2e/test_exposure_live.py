"""AI exposure against a real Label Studio 1.23.2: a blind project and an AI-assisted project over the
same images, two readers, the webhooks Label Studio really sends and its real export, into the store;
the study export pairs each reader's two reads of an image.

No backend process: Label Studio's webhooks go to a small recorder on loopback and are ingested here
(the same code as ``/webhook``), so the test sees exactly what Label Studio sent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from backend.collection.ingest import ingest_webhook
from backend.collection.sync import sync_project
from backend.demo.study import create_raters, wait_for
from backend.label_studio.sdk import LabelStudioApi
from consensus.db import init_db
from consensus.models import Annotation
from labeling_config import load_config
from labeling_config.parse import parse_config

BCC_XML = load_config("bcc")
CONFIG = parse_config(BCC_XML)
VERSION = "dermnet-live-exposure"
N_IMAGES = 4


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback HTTP server that keeps every JSON body posted to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/webhook", received
    finally:
        server.shutdown()
        server.server_close()


def _choice(value: str) -> list[dict[str, Any]]:
    return [{"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [value]}}]


def test_blind_and_assisted_reads_from_label_studio_are_stored_and_paired(
    ls: LabelStudioApi, recorder: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    from consensus.export import build_study
    from consensus.service import run_consensus

    url, received = recorder
    projects = {}
    for name in ("blind", "assisted"):
        project = ls.projects.create(title=f"exposure {name}", label_config=BCC_XML).id
        assert project is not None
        ls.webhooks.create(url=url, project=project, send_payload=True, send_for_all_actions=True)
        tasks = []
        for i in range(N_IMAGES):
            task: dict[str, Any] = {
                "data": {"image": f"/data/local-files/?d=s/ISIC_{i}.jpg", "image_id": f"I{i}"}
            }
            if name == "assisted":  # the model says BCC on odd images
                said = "BCC" if i % 2 else "non-BCC"
                task["predictions"] = [{"result": _choice(said), "model_version": VERSION, "score": 0.8}]
            tasks.append(task)
        ls.projects.import_tasks(id=project, request=tasks)
        projects[name] = project
    readers = create_raters(ls, ["exp-r1", "exp-r2"], domain="exposure.example")

    for name, project in projects.items():
        page = ls._request("api/tasks/", "GET", params={"project": project, "page_size": 100})
        for task in page["tasks"] if isinstance(page, dict) else page:
            i = int(task["data"]["image_id"][1:])
            predictions = ls._request("api/predictions/", "GET", params={"task": task["id"]})
            for reader in readers:
                if name == "assisted":  # the reader keeps what the model said
                    body = {"result": predictions[0]["result"], "parent_prediction": predictions[0]["id"]}
                else:  # blind: BCC on the first half of the images
                    body = {"result": _choice("BCC" if i < N_IMAGES // 2 else "non-BCC")}
                ls._request(
                    f"api/tasks/{task['id']}/annotations/", "POST", json={**body, "completed_by": reader}
                )

    n_reads = 2 * N_IMAGES * len(readers)
    created = wait_for(
        lambda: (
            found
            if len(found := [e for e in received if e.get("action") == "ANNOTATION_CREATED"]) == n_reads
            else None
        ),
        30,
        "every annotation's webhook",
    )
    engine, sessions = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    try:
        for event in created:
            _, refused = ingest_webhook(sessions, event, lambda _project, _obj: CONFIG)
            assert refused is None
        with sessions() as session:
            stored = session.scalars(select(Annotation)).all()
            assisted = [a for a in stored if a.parent_prediction is not None]
            assert len(stored) == n_reads and len(assisted) == n_reads // 2
            # The webhook carried the prediction: its version and what it showed are stored.
            assert {a.parent_model_version for a in assisted} == {VERSION}
            assert all(
                a.parent_labels is not None and a.parent_labels["bcc"] == a.labels["bcc"] for a in assisted
            )

        # Label Studio's own export, synced: it agrees with what the webhooks stored.
        for project in projects.values():
            summary = sync_project(sessions, project, ls.export_tasks(project), CONFIG)
            assert (summary.created, summary.changed, summary.errors) == (0, 0, 0)

        with sessions.begin() as session:
            run_consensus(session)
        with sessions() as session:
            study = build_study(session)
    finally:
        engine.dispose()
    assert study.exposure_summary == {
        "reads": n_reads, "assisted": n_reads // 2, "unassisted": n_reads // 2, "blind": n_reads // 2,
        "assisted_without_prediction_labels": 0, "model_versions": [VERSION], "pairs": N_IMAGES * len(readers),
    }  # fmt: skip
    bcc = study.exposure.set_index(["label_key", "arm"]).loc["bcc"]
    assert bcc.loc["assisted", "agree_prediction"] == 1.0 and bcc.loc["unassisted", "agree_prediction"] == 0.5
    pairs = study.paired[study.paired["label_key"] == "bcc"]
    assert pairs["paired"].all() and set(pairs["image"]) == {f"id:I{i}" for i in range(N_IMAGES)}
