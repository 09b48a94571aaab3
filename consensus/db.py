"""Engines, sessions and migrations for the store. ``DATABASE_URL`` picks the engine.

SQLite (the default, a file) is tuned for a web service with a background worker: WAL journal (readers
do not block the writer), a busy timeout (writers wait instead of failing), and foreign keys on.
PostgreSQL (``postgresql+psycopg://user@host/db``, the ``postgres`` extra) is for teams.
The schema is created and upgraded by Alembic (``consensus/migrations``), never by ``create_all``,
so a deployed database and a fresh one are the same.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///dermassist.sqlite"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a power cut may lose the last commit only
    cursor.close()


class WriteLock:
    """One writer at a time on a SQLite file, across threads and processes: a thread lock, then an
    exclusive ``flock`` on ``<file>.write-lock``. A writer that waits sleeps in the kernel and wakes
    when the lock is released, where SQLite's own busy handler polls with growing sleeps (measured
    with two ``serve`` processes: a webhook p99 of 778 ms). Without ``fcntl`` (not POSIX), the thread
    lock alone."""

    def __init__(self, path: Path) -> None:
        self.path = Path(str(path) + ".write-lock")
        self._thread = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> WriteLock:
        self._thread.acquire()
        try:
            if fcntl is not None:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if fcntl is not None and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()


def write_lock(engine: Engine) -> AbstractContextManager[Any] | None:
    """What webhook writers hold around a write: SQLite has one writer, so they queue on a
    :class:`WriteLock` (a thread lock for an in-memory database); other databases need none."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if database in (None, "", ":memory:"):
        return threading.Lock()
    return WriteLock(Path(str(database)))


def make_engine(url: str = DEFAULT_URL, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the settings this store relies on.

    Raises:
        ValueError: for a URL SQLAlchemy cannot parse.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ValueError(f"DATABASE_URL {url!r} is not a database URL: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        if memory:
            kwargs.setdefault("poolclass", StaticPool)  # one shared in-memory database
        kwargs.setdefault(
            "connect_args", {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Config:
    """Alembic's configuration for the migrations shipped in this package, bound to ``engine``."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("consensus") / "migrations"))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or upgrade the schema to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(engine), revision)


def init_db(url: str = DEFAULT_URL) -> tuple[Engine, sessionmaker[Session]]:
    """An engine and a sessionmaker for ``url``, with the schema migrated to the latest revision."""
    engine = make_engine(url)
    upgrade(engine)
    return engine, make_sessionmaker(engine)
