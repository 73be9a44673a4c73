"""A single-owner SQLite file: what the edge's outbox (edge_agent/delivery/outbox.py) and the style worker's queue
(edge_agent/style/worker.py StyleQueue) share.

Each such file has a schema version (`user_version`), a WAL journal and the `synchronous` level its owner picks
(the owners' docstrings say why FULL or NORMAL). At open it is checked (`quick_check`); a file that cannot be read
as a database (not a database, malformed pages, a failed check) is moved aside with its -wal / -shm files to
`<path>.corrupt-<UTC timestamp>`, the loss is logged at ERROR on the owner's logger and a new, empty file is
started. Other failures (permissions, a locked file, a file written by a newer version) raise the owner's error
class, naming the file, and leave the file alone.

One process owns a file. A store is thread-safe: one connection serialised by a lock (SQLite serialises writers
anyway, and every operation is a short transaction).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from models.errors import FaceAttendError

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

T = TypeVar("T")
S = TypeVar("S", bound="SqliteStore")


@dataclass(frozen=True)
class StoreSpec:
    """What makes a SqliteStore subclass's file its own."""

    name: str  # starts every message about the file: "outbox", "style queue"
    error: type[FaceAttendError]  # raised for every failure
    log: logging.Logger  # the owner's logger: the corruption is logged there
    schema: tuple[str, ...]  # CREATE ... IF NOT EXISTS statements
    version: int  # stored in user_version; a file with a higher one is refused
    synchronous: Literal["FULL", "NORMAL"]
    # fills in the rows the owner needs (its counters) in the schema's transaction; `replaced` is true when a
    # corrupt file was just moved aside
    init: Callable[[sqlite3.Connection, bool], None]
    lost: str  # what moving a corrupt file aside loses, for the log


class SqliteStore:
    """Base of a store kept in one SQLite file: a subclass sets `_spec`, opens its connection with
    `_open_connection(path)` and works through `_read` and `_write`."""

    _spec: ClassVar[StoreSpec]

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def _open_connection(cls, path: Path) -> sqlite3.Connection:
        """Open (creating it, and its directory, when missing) the file at `path`; a corrupt one is moved aside
        and replaced by an empty one."""
        spec = cls._spec
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise spec.error(f"{spec.name} {path}: cannot create its directory: {exc}") from exc
        try:
            return _connect(path, spec, replaced=False)
        except _CorruptFileError as exc:
            aside = _move_aside(path, spec)
            spec.log.error(
                "%s %s is corrupt (%s): moved aside to %s; %s, starting empty", spec.name, path, exc, aside, spec.lost
            )
            try:
                return _connect(path, spec, replaced=True)
            except _CorruptFileError as again:
                raise spec.error(f"{spec.name} {path}: a new {spec.name} is unreadable too: {again}") from again

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _read(self, sql: str, params: tuple[object, ...]) -> list[tuple]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._spec.error(f"{self._spec.name} {self._path}: read failed: {exc}") from exc

    def _write(self, work: Callable[[sqlite3.Connection], T], on_commit: Callable[[T], None] | None = None) -> T:
        """Run `work(conn)` in one BEGIN IMMEDIATE ... COMMIT under the lock and return its result;
        `on_commit(result)` runs once committed, still under the lock."""
        with self._lock:
            self._check_open()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._spec.error(f"{self._spec.name} {self._path}: write failed: {exc}") from exc
            if on_commit is not None:
                on_commit(result)
            return result

    def _check_open(self) -> None:
        if self._closed:
            raise self._spec.error(f"{self._spec.name} {self._path} is closed")


class _CorruptFileError(Exception):
    """Internal: the file is not a readable SQLite database (handled by moving it aside)."""


def _connect(path: Path, spec: StoreSpec, *, replaced: bool) -> sqlite3.Connection:
    # isolation_level=None: transactions are ours (BEGIN IMMEDIATE takes the write lock up front);
    # check_same_thread=False: the store's lock serialises every use of the one connection
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        # the first statements read the header and the schema: a file that is not a database fails here
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > spec.version:
            raise spec.error(
                f"{spec.name} {path} has schema version {version}; this program knows {spec.version}: "
                "it was written by a newer version and is left untouched"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={spec.synchronous}")  # why this level: see the owner's docstring
        # quick_check reads every page (tens of ms for a full file, once per start): corruption found now is
        # handled by starting afresh; found later it would fail every write
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise _CorruptFileError("quick_check: " + "; ".join(problems))
        conn.execute("BEGIN IMMEDIATE")
        for statement in spec.schema:
            conn.execute(statement)
        spec.init(conn, replaced)
        conn.execute(f"PRAGMA user_version={spec.version}")
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_corruption(exc):
            raise _CorruptFileError(str(exc)) from exc
        raise spec.error(f"{spec.name} {path}: cannot open: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)  # primary code of an extended one
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _move_aside(path: Path, spec: StoreSpec) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        for suffix in ("", "-wal", "-shm"):  # a stale WAL beside a new database would be wrong to keep
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
    except OSError as exc:
        raise spec.error(f"{spec.name} {path} is corrupt and cannot be moved aside: {exc}") from exc
    return aside
