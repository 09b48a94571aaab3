"""Shared fixtures: paths to ../shared/data (skipped with a reason where absent) and small studies."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
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


PG_URL = os.environ.get("DERMASSIST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_schema() -> Iterator[str]:
    """A fresh schema on the PostgreSQL server at ``PG_URL`` (dropped afterwards), or skip saying why."""
    from sqlalchemy import text

    from consensus.db import make_engine

    admin = make_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # no server here: say so
        admin.dispose()
        pytest.skip(
            f"PostgreSQL not reachable at {PG_URL} ({type(exc).__name__}); set DERMASSIST_TEST_PG_URL"
        )
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated-on-first-use store: a SQLite file, and a PostgreSQL schema where a server is reachable."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
        return
    yield from postgres_schema()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the project's PostgreSQL server, or skip saying why."""
    yield from postgres_schema()
