"""Whole projects pre-annotated in the background: the loop, Label Studio's side, the job table, the
route, the CLI's job.

Label Studio is played by :class:`FakeLabelStudio`, which answers the few calls the job makes as Label
Studio 1.23.2 does (measured against the live one; ``tests/e2e/test_preannotate_live.py`` runs the same
job against it): the data manager's filter "prediction model versions does not contain V" is a
substring match, a post of predictions lands whole, the task list pages by id.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from backend.label_studio.project_predictions import ProjectPredictions, versions_of
from backend.serving.preannotate import Progress, preannotate
from backend.training import preannotation
from consensus.db import init_db
from consensus.models import JobStatus, PreannotationJob, PreannotationMode
from labeling_config import load_config
from tests.backend.conftest import png_bytes

V = "dermnet-abc"


@dataclass
class FakePrediction:
    id: int
    task: int
    model_version: str
    result: list[Any] = field(default_factory=list)


class _Predictions:
    def __init__(self, ls: FakeLabelStudio) -> None:
        self.ls = ls

    def list(self, task: int) -> list[FakePrediction]:
        return [p for p in self.ls.stored if p.task == task]

    def delete(self, id: int) -> None:
        self.ls.stored = [p for p in self.ls.stored if p.id != id]


class _Projects:
    def __init__(self, ls: FakeLabelStudio) -> None:
        self.ls = ls

    def import_predictions(self, id: int, request: list[Any], request_options: Any = None) -> Any:
        assert request_options == {"max_retries": 0}  # a post is never retried
        self.ls.posts.append([int(r.task) for r in request])
        if self.ls.fail_post_after is not None and len(self.ls.posts) > self.ls.fail_post_after:
            raise RuntimeError("Label Studio went away")  # before storing anything: a batch is atomic
        for r in request:
            self.ls.add(int(r.task), r.model_version, r.result)
        return type("Created", (), {"created": len(request)})()


class FakeLabelStudio:
    """Tasks and predictions in memory, answering as Label Studio 1.23.2 does."""

    def __init__(self, n_tasks: int, image: str = "/data/upload/1/{id}.png") -> None:
        self.tasks = {i: {"id": i, "data": {"image": image.format(id=i)}} for i in range(1, n_tasks + 1)}
        self.stored: list[FakePrediction] = []
        self.posts: list[list[int]] = []
        self.fail_post_after: int | None = None
        self.predictions = _Predictions(self)
        self.projects = _Projects(self)
        self.config = load_config("bcc")

    def add(self, task: int, version: str, result: Any = ()) -> None:
        self.stored.append(FakePrediction(len(self.stored) + 10_000, task, version, list(result)))

    def versions(self, task: int) -> list[str]:
        return [p.model_version for p in self.stored if p.task == task]

    def model_version_counts(self, project: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.stored:
            counts[p.model_version] = counts.get(p.model_version, 0) + 1
        return counts

    def label_config(self, project: int) -> str:
        return self.config

    def tasks_page(
        self, project: int, filters: list[dict[str, Any]], page_size: int, fields: str = "task_only"
    ) -> tuple[list[dict[str, Any]], int]:
        matched = []
        for task_id, task in sorted(self.tasks.items()):
            keep, annotated = True, False
            for f in filters:
                if f["filter"] == "filter:tasks:id":
                    assert f["operator"] == "greater"
                    keep &= task_id > f["value"]
                elif f["filter"] == "filter:tasks:predictions_model_versions":
                    annotated = True
                    hit = any(v in pv for v in f["value"] for pv in self.versions(task_id))  # substring
                    keep &= hit if f["operator"] == "contains" else not hit
            if keep:
                row = dict(task)
                if annotated or fields == "all":
                    row["predictions_model_versions"] = ",".join(self.versions(task_id))
                if fields == "all":
                    row["predictions"] = [
                        {"id": p.id, "model_version": p.model_version}
                        for p in self.stored
                        if p.task == task_id
                    ]
                matched.append(row)
        return matched[:page_size], len(matched)

    def __enter__(self) -> FakeLabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def fake_predict(bad: set[int] = frozenset()) -> Any:  # type: ignore[assignment]
    """Predictions as predict_tasks makes them: an ``error`` for a task whose image cannot be had."""
    seen: list[int] = []

    def predict(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen.extend(t["id"] for t in tasks)
        return [
            {"result": [], "score": None, "model_version": V, "error": "no image"}
            if t["id"] in bad
            else {"result": [{"type": "choices"}], "score": 0.9, "model_version": V}
            for t in tasks
        ]

    predict.seen = seen  # type: ignore[attr-defined]
    return predict


def per_task(ls: FakeLabelStudio, version: str = V) -> dict[int, int]:
    return {t: sum(p.model_version == version for p in ls.stored if p.task == t) for t in ls.tasks}


# ------------------------------------------------------------------------------------------- the loop
def test_missing_predicts_each_task_once_in_batches_and_leaves_other_versions():
    ls = FakeLabelStudio(23)
    ls.add(5, V)  # already done
    ls.add(6, "dermnet-older")  # another version: still to do
    reports: list[tuple[int | None, int]] = []
    progress = preannotate(
        ProjectPredictions(ls, 1, V),  # type: ignore[arg-type]
        fake_predict(),
        batch_size=5,
        on_batch=lambda p: reports.append((p.total, p.done)) is None,
    )
    assert per_task(ls) == dict.fromkeys(ls.tasks, 1)
    assert (progress.total, progress.done, progress.failed) == (22, 22, 0)
    assert [len(batch) for batch in ls.posts] == [5, 5, 5, 5, 2]
    assert reports[0] == (22, 0) and reports[-1] == (22, 22)  # the total is known before any work
    assert "dermnet-older" in ls.versions(6)


def test_a_task_without_an_image_is_counted_failed_not_posted_and_stays_pending():
    ls = FakeLabelStudio(10)
    source = ProjectPredictions(ls, 1, V)  # type: ignore[arg-type]
    progress = preannotate(source, fake_predict(bad={3, 7}), batch_size=4)
    assert (progress.done, progress.failed) == (8, 2)
    assert per_task(ls)[3] == per_task(ls)[7] == 0
    again = fake_predict()
    progress = preannotate(source, again, batch_size=4)  # the next run takes exactly those two
    assert again.seen == [3, 7] and progress.done == 2
    assert per_task(ls) == dict.fromkeys(ls.tasks, 1)


def test_stopped_half_way_and_resumed_every_task_is_predicted_exactly_once():
    ls = FakeLabelStudio(30)
    source = ProjectPredictions(ls, 1, V)  # type: ignore[arg-type]
    first = fake_predict()
    preannotate(source, first, batch_size=4, on_batch=lambda p: p.done < 12)  # killed after 3 batches
    assert sum(per_task(ls).values()) == 12
    second = fake_predict()
    progress = preannotate(source, second, batch_size=4)
    assert per_task(ls) == dict.fromkeys(ls.tasks, 1)
    assert set(first.seen).isdisjoint(second.seen) and progress.total == 18


def test_a_failed_post_stores_nothing_of_its_batch_and_the_next_run_does_it():
    ls = FakeLabelStudio(12)
    ls.fail_post_after = 2
    source = ProjectPredictions(ls, 1, V)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="went away"):
        preannotate(source, fake_predict(), batch_size=4)
    assert sum(per_task(ls).values()) == 8
    ls.fail_post_after = None
    preannotate(source, fake_predict(), batch_size=4)
    assert per_task(ls) == dict.fromkeys(ls.tasks, 1)


def test_a_version_that_contains_the_served_one_does_not_hide_a_task():
    """Label Studio's "does not contain" is a substring match: V+lesion would hide a task from it."""
    ls = FakeLabelStudio(6)
    ls.add(2, f"{V}+lesion-1")  # not V
    ls.add(3, f"{V}+lesion-1")
    ls.add(3, V)  # has V
    source = ProjectPredictions(ls, 1, V)  # type: ignore[arg-type]
    assert source.sweeps(replace=False) == ("missing", "superstring")
    predict = fake_predict()
    progress = preannotate(source, predict, batch_size=2)
    assert sorted(predict.seen) == [1, 2, 4, 5, 6] and progress.total == 5
    assert per_task(ls) == dict.fromkeys(ls.tasks, 1)


def test_a_truncated_versions_column_is_read_from_the_task_itself():
    ls = FakeLabelStudio(1)
    source = ProjectPredictions(ls, 1, V)  # type: ignore[arg-type]
    ls.add(1, V)
    assert source._has_version({"id": 1, "predictions_model_versions": "x" * 600})
    assert not source._has_version({"id": 1, "predictions_model_versions": "a, b"}) and versions_of(
        "a, dermnet-abc"
    ) == {"a", V}


def test_all_replaces_the_same_version_and_resumes_after_the_last_task_handled():
    ls = FakeLabelStudio(10)
    for t in (2, 5, 9):
        ls.add(t, V)
    ls.add(4, "dermnet-older")
    source = ProjectPredictions(ls, 1, V)  # type: ignore[arg-type]
    stopped = preannotate(source, fake_predict(), replace=True, batch_size=3, on_batch=lambda p: p.done < 6)
    assert stopped.cursor == 6 and per_task(ls) == dict.fromkeys(ls.tasks, 1) | {7: 0, 8: 0, 10: 0}
    resumed = fake_predict()
    progress = preannotate(source, resumed, replace=True, batch_size=3, cursor=stopped.cursor)
    assert resumed.seen == [7, 8, 9, 10] and progress.done == 4
    assert per_task(ls) == dict.fromkeys(ls.tasks, 1)  # one prediction of V each, the old ones gone
    assert "dermnet-older" in ls.versions(4)


# ---------------------------------------------------------------------------------------- the job table
def test_one_active_job_per_project_under_concurrent_starts(store_url):
    engine, sessions = init_db(store_url)
    results: list[tuple[int, bool]] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        job, created = preannotation.request_preannotation(sessions, 7, trigger="api")
        results.append((job.id, created))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job_id for job_id, _ in results}) == 1 and sum(created for _, created in results) == 1
    other, created = preannotation.request_preannotation(sessions, 8)
    assert created and other.id != results[0][0]  # another project is independent
    engine.dispose()


def test_a_job_whose_process_is_gone_is_ended_and_an_all_run_resumes_its_place(tmp_path):
    _, sessions = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    job, _ = preannotation.request_preannotation(sessions, 3, PreannotationMode.ALL, "cli", 8)
    assert preannotation.claim(sessions, job.id)
    from consensus.repository import record_preannotation_progress

    with sessions() as session:
        assert record_preannotation_progress(
            session, job.id, done=16, failed=0, cursor=41, total=50, version=V
        )
        session.execute(  # its process is gone: a pid that does not exist here
            PreannotationJob.__table__.update().where(PreannotationJob.id == job.id).values(pid=2**22 + 12345)
        )
        session.commit()
    again, created = preannotation.request_preannotation(sessions, 3, PreannotationMode.ALL, "cli", 8)
    assert created and again.resumed_from == job.id and again.cursor == 41
    with sessions() as session:
        old = session.get(PreannotationJob, job.id)
        assert old is not None and old.status is JobStatus.FAILED and "interrupted" in (old.error or "")
        # the old process, were it still alive, learns it was ended and stops
        assert not record_preannotation_progress(session, job.id, done=20, failed=0, cursor=50)
    with pytest.raises(ValueError, match="batch size"):
        preannotation.request_preannotation(sessions, 4, batch_size=0)


def test_a_live_job_is_not_taken_for_a_dead_one(tmp_path):
    _, sessions = init_db(f"sqlite:///{tmp_path / 'store.sqlite'}")
    job, _ = preannotation.request_preannotation(sessions, 3)
    assert preannotation.claim(sessions, job.id)  # this process: alive
    same, created = preannotation.request_preannotation(sessions, 3)
    assert not created and same.id == job.id and not preannotation.claim(sessions, job.id)


# ------------------------------------------------------------------------------------ the job, the route
@pytest.fixture
def fake_ls(monkeypatch, image_server):
    """Label Studio for the job: the fake API, and the images on the test image server."""
    _, files = image_server
    ls = FakeLabelStudio(9)
    for t in ls.tasks:
        files.routes[f"/data/upload/1/{t}.png"] = (200, {"Content-Type": "image/png"}, png_bytes(seed=t))
    del files.routes["/data/upload/1/4.png"]  # one task's image is missing
    monkeypatch.setattr(preannotation, "connect", lambda url, key: ls)
    return ls


def test_the_job_predicts_with_the_promoted_model_and_records_progress(settings, sessions, promoted, fake_ls):
    job, _ = preannotation.request_preannotation(sessions, 1, trigger="cli", batch_size=4)
    assert preannotation.claim(sessions, job.id)
    seen: list[tuple[int | None, int]] = []

    def report(progress: Progress) -> None:
        seen.append((progress.total, progress.done))

    status = preannotation.run_job(settings, sessions, job.id, report)
    assert status is JobStatus.SUCCEEDED
    assert per_task(fake_ls, promoted) == dict.fromkeys(fake_ls.tasks, 1) | {4: 0}
    stored = next(p for p in fake_ls.stored if p.task == 1)
    assert {item["from_name"] for item in stored.result} >= {"diagnosis"}
    with sessions() as session:
        row = session.get(PreannotationJob, job.id)
        assert row is not None
        assert (row.status, row.version, row.total, row.done, row.failed) == (
            JobStatus.SUCCEEDED,
            promoted,
            9,
            8,
            1,
        )
    assert seen[0] == (9, 0) and seen[-1] == (9, 8) and len(seen) == 1 + 3 + 1  # start, batches, end


def test_the_job_fails_with_a_reason_when_the_config_has_nothing_to_fill(
    settings, sessions, promoted, fake_ls
):
    fake_ls.config = '<View><Image name="image" value="$image"/><TextArea name="note" toName="image"/></View>'
    job, _ = preannotation.request_preannotation(sessions, 1)
    assert preannotation.claim(sessions, job.id)
    assert preannotation.run_job(settings, sessions, job.id) is JobStatus.FAILED
    with sessions() as session:
        row = session.get(PreannotationJob, job.id)
        assert row is not None and row.error and fake_ls.posts == []


def test_the_route_starts_one_job_per_project_and_jobs_shows_its_progress(client, monkeypatch):
    launched: list[int] = []
    monkeypatch.setattr(preannotation, "launch", lambda settings, sessions, job_id: launched.append(job_id))
    first = client.post("/projects/5/predict", json={"mode": "all", "batch_size": 16})
    assert first.status_code == 202, first.get_json()
    job = first.get_json()["job"]
    assert (job["project"], job["mode"], job["status"], job["done"]) == (5, "all", "queued", 0)
    again = client.post("/projects/5/predict")
    assert again.status_code == 200 and again.get_json() == {"job": job, "created": False}
    assert launched == [job["id"]]
    listed = client.get("/jobs").get_json()
    assert listed["preannotation"][0]["id"] == job["id"] and "jobs" in listed
    assert client.post("/projects/6/predict?mode=missing&batch_size=8").status_code == 202


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/projects/5/predict", {"mode": "everything"}, 422),
        ("/projects/5/predict", {"batch_size": 0}, 422),
        ("/projects/5/predict", {"batch_size": 10_000}, 422),
        ("/projects/5/predict", {"batch_size": True}, 422),
        ("/projects/5/predict?batch_size=abc", None, 422),
        ("/projects/0/predict", None, 422),
        (f"/projects/{2**64}/predict", None, 422),
        ("/projects/-1/predict", None, 404),
        ("/projects/abc/predict", None, 404),
    ],
)
def test_the_route_refuses_what_it_cannot_do_with_json_errors(client, monkeypatch, path, body, status):
    monkeypatch.setattr(preannotation, "launch", lambda *args: None)
    response = client.post(path, json=body) if body is not None else client.post(path)
    assert response.status_code == status
    assert set(response.get_json()) == {"error", "message"}


def test_the_route_says_what_to_set_when_label_studio_is_not_configured(settings, sessions, promoted):
    from backend.api.app import create_app
    from tests.backend.conftest import with_settings

    app = create_app(with_settings(settings, label_studio_url=None, label_studio_api_key=None), sessions)
    response = app.test_client().post("/projects/5/predict", data=b"not json")
    assert response.status_code == 400  # the body is read first
    response = app.test_client().post("/projects/5/predict")
    assert response.status_code == 409 and "LABEL_STUDIO_URL" in response.get_json()["message"]


def test_the_cli_runs_the_job_with_a_summary_and_refuses_a_second_one(
    settings, sessions, promoted, fake_ls, monkeypatch, capsys
):
    from backend.cli import main

    for name, value in {
        "LABEL_STUDIO_URL": settings.label_studio_url,
        "LABEL_STUDIO_API_KEY": settings.label_studio_api_key,
        "RELEASE_DIR": "none",
        "SHOW_OUTPUTS": "all",
    }.items():
        monkeypatch.setenv(name, str(value))
    argv = ["-q", "predict", "--project", "1", "--batch-size", "4", "--db", settings.database_url]
    argv += ["--model-dir", str(settings.model_dir)]
    assert main(argv) == 1  # one task's image is missing: said, and the exit status says so
    out = capsys.readouterr().out
    assert f"status=succeeded version={promoted} total=9 predicted=8 failed=1" in out
    assert main(argv) == 1 and "total=1 predicted=0 failed=1" in capsys.readouterr().out  # only that one

    running, _ = preannotation.request_preannotation(sessions, 1)
    assert preannotation.claim(sessions, running.id)  # this (live) process holds the project
    assert main(argv) == 2
    assert f"being pre-annotated by job {running.id}" in capsys.readouterr().err
