"""`dermassist demo` against a live Label Studio, small: it sets everything up, says where, and stops."""

from __future__ import annotations

import os
import subprocess

from sqlalchemy import func, select

from backend.ls_server import LabelStudioServer
from consensus.db import init_db
from consensus.models import Annotation, ModelVersion, TrainingJob
from tests.e2e.conftest import DERMASSIST


def test_demo_sets_up_a_pre_annotated_project_and_stops(label_studio: LabelStudioServer, tmp_path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [str(DERMASSIST), "-q", "demo", "--n", "16", "--size", "128", "--epochs", "1", "--no-wait",
         "--ls-port", "0", "--port", "0", "--out", str(out)],
        env=dict(os.environ), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dermassist demo is up" in done.stdout and "login admin@example.com" in done.stdout
    assert "stopped Label Studio and the backend" in done.stdout
    assert (out / "consensus" / "report.html").stat().st_size > 10_000
    _, sessions = init_db(f"sqlite:///{out / 'dermassist.sqlite'}")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Annotation)) > 0  # the webhooks landed
        assert session.scalar(select(func.count()).select_from(ModelVersion)) >= 1
        job = session.scalars(select(TrainingJob)).one()
        assert job.status.value == "succeeded", job.error
