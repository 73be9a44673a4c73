"""Databases for integration tests: the `Db` handle the `db` fixture (tests/integration/conftest.py) yields.

Every test taking `db` or `store` runs on SQLite (a temp file) and on PostgreSQL. PostgreSQL: a uniquely named
database is created through the `postgres` maintenance database for the test session and dropped at its end;
each test gets its own schema in it (search_path), so tests start from an empty database. Set FACEATTEND_TEST_PG
to another maintenance URL; the postgresql cases are skipped when the server is unreachable.

A module of its own (not conftest.py) so that test modules can import `Db` for their annotations.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL

PG_ADMIN_URL = os.environ.get("FACEATTEND_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def pg_unreachable(url: URL) -> str | None:
    """Why PostgreSQL cannot be used (None when it can): a TCP probe first, so the skip reason is plain."""
    host, port = url.host or "127.0.0.1", url.port or 5432
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"PostgreSQL not reachable at {host}:{port} ({exc})"
    return None


@dataclass(frozen=True)
class Db:
    url: str  # what Store.open gets: a file path for SQLite, a URL for PostgreSQL
    backend: str

    def engine(self) -> Engine:
        """A plain engine on the same database, for what the Store API deliberately does not offer."""
        return create_engine(self.url if "://" in self.url else f"sqlite:///{self.url}")
