"""Shared fixtures: paths to ../shared/data (skipped with a reason where absent) and small studies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Measured on this project's 2-core machines: two PyTorch threads on a busy box ran 10x slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DERMASSIST_SHARED", ROOT.parent / "shared")).resolve()


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying where it was looked for."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set DERMASSIST_SHARED to the folder holding data/)")
    return path


@pytest.fixture(scope="session")
def derm_dev() -> Path:
    """The real HAM10000 development subset (never committed; read from ../shared)."""
    return shared_path("data", "derm-dev")


@pytest.fixture(scope="session")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image synthetic study at 128 px with four raters, shared by the tests that only read it."""
    from model.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("study")
    generate(SynthConfig(n=40, size=128, raters=4, seed=7), out)
    return out
