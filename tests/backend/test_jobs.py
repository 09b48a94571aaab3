"""Retraining: webhook -> store -> consensus -> training job (child process) -> promotion -> /predict.

A tiny model (MobileNet-V2 x0.35 at 64 px) and a 40-image synthetic study keep it within CI time.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import select

import backend.app as app_module
from backend import jobs, registry
from consensus.models import JobStatus, ModelStatus, ModelVersion, TrainingJob
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
    monkeypatch.setattr(app_module, "PROMOTED_CHECK_S", 0.0)
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
    row = job_row(sessions, job.id)
    assert row.status is JobStatus.RUNNING and row.pid
    os.kill(row.pid, signal.SIGKILL)
    thread.join(60)
    assert statuses == [JobStatus.FAILED]
    failed = job_row(sessions, job.id)
    assert failed.status is JobStatus.FAILED and "SIGKILL" in (failed.error or "")
    with sessions() as session:
        assert registry.promoted(session).version == promoted  # type: ignore[union-attr]
    assert client.get("/health").get_json()["model_version"] == promoted
    # the next trigger works
    again, created = jobs.request_training(sessions, "cli", {"epochs": 1})
    assert created and again.id != job.id
    assert jobs.supervise(settings, again.id, sessions) is JobStatus.SUCCEEDED


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
    chosen = [i for i in ids if jobs.is_validation(i)]
    assert 150 < len(chosen) < 250
    assert chosen == [i for i in ids if jobs.is_validation(i)]
