"""The released models served by PyTorch eager and by ONNX Runtime: time per image and a worker's memory.

1. Model time per image, one thread each, the released BCC model (``models/dermnet-bcc.pt`` and its ONNX
   graph) on the same real sample images (``sample/ham10000``), interleaved rounds: the forward pass,
   all eight Grad-CAM maps, and each output's region at the image's own size
   (:func:`model.common.maps.compact_region`). The median over rounds. The same for the lesion pair
   (U-Net mask at the image's size, crop, dual classifier; its graphs exported into a scratch folder).
2. Memory: a real ``dermassist serve`` (one worker, a fresh store, the release, ``SERVING_ENGINE`` set
   to each engine in turn) answers 100 ``/predict`` tasks (bcc.xml: the lesion U-Net outlines each
   region; then lesion.xml, unless ``--without-lesion``; images from a local HTTP server standing in for
   Label Studio), then its resident memory is read from ``/proc/<pid>/status``. The release's lesion
   graphs are exported once into a copy of the release folder (as the serving image's build does), so
   the worker's own first start does not pay for it.

The last line, exactly: ``serving: eager <a> ms, onnxruntime <b> ms, speed-up <c>x; RSS eager <d> MB,
onnxruntime <e> MB``.

    .venv/bin/python bench/serving.py --images 16 --rounds 5 --tasks 100 [--without-lesion]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.demo.processes import free_port, start_serve, stop  # noqa: E402
from labeling_config import load_config  # noqa: E402

SAMPLE = ROOT / "sample" / "ham10000" / "images"
RELEASED = ROOT / "models" / "dermnet-bcc.pt"


def model_times(n_images: int, rounds: int) -> tuple[float, float]:
    """Median ms per image (forward + maps + regions) for eager PyTorch and ONNX Runtime."""
    import torch
    from PIL import Image

    from backend.serving.multitask import load_served, run_batch
    from model.common.maps import compact_region

    torch.set_num_threads(1)
    images = []
    for path in sorted(SAMPLE.glob("*.jpg"))[:n_images]:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    engines = {name: load_served(RELEASED, engine=name, threads=1) for name in ("torch", "onnxruntime")}
    assert engines["onnxruntime"].engine.name == "onnxruntime", "no ONNX graph beside the released model"

    def once(name: str) -> float:
        t0 = time.perf_counter()
        for image, output in zip(images, run_batch(engines[name], images), strict=True):
            for raw in output.maps:
                compact_region(raw, image.width, image.height)
        return (time.perf_counter() - t0) / len(images) * 1000

    return interleaved(once, tuple(engines), rounds, "bcc")


def interleaved(
    once: Callable[[str], float], names: tuple[str, ...], rounds: int, label: str
) -> tuple[float, float]:
    """A warm-up, then ``rounds`` rounds of ``once(name)`` for each name in turn; each one's median."""
    for name in names:
        once(name)
    found: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            found[name].append(once(name))
    for name, values in found.items():
        print(f"{label} {name:12s} " + " ".join(f"{v:.1f}" for v in values) + " ms per image")
    return statistics.median(found["torch"]), statistics.median(found["onnxruntime"])


def lesion_times(release: Path, n_images: int, rounds: int) -> tuple[float, float]:
    """Median ms per image for the lesion pair (mask at the image's size, crop, diagnosis)."""
    import torch
    from PIL import Image

    from backend.serving.lesion import load_pair, run_lesion

    torch.set_num_threads(1)
    images = []
    for path in sorted(SAMPLE.glob("*.jpg"))[:n_images]:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    pair = (release / "lesion-unet.pt", release / "lesion-dual.pt")
    systems = {name: load_pair(*pair, engine=name, threads=1) for name in ("torch", "onnxruntime")}
    assert systems["onnxruntime"].engine.name == "onnxruntime", "no ONNX graphs beside the lesion pair"
    rows: list[dict[str, object]] = [{}] * len(images)

    def once(name: str) -> float:
        t0 = time.perf_counter()
        run_lesion(systems[name], images, rows)
        return (time.perf_counter() - t0) / len(images) * 1000

    return interleaved(once, tuple(systems), rounds, "lesion")


def release_with_graphs(work: Path) -> Path:
    """A copy of ``models/`` with every graph listed (``tools/release.py graphs --all``)."""
    import subprocess

    folder = work / "release"
    shutil.copytree(ROOT / "models", folder)
    command = [sys.executable, str(ROOT / "tools" / "release.py"), "graphs", str(folder), "--all"]
    subprocess.run(command, check=True, capture_output=True)
    return folder


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def serve_rss(engine: str, n_tasks: int, work: Path, release: Path, lesion: bool = True) -> float:
    """Resident MB of a ``dermassist serve`` worker after ``n_tasks`` predictions with ``engine``.

    ``lesion``: serve the whole ``release`` (the lesion U-Net outlines each region, and half the tasks
    are lesion.xml's); else only the BCC model, promoted from the release's file (``RELEASE_DIR=none``).
    """
    files = work / "files"
    upload = files / "data" / "upload" / "1"
    upload.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(SAMPLE.glob("*.jpg")):
        shutil.copy(path, upload / path.name)
        names.append(path.name)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(files))
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{work / f'{engine}.sqlite'}",
        "MODEL_DIR": str(work / f"models-{engine}"),
        "SERVING_ENGINE": engine,
        "LABEL_STUDIO_URL": url,
        "LABEL_STUDIO_API_KEY": "bench-token",
        "WORKERS": "1",
        "THREADS": "1",
        "LOG_LEVEL": "WARNING",
        "RELEASE_DIR": str(release),
    }
    if not lesion:
        import subprocess

        env["RELEASE_DIR"] = "none"
        promote = [str(ROOT / ".venv" / "bin" / "dermassist"), "models", "promote", str(RELEASED)]
        subprocess.run(promote, env=env, check=True, capture_output=True)
    port = free_port()
    server = start_serve(env, port, work / f"serve-{engine}.log")
    try:
        configs = [load_config("bcc")] + ([load_config("lesion")] if lesion else [])
        sent = 0
        while sent < n_tasks:
            config = configs[(sent // 10) % len(configs)]
            batch = [
                {"id": sent + i + 1, "data": {"image": f"/data/upload/1/{names[(sent + i) % len(names)]}"}}
                for i in range(min(10, n_tasks - sent))
            ]
            body = json.dumps({"tasks": batch, "label_config": config}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/predict", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                results = json.loads(response.read())["results"]
            assert all("error" not in r for r in results), results
            sent += len(batch)
        return _rss_mb(server.pid)
    finally:
        stop(server)
        images.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="sample images for the model timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100, help="/predict tasks before reading the RSS")
    parser.add_argument(
        "--without-lesion",
        action="store_true",
        help="serve only the BCC model (no lesion pair, no outline)",
    )
    args = parser.parse_args()
    eager, onnx = model_times(args.images, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        release = release_with_graphs(Path(tmp))
        lesion_eager, lesion_onnx = lesion_times(release, args.images, args.rounds)
        print(f"lesion pair: eager {lesion_eager:.1f} ms, onnxruntime {lesion_onnx:.1f} ms per image")
        rss = {
            engine: serve_rss(engine, args.tasks, Path(tmp), release, lesion=not args.without_lesion)
            for engine in ("torch", "onnxruntime")
        }
    print(
        f"serving: eager {eager:.1f} ms, onnxruntime {onnx:.1f} ms, speed-up {eager / onnx:.2f}x; "
        f"RSS eager {rss['torch']:.0f} MB, onnxruntime {rss['onnxruntime']:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
