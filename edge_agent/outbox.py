"""The edge's durable outbox: every attendance event is committed here before it is published, and leaves only
when the broker has acknowledged it (PUBACK). A broker outage, a network loss or `kill -9` of the agent loses
nothing; what was published but not acknowledged is published again (consumers de-duplicate on `event_id`).

Storage: one SQLite file (stdlib sqlite3), WAL journal, `synchronous=FULL`. In WAL mode NORMAL already survives
a crash of the process, but a power cut may roll back the last commits; an event's only copy lives here until its
PUBACK, so every put is made durable (one fsync of the WAL per commit: a few ms on eMMC, far below a door's event
rate). Deletes pay the same fsync; they are batched by the publisher.

Sequence numbers: `put_new` assigns the event's per-device `seq` from a counter kept in the same database and
advanced in the same transaction as the insert, so seqs are unique, gap-free and increasing across restarts, and
the order of `seq` is the order of the rows. If the file is found corrupt and replaced (below), the new counter
starts at the current Unix time in milliseconds: a forward jump that consumers see as the gap it really is,
rather than a reset that would reuse seqs.

Overflow (`max_events` undelivered events, e.g. a broker unreachable for days):

- `drop_oldest` (default): the oldest undelivered events are deleted to make room, logged at ERROR with their
  event_ids and counted in a persistent `dropped` counter; the newest attendance is what a door must keep.
- `refuse_new`: `put` / `put_new` raise OutboxFullError and the stored events are untouched.

Corruption: if the file cannot be read as a database at open (not a database, malformed pages, a failed
`quick_check`), it and its -wal / -shm files are moved aside to `<path>.corrupt-<UTC timestamp>`, the loss is
logged at ERROR and a new, empty outbox is started: the door keeps working. Other failures (permissions, a locked
file, a file written by a newer version) raise OutboxError and leave the file alone.

One process owns an outbox file. An `Outbox` is thread-safe: one connection serialised by a lock (SQLite
serialises writers anyway, and every operation is a short transaction).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, TypeVar

from models.contract import topics
from models.contract.events import AttendanceEvent
from models.errors import ConfigError, OutboxError, OutboxFullError

log = logging.getLogger(__name__)

Overflow = Literal["drop_oldest", "refuse_new"]
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("drop_oldest", "refuse_new")

_SCHEMA_VERSION = 1
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: an id is never reused, even after deleting the newest
        event_id TEXT NOT NULL UNIQUE,
        seq INTEGER NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        created REAL NOT NULL                  -- Unix time of the put: ages must survive a restart
    )""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)

T = TypeVar("T")


@dataclass(frozen=True)
class OutboxItem:
    """One undelivered event as stored: publish `payload` on `topic`, then `delete([row_id])` on PUBACK."""

    row_id: int
    event_id: str
    seq: int
    topic: str
    payload: bytes
    created: float  # Unix time of the put


class Outbox:
    """Open with `Outbox.open(path)`; `close()` (or `with`) at the end."""

    def __init__(self, conn: sqlite3.Connection, path: Path, max_events: int, overflow: Overflow) -> None:
        self._conn = conn
        self._path = path
        self._max_events = max_events
        self._overflow = overflow
        self._lock = threading.Lock()
        self._closed = False
        # cached: count(*) scans the table, too slow to run on every put of a full outbox; only this object
        # writes the file (one owner per file), so the cache stays exact
        self._depth = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])

    @classmethod
    def open(cls, path: str | Path, *, max_events: int = 100_000, overflow: Overflow = "drop_oldest") -> Outbox:
        if max_events < 1:
            raise ConfigError(f"outbox: max_events must be >= 1, got {max_events}")
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"outbox: overflow {overflow!r} is not one of {', '.join(OVERFLOW_POLICIES)}")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"outbox {path}: cannot create its directory: {exc}") from exc
        try:
            conn = _connect(path, first_seq=0)
        except _CorruptFileError as exc:
            aside = _move_aside(path)
            log.error(
                "outbox %s is corrupt (%s): moved aside to %s; its undelivered events are lost, starting empty",
                path,
                exc,
                aside,
            )
            try:
                conn = _connect(path, first_seq=int(time.time() * 1000))
            except _CorruptFileError as again:
                raise OutboxError(f"outbox {path}: a new outbox is unreadable too: {again}") from again
        outbox = cls(conn, path, max_events, overflow)
        log.info("outbox %s opened: %d undelivered events, next seq %d", path, outbox.depth(), outbox.next_seq())
        return outbox

    @property
    def path(self) -> Path:
        return self._path

    # ---- writing ----

    def put_new(self, make_event: Callable[[int], AttendanceEvent]) -> AttendanceEvent:
        """Store a new event whose seq is assigned here: `make_event(seq)` builds it (called under the outbox's
        lock: keep it cheap, e.g. `lambda seq: new_event(seq=seq, ...)`); the stored event is returned."""

        def work(conn: sqlite3.Connection) -> tuple[tuple[AttendanceEvent, list[str]], int]:
            seq = _counter(conn, "next_seq")
            event = make_event(seq)
            if event.seq != seq:
                raise OutboxError(f"outbox: make_event was given seq {seq} but built an event with seq {event.seq}")
            _row_id, dropped = self._insert(conn, event)
            return (event, dropped), 1 - len(dropped)

        event, dropped = self._write(work)
        self._after_insert(event, dropped)
        return event

    def put(self, event: AttendanceEvent) -> int:
        """Store an event built elsewhere; its seq must not be below `next_seq()` (seqs are never reused), and the
        counter moves past it. Returns the row id."""

        def work(conn: sqlite3.Connection) -> tuple[tuple[int, list[str]], int]:
            expected = _counter(conn, "next_seq")
            if event.seq < expected:
                raise OutboxError(
                    f"outbox: event {event.event_id} has seq {event.seq}, below the next free seq {expected}"
                )
            row_id, dropped = self._insert(conn, event)
            return (row_id, dropped), 1 - len(dropped)

        row_id, dropped = self._write(work)
        self._after_insert(event, dropped)
        return row_id

    def _insert(self, conn: sqlite3.Connection, event: AttendanceEvent) -> tuple[int, list[str]]:
        dropped: list[str] = []
        excess = self._depth + 1 - self._max_events
        if excess > 0:
            if self._overflow == "refuse_new":
                raise OutboxFullError(
                    f"outbox {self._path} is full ({self._depth} undelivered events, limit {self._max_events}): "
                    f"event {event.event_id} refused"
                )
            oldest = conn.execute("SELECT id, event_id FROM outbox ORDER BY id LIMIT ?", (excess,)).fetchall()
            if oldest:
                conn.execute("DELETE FROM outbox WHERE id <= ?", (oldest[-1][0],))
                conn.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (len(oldest),))
                dropped = [row[1] for row in oldest]
        try:
            cur = conn.execute(
                "INSERT INTO outbox (event_id, seq, topic, payload, created) VALUES (?, ?, ?, ?, ?)",
                (event.event_id, event.seq, topics.edge_events(event.device_id), event.to_json(), time.time()),
            )
        except sqlite3.IntegrityError:
            raise OutboxError(f"outbox: event {event.event_id} is already stored") from None
        conn.execute("UPDATE counters SET value = ? WHERE name = 'next_seq'", (event.seq + 1,))
        row_id = cur.lastrowid
        if row_id is None:  # sqlite3 always sets it after an INSERT; typed as optional
            raise OutboxError("outbox: insert returned no row id")
        return row_id, dropped

    def _after_insert(self, event: AttendanceEvent, dropped: list[str]) -> None:
        # logged once committed: a rolled-back drop lost nothing
        if dropped:
            log.error(
                "outbox %s full (limit %d): dropped the %d oldest undelivered events to keep event %s: %s",
                self._path,
                self._max_events,
                len(dropped),
                event.event_id,
                ", ".join(dropped),
            )
        log.debug("outbox: stored event %s seq %d (depth %d)", event.event_id, event.seq, self._depth)

    def delete(self, row_ids: Iterable[int]) -> int:
        """Remove acknowledged events (ids already gone are ignored: dropped on overflow meanwhile); returns how
        many rows went."""
        ids = [(int(i),) for i in row_ids]
        if not ids:
            return 0

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            removed = conn.executemany("DELETE FROM outbox WHERE id = ?", ids).rowcount
            return removed, -removed

        removed = self._write(work)
        if removed:
            log.debug("outbox: %d delivered events removed (depth %d)", removed, self._depth)
        return removed

    # ---- reading ----

    def pending(self, limit: int, *, after_id: int = 0) -> list[OutboxItem]:
        """Up to `limit` undelivered events with a row id above `after_id`, oldest first."""
        rows = self._read(
            "SELECT id, event_id, seq, topic, payload, created FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) for r in rows]

    def depth(self) -> int:
        """Undelivered events."""
        return self._depth

    def oldest_age_s(self) -> float:
        """Seconds since the oldest undelivered event was put; 0.0 when the outbox is empty."""
        rows = self._read("SELECT created FROM outbox ORDER BY id LIMIT 1", ())
        # max(): a wall clock set back must not make an age negative
        return max(0.0, time.time() - rows[0][0]) if rows else 0.0

    def next_seq(self) -> int:
        """The seq the next `put_new` will assign (not consumed by asking)."""
        return int(self._read("SELECT value FROM counters WHERE name = 'next_seq'", ())[0][0])

    def dropped(self) -> int:
        """Events dropped on overflow over the outbox's lifetime (persistent)."""
        return int(self._read("SELECT value FROM counters WHERE name = 'dropped'", ())[0][0])

    # ---- lifecycle ----

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- internals ----

    def _read(self, sql: str, params: tuple[object, ...]) -> list[tuple]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self._path}: read failed: {exc}") from exc

    def _write(self, work: Callable[[sqlite3.Connection], tuple[T, int]]) -> T:
        """Run `work(conn)` in one BEGIN IMMEDIATE ... COMMIT under the lock; it returns (result, change in
        depth), applied to the cached depth only once committed."""
        with self._lock:
            self._check_open()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result, delta = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self._path}: write failed: {exc}") from exc
            self._depth += delta
            return result

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self._path} is closed")


class _CorruptFileError(Exception):
    """Internal: the file is not a readable SQLite database (handled by moving it aside)."""


def _connect(path: Path, *, first_seq: int) -> sqlite3.Connection:
    # isolation_level=None: transactions are ours (BEGIN IMMEDIATE takes the write lock up front);
    # check_same_thread=False: the Outbox's lock serialises every use of the one connection
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        # the first statements read the header and the schema: a file that is not a database fails here
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > _SCHEMA_VERSION:
            raise OutboxError(
                f"outbox {path} has schema version {version}; this program knows {_SCHEMA_VERSION}: "
                "it was written by a newer version and is left untouched"
            )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # why FULL: see the module docstring
        # quick_check reads every page (tens of ms for a full outbox, once per start): corruption found now is
        # handled by starting afresh; found later it would fail every put
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise _CorruptFileError("quick_check: " + "; ".join(problems))
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT OR IGNORE INTO counters (name, value) VALUES ('next_seq', ?), ('dropped', 0)", (first_seq,)
        )
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_corruption(exc):
            raise _CorruptFileError(str(exc)) from exc
        raise OutboxError(f"outbox {path}: cannot open: {exc}") from exc
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


def _move_aside(path: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        for suffix in ("", "-wal", "-shm"):  # a stale WAL beside a new database would be wrong to keep
            src = Path(f"{path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
    except OSError as exc:
        raise OutboxError(f"outbox {path} is corrupt and cannot be moved aside: {exc}") from exc
    return aside


def _counter(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])
