"""A live Label Studio 1.23.2 and a live `dermassist serve`, both on free loopback ports, stopped by PID.

Label Studio comes from its own venv (``make label-studio``); where it is not installed the tests skip
and say so. One Label Studio serves the whole session (a fresh copy of the pre-migrated template).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.demo import label_studio as ls_server
from backend.demo import processes
from backend.label_studio.client import connect
from backend.label_studio.sdk import LabelStudioApi

DERMASSIST = processes.DERMASSIST


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls_server.LabelStudioServer]:
    try:
        ls_server.executable()
    except ls_server.LabelStudioUnavailableError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("ls")
    files = root / "files"
    files.mkdir()
    server = ls_server.start(root / "data", files_root=files)
    server.extra["files_root"] = files
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ls(label_studio: ls_server.LabelStudioServer) -> Iterator[LabelStudioApi]:
    """label-studio-sdk's client for the session's Label Studio, with the admin's legacy token."""
    with connect(label_studio.url, label_studio.token) as client:
        yield client


def tiny_model(path: Path) -> Path:
    """A tiny untrained BCC model checkpoint (width 0.35, 64 px, seed 0) at ``path``."""
    import torch

    from labeling_config import TARGETS
    from model.common.checkpoint import save_checkpoint
    from model.multitask.network import CheckpointMeta, DermNet

    torch.manual_seed(0)
    save_checkpoint(
        path,
        DermNet(width_mult=0.35),
        CheckpointMeta(input_size=64, width_mult=0.35, thresholds=dict.fromkeys(TARGETS, 0.5)),
    )
    return path


@dataclass
class Backend:
    url: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        processes.stop(self.process, sig)


def start_backend(port: int, env: dict[str, str], log: Path) -> Backend:
    return Backend(
        f"http://127.0.0.1:{port}", port, env, processes.start_serve(env, port, log, timeout=90), log
    )
