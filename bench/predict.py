"""``/predict`` end to end per image, against a Label Studio file server that answers each image late.

Starts a real ``dermassist serve`` (one worker, a fresh store, the released models, bcc.xml) and a local
HTTP server standing in for Label Studio's file server that sleeps ``--latency-ms`` before each image
(a remote Label Studio, cloud storage). Sends ``--tasks`` tasks in requests of ``--batch`` (Label
Studio's "Retrieve predictions" sends many at once) and prints the wall time per image. Compare runs
with ``IMAGE_FETCH_CONCURRENCY`` (1: one image at a time) or against an older checkout
(``PYTHONPATH=<its worktree>``).

    .venv/bin/python bench/predict.py --tasks 64 --batch 32 --latency-ms 50
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.demo.processes import free_port, start_serve, stop  # noqa: E402
from labeling_config import load_config  # noqa: E402

SAMPLE = ROOT / "sample" / "ham10000" / "images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="tasks per /predict request")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the file server's delay per image")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upload = work / "files" / "data" / "upload" / "1"
        upload.mkdir(parents=True)
        names = []
        for path in sorted(SAMPLE.glob("*.jpg")):
            shutil.copy(path, upload / path.name)
            names.append(path.name)

        class Slow(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                time.sleep(args.latency_ms / 1000)
                super().do_GET()

        files = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Slow, directory=str(work / "files"))
        )
        threading.Thread(target=files.serve_forever, daemon=True).start()
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{work / 'store.sqlite'}",
            "MODEL_DIR": str(work / "models"),
            "LABEL_STUDIO_URL": f"http://127.0.0.1:{files.server_address[1]}",
            "LABEL_STUDIO_API_KEY": "bench-token",
            "WORKERS": "1",
            "THREADS": "1",
            "LOG_LEVEL": "WARNING",
        }
        port = free_port()
        server = start_serve(env, port, work / "serve.log")
        try:
            config = load_config("bcc")

            def run(offset: int) -> float:
                t0 = time.perf_counter()
                for start in range(0, args.tasks, args.batch):
                    batch = [
                        {"id": i + 1, "data": {"image": f"/data/upload/1/{names[(offset + i) % len(names)]}"}}
                        for i in range(start, min(start + args.batch, args.tasks))
                    ]
                    request = urllib.request.Request(
                        f"http://127.0.0.1:{port}/predict",
                        data=json.dumps({"tasks": batch, "label_config": config}).encode(),
                        headers={"Content-Type": "application/json"},
                    )
                    with urllib.request.urlopen(request, timeout=600) as response:
                        results = json.loads(response.read())["results"]
                    assert all("error" not in r for r in results), results
                return (time.perf_counter() - t0) / args.tasks * 1000

            run(0)  # warm-up: models loaded, first requests
            times = [run(1 + k) for k in range(3)]  # every image is fetched again each round
        finally:
            stop(server)
            files.shutdown()
    concurrency = os.environ.get("IMAGE_FETCH_CONCURRENCY", "default")
    print(
        f"predict: {args.tasks} tasks in requests of {args.batch}, image latency {args.latency_ms:.0f} ms, "
        f"IMAGE_FETCH_CONCURRENCY={concurrency}: " + ", ".join(f"{t:.1f}" for t in times) + " ms per image"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
