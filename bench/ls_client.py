"""Label Studio API calls per second through label-studio-sdk against plain urllib (a script, not a test).

Starts a local Label Studio (``make e2e-deps`` installs it), makes a project of N tasks and creates one
annotation per task three ways, interleaved in rounds: through this project's SDK client
(:func:`backend.label_studio.client.connect`: one connection per request), through the SDK with
httpx's default kept-alive connections, and with ``urllib`` (the peer: a new connection per request).
Prints milliseconds per annotation, the median of the rounds, and the ratios to urllib.

    .venv/bin/python bench/ls_client.py --tasks 30 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.demo import label_studio as ls_server  # noqa: E402
from backend.label_studio.client import connect  # noqa: E402
from labeling_config import load_config  # noqa: E402

RESULT = [{"from_name": "diagnosis", "to_name": "image", "type": "choices", "value": {"choices": ["BCC"]}}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30, help="annotations per way and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        ls_server.executable()
    except ls_server.LabelStudioUnavailableError as exc:
        print(f"no Label Studio here: {exc}", file=sys.stderr)
        return 2
    server = ls_server.start(Path(tempfile.mkdtemp()) / "data")
    try:
        with connect(server.url, server.token) as ls:
            import httpx

            kept_alive = connect(server.url, server.token)
            kept_alive._client_wrapper.httpx_client.httpx_client = httpx.Client(timeout=60)
            project = ls.projects.create(title="bench ls_client", label_config=load_config("bcc")).id
            n = args.tasks * 3 * args.rounds
            ls.projects.import_tasks(id=project, request=[{"image": f"http://x/{i}.png"} for i in range(n)])
            tasks = iter(sorted(int(t.id) for t in ls.tasks.list(project=project, page_size=n)))

            def raw(task: int) -> None:
                request = urllib.request.Request(
                    f"{server.url}/api/tasks/{task}/annotations/",
                    data=json.dumps({"result": RESULT}).encode(),
                    headers={"Authorization": f"Token {server.token}", "Content-Type": "application/json"},
                    method="POST",
                )
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()

            ways: dict[str, Callable[[int], object]] = {
                "sdk, one connection per request (this project)": lambda t: ls.annotations.create(
                    id=t, result=RESULT
                ),
                "sdk, kept-alive connections (httpx default)": lambda t: kept_alive.annotations.create(
                    id=t, result=RESULT
                ),
                "urllib (peer)": raw,
            }
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.rounds):
                for name, call in ways.items():
                    t0 = time.perf_counter()
                    for _ in range(args.tasks):
                        call(next(tasks))
                    times[name].append((time.perf_counter() - t0) / args.tasks * 1000)
            kept_alive.close()
    finally:
        server.stop()
    peer = statistics.median(times["urllib (peer)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:50s} {median:6.1f} ms per annotation  ({median / peer:.2f}x urllib)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
