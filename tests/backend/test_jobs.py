"""Retraining: webhook -> store -> consensus -> training job (child process) -> promotion -> /predict.

A tiny model (MobileNet-V2 x0.35 at 64 px) and a 40-image synthetic study keep it within CI time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from sqlalchemy import select

import backend.serving.holder as holder_module
from backend.serving import registry
from backend.training import jobs
from backend.training.policy import should_retrain
from backend.training.retrain import lost_outputs
from backend.training.training_set import is_validation
from consensus.models import Annotation, JobStatus, ModelStatus, ModelVersion, TrainingJob
from tests.backend.conftest import with_settings
from tests.backend.study_events import BCC_XML, study_tasks, webhook_events


def job_row(sessions, job_id: int) -> TrainingJob:
    with sessions() as session:
        row = session.get(TrainingJob, job_id)
        assert row is not None
        return row


@pytest.fixture
def annotated(client, image_server, small_study):
    _, files = image_server
    tasks = study_tasks(small_study, files)
    for event in webhook_events(tasks):
        assert client.post("/webhook", json=event).status_code == 200
    return tasks


def test_webhooks_to_a_promoted_model_that_the_next_predict_serves(
    client, sessions, settings, annotated, promoted, monkeypatch
):
    monkeypatch.setattr(holder_module, "PROMOTED_CHECK_S", 0.0)
    fast = with_settings(settings, train_epochs=2)
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).get_json()
    job_id = response["job"]["id"]
    assert jobs.supervise(fast, job_id, sessions) is JobStatus.SUCCEEDED
    job = job_row(sessions, job_id)
    assert job.version and job.version != promoted and job.log
    with sessions() as session:
        versions = {v.version: v for v in session.scalars(select(ModelVersion))}
        assert versions[job.version].parent == promoted
        assert versions[job.version].consensus_run_id is not None
        metrics = versions[job.version].metrics
        assert metrics["candidate"]["n_validation"] > 0 and metrics["promoted_before"]["val_loss"] > 0
        new_version = registry.promoted(session).version  # type: ignore[union-attr]
    if job.promoted:
        assert new_version == job.version and versions[promoted].status is ModelStatus.RETIRED
    else:  # worse on the fixed validation split: recorded, never served
        assert new_version == promoted and versions[job.version].status is ModelStatus.REJECTED
    task = {"id": 1, "data": {"image": annotated[0]["data"]["image"]}}
    body = client.post("/predict", json={"tasks": [task], "label_config": BCC_XML}).get_json()
    assert body["results"][0]["model_version"] == new_version
    assert client.post("/setup", json={"schema": BCC_XML}).get_json()["model_version"] == new_version


def test_killing_a_running_job_fails_it_and_leaves_the_served_model(
    client, sessions, settings, annotated, promoted
):
    slow = with_settings(settings, train_epochs=500)
    job, _ = jobs.request_training(sessions, "cli", {"patience": 500})
    statuses: list[JobStatus] = []
    thread = threading.Thread(target=lambda: statuses.append(jobs.supervise(slow, job.id, sessions)))
    thread.start()
    history = settings.model_dir / "jobs" / str(job.id) / "history.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not history.exists():  # killed mid-training, after an epoch
        time.sleep(0.2)
    assert history.exists(), "the job never finished its first epoch"
    store_before = annotations_snapshot(sessions)
    row = job_row(sessions, job.id)
    assert row.status is JobStatus.RUNNING and row.pid
    os.kill(row.pid, signal.SIGKILL)
    thread.join(60)
    assert statuses == [JobStatus.FAILED]
    failed = job_row(sessions, job.id)
    assert failed.status is JobStatus.FAILED and "SIGKILL" in (failed.error or "")
    with sessions() as session:
        assert registry.promoted(session).version == promoted  # type: ignore[union-attr]
        assert len(session.scalars(select(ModelVersion)).all()) == 1, "no half-trained version was registered"
    assert annotations_snapshot(sessions) == store_before, "the readings are as they were"
    assert client.get("/health").get_json()["model_version"] == promoted
    # the next trigger works
    again, created = jobs.request_training(sessions, "cli", {"epochs": 1})
    assert created and again.id != job.id
    assert jobs.supervise(settings, again.id, sessions) is JobStatus.SUCCEEDED


def annotations_snapshot(sessions: Any) -> list[tuple[Any, ...]]:
    with sessions() as session:
        rows = session.scalars(select(Annotation).order_by(Annotation.id))
        return [(a.id, a.item_id, a.rater_id, a.diagnosis, a.labels, a.deleted, a.updated_at) for a in rows]


def test_interrupted_jobs_are_marked_failed_on_start(sessions):
    job, _ = jobs.request_training(sessions, "cli")
    assert jobs.claim(sessions, job.id, pid=2**22 + 12345)  # a pid that does not exist
    assert jobs.recover_interrupted(sessions) == [job.id]
    assert job_row(sessions, job.id).status is JobStatus.FAILED
    nxt, created = jobs.request_training(sessions, "cli")
    assert created and nxt.id != job.id


def test_one_job_runs_at_a_time_and_triggers_coalesce(sessions):
    first, created = jobs.request_training(sessions, "START_TRAINING")
    assert created and jobs.claim(sessions, first.id)
    second, created = jobs.request_training(sessions, "updates")
    assert created  # one may queue while one runs
    third, created = jobs.request_training(sessions, "START_TRAINING")
    assert not created and third.id == second.id and third.triggers == 2
    assert not jobs.claim(sessions, second.id)  # first still running
    jobs.finish(sessions, first.id, JobStatus.SUCCEEDED)
    assert jobs.claim(sessions, second.id)


def test_validation_split_is_fixed():
    ids = [f"ls-{i}" for i in range(1000)]
    chosen = [i for i in ids if is_validation(i)]
    assert 150 < len(chosen) < 250
    assert chosen == [i for i in ids if is_validation(i)]


def test_n_new_annotated_items_queue_a_job(settings, sessions, promoted, small_study):
    from backend.api.app import create_app

    client = create_app(
        with_settings(settings, start_training_each_n_updates=3), sessions=sessions
    ).test_client()
    events = webhook_events(study_tasks(small_study, None, limit=3))
    for event in events[:4]:  # the first rater-annotations of tasks 1 and 2: not yet three items
        client.post("/webhook", json=event)
    time.sleep(0.5)
    with sessions() as session:
        assert session.scalars(select(TrainingJob)).all() == []
    for event in events[4:]:
        client.post("/webhook", json=event)
    deadline = time.monotonic() + 10
    jobs_found: list[TrainingJob] = []
    while time.monotonic() < deadline and not jobs_found:
        with sessions() as session:
            jobs_found = list(session.scalars(select(TrainingJob)))
        time.sleep(0.1)
    assert len(jobs_found) == 1 and jobs_found[0].trigger == "updates"


def test_with_redis_jobs_go_to_the_rq_queue(settings, sessions, promoted):
    redis = pytest.importorskip("redis")
    from rq import Queue

    from backend.api.app import create_app

    url = "redis://127.0.0.1:6379/15"
    connection = redis.Redis.from_url(url)
    try:
        connection.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    queue = Queue(jobs.RQQueue.name, connection=connection)
    queue.empty()
    try:
        client = create_app(with_settings(settings, redis_url=url), sessions=sessions).test_client()
        body = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).get_json()
        client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})  # coalesced
        assert queue.count == 1
        (rq_job,) = queue.jobs
        assert rq_job.args == (body["job"]["id"],) and rq_job.func_name == "backend.training.jobs.rq_entry"
    finally:
        queue.empty()
        connection.close()


def test_train_from_db_on_an_imported_study(tmp_path, small_study, capsys):
    import pandas as pd

    from backend.cli import main

    database = f"sqlite:///{tmp_path / 's.sqlite'}"
    from consensus.db import init_db
    from consensus.repository import import_ratings

    _, factory = init_db(database)
    with factory.begin() as session:
        import_ratings(session, pd.read_csv(small_study / "ratings.csv"))
    code = main(
        ["-q", "train", "--from-db", "--images", str(small_study), "--db", database,
         "--model-dir", str(tmp_path / "models"), "--epochs", "1", "--image-size", "64"]
    )  # fmt: skip
    assert code == 0
    assert "promoted" in capsys.readouterr().out
    with factory() as session:
        assert registry.promoted(session) is not None


def test_a_retrained_model_that_loses_a_validated_output_is_not_promoted(
    client, sessions, settings, annotated, promoted, monkeypatch
):
    """The served model's BCC output is validated (as the release's is); the 40-image study's fixed
    validation split has far fewer than 20 BCC positives, so the candidate cannot validate it and must
    not replace the served model, whatever its loss. Its own provenance is recorded in the store."""
    from model.common.provenance import record

    with sessions() as session:
        served = registry.promoted(session)
        assert served is not None
        for row in served.outputs:
            if row.output == "bcc":
                row.status, row.metric, row.value = "validated", "auroc", 0.97
        session.commit()
    fast = with_settings(settings, train_epochs=1)
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).get_json()
    job_id = response["job"]["id"]
    assert jobs.supervise(fast, job_id, sessions) is JobStatus.SUCCEEDED
    job = job_row(sessions, job_id)
    assert not job.promoted and "would no longer be validated" in job.log and "bcc" in job.log
    with sessions() as session:
        assert registry.promoted(session).version == promoted  # type: ignore[union-attr]
        candidate = session.scalars(select(ModelVersion).where(ModelVersion.version == job.version)).one()
        outputs = registry.provenance(candidate)
        # images served over HTTP are real as far as the job knows: too few positives, not synthetic
        assert outputs["bcc"]["status"] == "unvalidated" and outputs["bcc"]["n_positive"] < 20
        assert "this project's consensus" in outputs["bcc"]["data"]
    assert lost_outputs(
        {"a": record("validated"), "b": record("untrained")}, {"a": record("unvalidated")}
    ) == ["a"]
    assert lost_outputs({"a": record("validated")}, {"a": record("validated")}) == []


@pytest.mark.parametrize(
    ("changed", "every_n", "expected"),
    [(0, 5, False), (4, 5, False), (5, 5, True), (50, 5, True), (50, 0, False)],
)
def test_the_retraining_policy_is_a_pure_rule(changed, every_n, expected):
    assert should_retrain(changed, every_n) is expected


def test_images_of_one_lesion_or_one_patient_fall_on_one_side_of_the_split():
    """Task data's lesion_id groups a lesion's images, patient_id a patient's lesions: never on both
    sides of the validation split. Without them each image is its own lesion, as before."""
    from backend.training.training_set import lesion_group

    assert lesion_group("ls-7", {}) == ("ls-7", "ls-7")
    assert lesion_group("ls-7", None) == ("ls-7", "ls-7")
    assert lesion_group("ls-7", {"lesion_id": "HAM_0001"}) == ("lesion:HAM_0001", "lesion:HAM_0001")
    assert lesion_group("ls-7", {"lesion_id": 12, "patient_id": "p3"}) == ("lesion:12", "patient:p3")
    for junk in ("", "   ", True, None, 1.5, ["x"], {"a": 1}, "x" * 201):
        assert lesion_group("ls-7", {"lesion_id": junk, "patient_id": junk}) == ("ls-7", "ls-7")
    # 300 images of 60 lesions of 20 patients: each lesion and each patient on one side, both sides used.
    images = [(f"ls-{i}", {"lesion_id": f"L{i // 5}", "patient_id": f"P{i // 15}"}) for i in range(300)]
    sides_of_lesion: dict[str, set[bool]] = {}
    sides_of_patient: dict[str, set[bool]] = {}
    for external_id, data in images:
        lesion, key = lesion_group(external_id, data)
        side = is_validation(key)
        sides_of_lesion.setdefault(lesion, set()).add(side)
        sides_of_patient.setdefault(data["patient_id"], set()).add(side)
    assert all(len(sides) == 1 for sides in sides_of_lesion.values())
    assert all(len(sides) == 1 for sides in sides_of_patient.values())
    assert {side for sides in sides_of_patient.values() for side in sides} == {True, False}
