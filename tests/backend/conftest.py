"""Fixtures for the backend: a tiny promoted model, a store, an image server on 127.0.0.1, the app."""

from __future__ import annotations

import atexit
import dataclasses
import io
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backend.settings import Settings

LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def png_bytes(width: int = 96, height: int = 72, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DermNet with non-trivial weights; pattern thresholds 0 so every pattern is predicted."""
    from labeling_config import PATTERN_KEYS, TARGETS
    from model.common.checkpoint import save_checkpoint
    from model.multitask.network import CheckpointMeta, DermNet

    torch.manual_seed(0)
    model = DermNet(width_mult=0.35)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    thresholds = {k: 0.0 if k in PATTERN_KEYS else 0.5 for k in TARGETS}
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, model, CheckpointMeta(input_size=64, width_mult=0.35, thresholds=thresholds))
    from backend.serving.multitask import export_served

    export_served(path)  # tiny.onnx beside it: registering copies it instead of exporting per test
    return path


def tiny_lesion_pair(root: Path) -> tuple[Path, Path]:
    """A small segmentation U-Net (biased so its mask is not empty) and dual-encoder classifier, saved."""
    from model.lesion.dual import DualNet
    from model.lesion.segmentation import SegMeta, save_segnet
    from model.lesion.train_dual import DualConfig, save_dual
    from model.lesion.unet import SegNet

    torch.manual_seed(0)
    segnet = SegNet(width_mult=0.35, input_size=64)
    with torch.no_grad():
        for p in segnet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_segnet(root / "seg.pt", segnet, SegMeta())
    config = DualConfig(data="-", width_mult=0.35, image_size=64, lesion_size=48)
    save_dual(root / "dual.pt", DualNet(width_mult=0.35), config)
    _beside_graphs(root / "seg.pt", root / "dual.pt")
    return root / "seg.pt", root / "dual.pt"


_PAIR_GRAPHS: dict[str, Path] = {}  # the tiny pair's files (always the same bytes) -> its graphs


def _beside_graphs(segnet: Path, dual: Path) -> None:
    """The pair's ONNX graphs beside it (``seg.onnx``, ``dual.onnx``), exported once per test process:
    registering copies them instead of exporting in every test (a test of exporting removes them)."""
    from backend.serving.lesion import export_graph, graphs_of, pair_version

    key = pair_version(segnet, dual)
    if key not in _PAIR_GRAPHS:
        folder = Path(tempfile.mkdtemp(prefix="tiny-lesion-graphs-"))
        atexit.register(shutil.rmtree, folder, True)
        for name, checkpoint in (("seg.onnx", segnet), ("dual.onnx", dual)):
            export_graph(checkpoint, folder / name)
        _PAIR_GRAPHS[key] = folder
    for name, target in zip(("seg.onnx", "dual.onnx"), graphs_of(segnet, dual), strict=True):
        shutil.copyfile(_PAIR_GRAPHS[key] / name, target)


def promote_lesion(sessions: Any, model_dir: Path, segnet: Path, dual: Path) -> str:
    """Register and promote a lesion pair (as ``dermassist models promote-lesion`` does); its version."""
    from backend.serving.lesion import promote_pair

    with sessions() as session:
        version = promote_pair(session, model_dir, segnet, dual)
        session.commit()
        return version.version


class Files:
    """What the test HTTP server serves: path -> (status, headers, body); records request headers."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.require_token: str | None = None
        self.delay_s = 0.0  # before answering each request (a slow Label Studio)
        self.in_flight = 0  # requests being answered now, and the most at once
        self.most_in_flight = 0
        self.lock = threading.Lock()


def _handler(files: Files) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            # In flight: from the request's arrival until its answer starts. Counted down before the
            # answer is written, since the client may send its next request as soon as it has read
            # this one, before this thread gets back here.
            with files.lock:
                files.in_flight += 1
                files.most_in_flight = max(files.most_in_flight, files.in_flight)
            answered = False
            try:
                files.seen.append((self.path, dict(self.headers)))
                if files.delay_s:
                    time.sleep(files.delay_s)
                with files.lock:
                    files.in_flight -= 1
                answered = True
                self._answer()
            finally:
                if not answered:
                    with files.lock:
                        files.in_flight -= 1

        def _answer(self) -> None:
            token = files.require_token
            if (
                token
                and self.path.startswith("/data/")
                and self.headers.get("Authorization") != f"Token {token}"
            ):
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status, headers, body = files.routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def image_server() -> Iterator[tuple[str, Files]]:
    """An HTTP server on 127.0.0.1 (free port) acting as Label Studio's file server."""
    files = Files()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(files))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def settings(tmp_path: Path, image_server: tuple[str, Files]) -> Settings:
    url, files = image_server
    files.require_token = LS_TOKEN
    return Settings(
        label_studio_url=url,
        label_studio_api_key=LS_TOKEN,
        model_dir=tmp_path / "models",
        database_url=f"sqlite:///{tmp_path / 'store.sqlite'}",
        image_timeout=2.0,
        # These tests check how every output is laid out; the tiny models validated nothing, so by
        # default (SHOW_OUTPUTS=validated) they would pre-annotate nothing (test_provenance.py checks that).
        show_outputs="all",
        release_dir=None,  # the released models have their own tests (test_release.py)
    )


@pytest.fixture
def sessions(settings: Settings) -> Any:
    from consensus.db import init_db

    _, factory = init_db(settings.database_url)
    return factory


@pytest.fixture
def promoted(sessions: Any, settings: Settings, tiny_checkpoint: Path) -> str:
    from backend.serving import registry

    with sessions() as session:
        version = registry.register(session, tiny_checkpoint, settings.model_dir)
        registry.promote(session, version)
        session.commit()
        return version.version


@pytest.fixture
def app(settings: Settings, sessions: Any, promoted: str) -> Any:
    from backend.api.app import create_app

    application = create_app(settings, sessions=sessions)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)
