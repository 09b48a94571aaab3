"""AI exposure: the prediction each annotation started from (``parent_prediction``), stored from webhooks
and syncs alike, on SQLite and PostgreSQL; replays idempotent, bad values refused, never a 5xx.

The payloads have the shapes a live Label Studio 1.23.2 sent (checked with a probe, and by
tests/e2e/test_exposure_live.py where Label Studio is installed): the annotation carries
``parent_prediction`` (an id, or null) and ``prediction``, the full prediction object of the task
(also when the annotation did not start from it); a webhook's task has no ``predictions``; an export's
task lists its predictions by id.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from backend.collection.ingest import ingest_webhook
from backend.collection.sync import sync_project
from consensus.db import init_db
from consensus.models import Annotation, AnnotationEvent
from labeling_config import load_config
from labeling_config.parse import parse_config

CONFIG = parse_config(load_config("bcc"))
VERSION = "dermnet-bcc-3f2a9c1e"


def resolve(_project: int | None, _obj: Any) -> Any:
    return CONFIG


def prediction(prediction_id: int = 17, task: int = 3, version: str = VERSION) -> dict[str, Any]:
    """A prediction as Label Studio 1.23 exports it: dermassist's result items (BCC, two patterns, one
    brush region) with their scores, and Label Studio's own fields."""
    return {
        "id": prediction_id,
        "result": [
            {"from_name": "diagnosis", "to_name": "image", "type": "choices",
             "value": {"choices": ["BCC"]}, "score": 0.91},
            {"from_name": "patterns", "to_name": "image", "type": "choices",
             "value": {"choices": ["Ulceration", "Arborizing telangiectasia"]}, "score": 0.74},
            {"from_name": "regions", "to_name": "image", "type": "brushlabels", "original_width": 4,
             "original_height": 4, "image_rotation": 0,
             "value": {"format": "rle", "rle": [0, 1, 2], "brushlabels": ["Ulceration"]}, "score": 0.74},
        ],
        "model_version": version,
        "created_ago": "2 hours",
        "score": 0.91,
        "cluster": None,
        "neighbors": None,
        "mislabeling": 0.0,
        "created_at": "2026-11-20T08:00:00.000000Z",
        "updated_at": "2026-11-20T08:00:00.000000Z",
        "model": None,
        "model_run": None,
        "task": task,
        "project": 1,
    }  # fmt: skip


def annotation(
    parent: Any = 17,
    choice: str = "non-BCC",
    updated_at: str = "2026-11-20T10:00:00.000000Z",
    seen: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An annotation as Label Studio 1.23 sends it (webhook and export): the reader changed the
    prediction's BCC to ``choice`` and kept no pattern. ``prediction`` is the task's prediction
    (``seen``; default the one with id ``parent``, none for a blank start)."""
    if seen is None:
        seen = prediction(parent) if isinstance(parent, int) and not isinstance(parent, bool) else {}
    return {
        "id": 41,
        "result": [
            {"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": [choice]},
             "origin": "prediction-changed"},
        ],
        "created_username": " derm@example.org, 5",
        "created_ago": "0 minutes",
        "completed_by": 5,
        "was_cancelled": False,
        "ground_truth": False,
        "created_at": "2026-11-20T10:00:00.000000Z",
        "updated_at": updated_at,
        "draft_created_at": None,
        "lead_time": 12.4,
        "import_id": None,
        "last_action": "prediction",
        "bulk_created": False,
        "task": 3,
        "project": 1,
        "updated_by": 5,
        "prediction": seen,
        "parent_prediction": parent,
        "parent_annotation": None,
        "last_created_by": None,
        **extra,
    }  # fmt: skip


def webhook_task(predictions: list[Any] | None = None) -> dict[str, Any]:
    """A webhook's task: Label Studio 1.23 sends counts, not the predictions (``predictions``: the
    list other versions or other exports give, objects or ids)."""
    task: dict[str, Any] = {
        "id": 3, "data": {"image": "/data/upload/1/a.png"}, "meta": {}, "is_labeled": True, "overlap": 1,
        "inner_id": 3, "total_annotations": 1, "cancelled_annotations": 0, "total_predictions": 1,
        "project": 1, "updated_by": 5, "file_upload": 2,
    }  # fmt: skip
    if predictions is not None:
        task["predictions"] = predictions
    return task


def event(
    body: dict[str, Any], task: dict[str, Any] | None = None, action: str = "ANNOTATION_CREATED"
) -> dict[str, Any]:
    return {"action": action, "annotation": body, "task": task or webhook_task(), "project": {"id": 1}}


def export(body: dict[str, Any], predictions: list[Any] | None = None) -> list[dict[str, Any]]:
    """The project's JSON export: the task with its annotations and its predictions (by id in 1.23)."""
    task = {
        "id": 3,
        "annotations": [body],
        "file_upload": "a.png",
        "drafts": [],
        "predictions": [17] if predictions is None else predictions,
        "data": {"image": "/data/upload/1/a.png"},
        "meta": {},
        "project": 1,
    }
    return [task]


@pytest.fixture
def sessions(store_url: str) -> Iterator[sessionmaker[Session]]:
    engine, factory = init_db(store_url)
    yield factory
    engine.dispose()


def send(sessions: sessionmaker[Session], payload: dict[str, Any]) -> str | None:
    """Ingest one webhook event; the reason it was refused, or None."""
    _, reason = ingest_webhook(sessions, payload, resolve)
    return reason


def rows(sessions: sessionmaker[Session]) -> list[tuple[Any, ...]]:
    with sessions() as session:
        return [
            (a.parent_prediction, a.parent_model_version, a.parent_labels, a.parent_diagnosis, a.diagnosis)
            for a in session.scalars(select(Annotation))
        ]


SHOWN = {
    "bcc": 1,
    "pigment_network": 0,
    "ulceration": 1,
    "ovoid_nests": 0,
    "multiple_globules": 0,
    "maple_leaf": 0,
    "spoke_wheel": 0,
    "arborizing_telangiectasia": 1,
}


def test_a_webhook_stores_the_prediction_and_what_the_reader_saw(sessions):
    assert send(sessions, event(annotation())) is None
    assert rows(sessions) == [(17, VERSION, SHOWN, "BCC", "non-BCC")]
    # A sync of the same annotation (the export lists the task's predictions by id) changes nothing.
    summary = sync_project(sessions, 1, export(annotation()), CONFIG)
    assert (summary.created, summary.changed, summary.unchanged) == (0, 0, 1)


def test_a_blank_start_stores_no_prediction_even_where_the_task_had_one(sessions):
    # Label Studio fills "prediction" with the task's prediction whether or not the read started from it.
    assert send(sessions, event(annotation(parent=None, seen=prediction()))) is None
    body = annotation(parent=None)
    del body["parent_prediction"]  # an older Label Studio leaves the field out
    body["id"], body["completed_by"] = 42, 6
    assert send(sessions, event(body)) is None
    assert rows(sessions) == [(None, None, None, None, "non-BCC")] * 2


def test_a_payload_without_the_prediction_then_one_with_it_then_replays(sessions):
    # The annotation names its prediction but does not carry it (an empty "prediction"): the id is
    # stored, what it showed is not known.
    webhook = event(annotation(seen={}))
    assert send(sessions, webhook) is None
    assert rows(sessions) == [(17, None, None, None, "non-BCC")]
    # An export that carries it (here as the task's prediction objects, as Label Studio's documented
    # export format has them) fills it in, as a change.
    summary = sync_project(sessions, 1, export(annotation(seen={}), [prediction()]), CONFIG)
    assert (summary.created, summary.changed) == (0, 1)
    assert rows(sessions) == [(17, VERSION, SHOWN, "BCC", "non-BCC")]
    # Replays change nothing: a version naming the same prediction without it keeps what is stored.
    assert send(sessions, webhook) is None
    again = sync_project(sessions, 1, export(annotation()), CONFIG)
    assert (again.created, again.changed, again.unchanged) == (0, 0, 1)
    assert rows(sessions) == [(17, VERSION, SHOWN, "BCC", "non-BCC")]


def test_the_prediction_object_must_be_the_parent(sessions):
    # The task's prediction is another one than the read started from (since replaced): not its details.
    assert send(sessions, event(annotation(parent=17, seen=prediction(prediction_id=99)))) is None
    assert rows(sessions) == [(17, None, None, None, "non-BCC")]


def test_an_update_replaces_the_prediction(sessions):
    assert send(sessions, event(annotation())) is None
    newer = prediction(prediction_id=18, version="dermnet-bcc-77aa0102")
    newer["result"] = newer["result"][:1]  # BCC, no pattern above threshold
    update = annotation(parent=18, choice="BCC", updated_at="2026-11-20T11:00:00.000000Z", seen=newer)
    assert send(sessions, event(update, action="ANNOTATION_UPDATED")) is None
    only_bcc = {k: int(k == "bcc") for k in SHOWN}
    assert rows(sessions) == [(18, "dermnet-bcc-77aa0102", only_bcc, "BCC", "BCC")]
    # An older version arriving late is ignored, prediction and all.
    assert send(sessions, event(annotation(), action="ANNOTATION_UPDATED")) is None
    assert rows(sessions) == [(18, "dermnet-bcc-77aa0102", only_bcc, "BCC", "BCC")]


def test_a_prediction_this_config_cannot_read_keeps_the_read_without_what_it_showed(sessions):
    odd = prediction()
    odd["result"][0]["from_name"] = "old_diagnosis"  # made with another labeling config
    assert send(sessions, event(annotation(seen=odd))) is None
    assert rows(sessions) == [(17, VERSION, None, None, "non-BCC")]


BAD = {
    "text": ("17", "parent_prediction"),
    "float": (17.5, "parent_prediction"),
    "bool": (True, "parent_prediction"),
    "zero": (0, "parent_prediction"),
    "negative": (-3, "parent_prediction"),
    "2**63": (2**63, "parent_prediction"),
    "10**30": (10**30, "parent_prediction"),
    "list": ([17], "parent_prediction"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_parent_predictions_are_refused_and_kept_with_the_reason(sessions, name):
    value, named = BAD[name]
    reason = send(sessions, event(annotation(parent=value)))
    assert reason is not None and named in reason
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Annotation)) == 0
        (kept,) = session.scalars(select(AnnotationEvent)).all()
        assert kept.error == reason


@pytest.mark.parametrize("version", ["v" * 201, 12, ["a"]], ids=["201-chars", "int", "list"])
def test_a_bad_model_version_is_refused(sessions, version):
    reason = send(sessions, event(annotation(seen=prediction(version=version))))
    assert reason is not None and "model_version" in reason
    assert rows(sessions) == []


def test_a_huge_model_version_in_a_sync_is_an_error_and_the_rest_lands(sessions):
    tasks = export(annotation(seen=prediction(version="v" * 100_000)))
    blind = copy.deepcopy(tasks[0])
    blind["id"], blind["annotations"][0]["id"], blind["annotations"][0]["task"] = 4, 43, 4
    blind["annotations"][0]["parent_prediction"] = None
    summary = sync_project(sessions, 1, [*tasks, blind], CONFIG)
    assert (summary.errors, summary.created) == (1, 1)
    assert rows(sessions) == [(None, None, None, None, "non-BCC")]


def test_the_webhook_route_answers_422_not_5xx(client, sessions):
    payload = event(annotation(parent="seventeen"), webhook_task())
    payload["project"] = {"id": 1, "label_config": load_config("bcc")}
    response = client.post("/webhook", json=payload)
    assert response.status_code == 422 and "parent_prediction" in response.get_json()["message"]
    payload["annotation"]["parent_prediction"] = 17
    assert client.post("/webhook", json=payload).status_code == 200
    assert rows(sessions) == [(17, None, None, None, "non-BCC")]  # "prediction" was another's ({})


# ------------------------------------------------------------------------- a blind-first, AI-assisted study


def study_events(
    n_images: int = 12, raters: tuple[int, ...] = (5, 6, 7), carried: bool = True
) -> tuple[list[dict], list[dict]]:
    """Project 1 (blind: no predictions) and project 2 (dermassist's predictions shown) over the same
    images, as webhooks and as project 2's export. Readers take the prediction when assisted; blind,
    they say what it says on the first half of the images and the opposite on the rest.

    ``carried``: the webhooks' annotations carry the prediction (as Label Studio 1.23 sends them), or
    only name it; the export always carries it.
    """
    events, exported = [], []
    for i in range(n_images):
        said = "BCC" if i % 2 else "non-BCC"
        other = "non-BCC" if i % 2 else "BCC"
        data = {
            "image": f"/data/upload/{{project}}/0000000{i % 10}-ISIC_{i:03d}.jpg",
            "image_id": f"ISIC_{i:03d}",
        }
        shown = prediction(prediction_id=1000 + i, task=200 + i)
        shown["result"] = [{**shown["result"][0], "value": {"choices": [said]}}]
        blind_task = {"id": 100 + i, "data": {**data, "image": data["image"].format(project=1)}, "project": 1}
        assisted_task = {
            "id": 200 + i,
            "data": {**data, "image": data["image"].format(project=2)},
            "project": 2,
        }
        annotations = []
        for r in raters:
            blind = annotation(parent=None, choice=said if i < n_images // 2 else other)
            blind.update(id=10_000 + 100 * i + r, task=100 + i, completed_by=r, project=1)
            events.append({"action": "ANNOTATION_CREATED", "annotation": blind, "task": blind_task,
                           "project": {"id": 1}})  # fmt: skip
            assisted = annotation(parent=1000 + i, choice=said, seen=shown)
            assisted.update(id=20_000 + 100 * i + r, task=200 + i, completed_by=r, project=2)
            sent = assisted if carried else {**assisted, "prediction": {}}
            events.append({"action": "ANNOTATION_CREATED", "annotation": sent, "task": assisted_task,
                           "project": {"id": 2}})  # fmt: skip
            annotations.append(assisted)
        exported.append(
            {**assisted_task, "annotations": annotations, "predictions": [1000 + i], "drafts": []}
        )
    return events, exported


def test_a_study_whose_webhooks_lacked_the_predictions_says_so_until_a_sync(sessions, tmp_path):
    from consensus.export import build_study, write_report
    from consensus.service import run_consensus

    events, exported = study_events(carried=False)
    for payload in events:
        assert send(sessions, payload) is None
    with sessions.begin() as session:
        run_consensus(session)
    with sessions() as session:
        before = build_study(session)
    assert before.exposure_summary["assisted_without_prediction_labels"] == 36
    html = write_report(before, tmp_path / "before.html").read_text()
    assert "36 assisted\nread(s) lack what the prediction showed" in html
    assert sync_project(sessions, 2, exported, CONFIG).changed == 36  # the export brings what they showed
    with sessions() as session:
        assert build_study(session).exposure_summary["assisted_without_prediction_labels"] == 0


def test_a_blind_first_study_in_two_projects_exports_exposure_and_pairs(sessions, tmp_path):
    from consensus.export import build_study, to_json, write_csv, write_report
    from consensus.service import run_consensus

    events, exported = study_events()
    for payload in events:
        assert send(sessions, payload) is None
    assert sync_project(sessions, 2, exported, CONFIG).unchanged == 36  # the webhooks missed nothing
    with sessions.begin() as session:
        run_consensus(session)
    with sessions() as session:
        study = build_study(session)
    assert study.exposure_summary == {
        "reads": 72, "assisted": 36, "unassisted": 36, "blind": 36, "assisted_without_prediction_labels": 0,
        "model_versions": [VERSION], "pairs": 36,
    }  # fmt: skip

    written = {p.name: p for p in write_csv(study, tmp_path / "csv")}
    table = pd.read_csv(written["exposure.csv"]).set_index(["label_key", "arm"])
    assert table.loc[("bcc", "assisted"), "agree_prediction"] == 1.0
    assert table.loc[("bcc", "unassisted"), "agree_prediction"] == 0.5
    assert table.loc[("bcc", "assisted - unassisted"), "agree_prediction"] == pytest.approx(0.5)
    assert table.loc[("bcc", "unassisted"), "n_groups"] == 12  # one group per image (no lesion ids)
    # Against the consensus of the blind reads of each image: the assisted followed the model on the
    # half of the images where the blind consensus says otherwise.
    assert table.loc[("bcc", "unassisted"), "agree_consensus"] == 1.0
    assert table.loc[("bcc", "assisted"), "agree_consensus"] == 0.5
    # Patterns: the prediction showed none, and nobody ticked one.
    assert table.loc[("ulceration", "unassisted"), "agree_prediction"] == 1.0

    pairs = pd.read_csv(written["paired_reads.csv"])
    assert len(pairs) == 3 * 12 * 8 and pairs["paired"].all()
    bcc = pairs[pairs["label_key"] == "bcc"].set_index(["rater", "image"])
    first = bcc.loc[(bcc.index.get_level_values(0)[0], "id:ISIC_007")]
    assert (first["blind_value"], first["assisted_value"], first["prediction"]) == (0, 1, 1)
    assert (first["blind_project"], first["assisted_project"]) == (1, 2)
    assert first["blind_item"] == "ls-107" and first["consensus_item"] == "ls-107" and first["consensus"] == 0

    summary = pd.read_csv(written["paired_summary.csv"]).set_index("label_key")
    assert summary.loc["bcc", "toward_prediction"] == 1.0 and summary.loc["bcc", "n_toward_prediction"] == 18

    doc = to_json(study)["exposure"]
    assert doc["pairs"] == 36 and len(doc["by_label"]) == 3 * 8 and len(doc["paired_reads"]) == 288
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "<h2>AI exposure</h2>" in html and "36 of 72 reads started from a prediction" in html
    assert VERSION in html and "toward_prediction" in html and "No read started" not in html
