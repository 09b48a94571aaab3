"""A whole Label Studio project pre-annotated in the background: tasks per second and total time.

Starts a loopback Label Studio 1.23.2 (its own venv, ``make label-studio``), puts ``--images`` real
dermoscopic images from ``../shared/data/derm-dev`` (HAM10000, CC BY-NC 4.0; the repo's
``sample/ham10000`` where that is absent) into a local-files storage of one project, and runs
``dermassist predict --project ID`` (the CLI, the released models, a fresh store) against it. A first
``dermassist predict`` on an empty project installs the release into the fresh ``MODEL_DIR`` (a
one-time cost on a machine, reported apart). Prints the job's figures and checks that every task ends
with exactly one prediction of the served version. Its last line, exactly:
``preannotate: <n> tasks in <t> s, <r> tasks/s (<engine>, batch <b>, fetch concurrency <c>); startup <s> s``

    .venv/bin/python bench/preannotate.py --images 1000
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.demo import label_studio as ls_server  # noqa: E402
from backend.demo.processes import DERMASSIST  # noqa: E402
from backend.demo.study import wait_for  # noqa: E402
from backend.label_studio.client import connect  # noqa: E402
from labeling_config import load_config  # noqa: E402

DERM_DEV = ROOT.parent / "shared" / "data" / "derm-dev" / "images"
SAMPLE = ROOT / "sample" / "ham10000" / "images"


def run_predict(env: dict[str, str], project: int, batch: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(DERMASSIST), "-q", "predict", "--project", str(project), "--batch-size", str(batch)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(
            f"dermassist predict failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
        )
    return wall, done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32, help="tasks per page and per post")
    parser.add_argument("--config", default="bcc_lesion", help="labeling config (default: %(default)s)")
    parser.add_argument("--engine", default="onnxruntime", choices=["onnxruntime", "torch"])
    parser.add_argument("--concurrency", type=int, default=8, help="IMAGE_FETCH_CONCURRENCY")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    source = DERM_DEV if DERM_DEV.is_dir() else SAMPLE
    images = sorted(source.glob("*.jpg"))[: args.images]
    if len(images) < args.images:
        print(f"only {len(images)} images in {source}", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="dermassist-preannotate-"))
    files = root / "files"
    (files / "derm").mkdir(parents=True)
    for path in images:
        shutil.copy(path, files / "derm" / path.name)
    server = ls_server.start(root / "ls", files_root=files)
    try:
        env = {
            **os.environ,
            "LABEL_STUDIO_URL": server.url,
            "LABEL_STUDIO_API_KEY": server.token,
            "DATABASE_URL": f"sqlite:///{root / 'store.sqlite'}",
            "MODEL_DIR": str(root / "models"),
            "SERVING_ENGINE": args.engine,
            "IMAGE_FETCH_CONCURRENCY": str(args.concurrency),
            "LOG_LEVEL": "WARNING",
        }
        with connect(server.url, server.token) as ls:
            config = load_config(args.config)
            warm = ls.projects.create(title="warm-up", label_config=config).id
            project = ls.projects.create(title="pre-annotation bench", label_config=config).id
            assert warm is not None and project is not None
            storage = ls.import_storage.local.create(
                project=project, path=str(files / "derm"), title="derm", use_blob_urls=True, regex_filter=".*"
            )
            assert storage.id is not None
            ls.import_storage.local.sync(id=storage.id)
            wait_for(lambda: ls.tasks_page(project, [], 1)[1] == len(images) or None, 300, "the tasks")

            startup, _ = run_predict(env, warm, args.batch)  # installs the release into MODEL_DIR
            print(f"release installed into a fresh MODEL_DIR in {startup:.1f} s (once per machine)")
            wall, summary = run_predict(env, project, args.batch)
            print(summary)
            fields = dict(re.findall(r"(\w+)=(\S+)", summary))
            counts = ls.model_version_counts(project)
            version = fields["version"]
            with_one = counts.get(version, 0)
            assert int(fields["predicted"]) == with_one == len(images), (fields, counts)

        import sqlite3

        with sqlite3.connect(root / "store.sqlite") as db:
            started, finished = db.execute(
                "SELECT started_at, finished_at FROM preannotation_jobs WHERE project = ?", (project,)
            ).fetchone()
        from datetime import datetime

        job_s = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
        rate = len(images) / job_s
        machine = f"{os.cpu_count()} CPUs, {platform.machine()}"
        print(f"{len(images)} images from {source} ({args.config}.xml); {machine}")
        print(f"job (claimed to finished): {job_s:.1f} s; the CLI's wall time: {wall:.1f} s")
        print(
            f"preannotate: {len(images)} tasks in {job_s:.1f} s, {rate:.1f} tasks/s ({args.engine}, batch "
            f"{args.batch}, fetch concurrency {args.concurrency}); startup {wall - job_s:.1f} s"
        )
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
