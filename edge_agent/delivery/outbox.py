"""The edge's durable outbox: every attendance event is committed here before it is published, and leaves only
when the enrollment server has confirmed that it stored it (`confirm`, contract 1.1; or, for a server older than
1.1, on the broker's PUBACK: `delete`). A broker outage or one that loses its state, a network loss or `kill -9`
of the agent loses nothing; what was published but not confirmed is published again (the server and consumers
de-duplicate on `event_id`). The publisher (edge_agent/delivery/event_publisher.py) decides when.

Storage: one SQLite file (stdlib sqlite3), WAL journal, `synchronous=FULL`. In WAL mode NORMAL already survives
a crash of the process, but a power cut may roll back the last commits; an event's only copy lives here until it
is confirmed, so every put is made durable (one fsync of the WAL per commit: a few ms on eMMC, far below a door's
event rate). Deletes pay the same fsync; they are batched by the publisher.

Sequence numbers: `put_new` assigns the event's per-device `seq` from a counter kept in the same database and
advanced in the same transaction as the insert, so seqs are unique, gap-free and increasing across restarts, and
the order of `seq` is the order of the rows. If the file is found corrupt and replaced (below), the new counter
starts at the current Unix time in milliseconds: a forward jump that consumers see as the gap it really is,
rather than a reset that would reuse seqs.

Overflow (`max_events` unconfirmed events, e.g. a broker or server unreachable for days):

- `drop_oldest` (default): the oldest unconfirmed events are deleted to make room, logged at ERROR with their
  event_ids and counted in a persistent `dropped` counter; the newest attendance is what a door must keep.
- `refuse_new`: `put` / `put_new` raise OutboxFullError and the stored events are untouched.

Corruption: if the file cannot be read as a database at open (not a database, malformed pages, a failed
`quick_check`), it and its -wal / -shm files are moved aside to `<path>.corrupt-<UTC timestamp>`, the loss is
logged at ERROR and a new, empty outbox is started: the door keeps working. Other failures (permissions, a locked
file, a file written by a newer version) raise OutboxError and leave the file alone.

One process owns an outbox file. An `Outbox` is thread-safe: one connection serialised by a lock (SQLite
serialises writers anyway, and every operation is a short transaction). The file's handling (schema version, WAL,
check at open, corruption) is edge_agent/sqlite_store.py's, shared with the style worker's queue.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from edge_agent.sqlite_store import SqliteStore, StoreSpec
from models.contract import topics
from models.contract.events import AttendanceEvent
from models.errors import ConfigError, OutboxError, OutboxFullError

log = logging.getLogger(__name__)

Overflow = Literal["drop_oldest", "refuse_new"]
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("drop_oldest", "refuse_new")

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
_MAX_PARAMS = 500  # ids per IN (...) list, well below SQLite's bound-parameter limit


def _init_counters(conn: sqlite3.Connection, replaced: bool) -> None:
    # a replaced file's seqs start at the current Unix time in ms: a gap, never a reuse (see the module docstring)
    first_seq = int(time.time() * 1000) if replaced else 0
    conn.execute("INSERT OR IGNORE INTO counters (name, value) VALUES ('next_seq', ?), ('dropped', 0)", (first_seq,))


@dataclass(frozen=True)
class OutboxItem:
    """One unconfirmed event as stored: publish `payload` on `topic`; it goes with `confirm([event_id])`."""

    row_id: int
    event_id: str
    seq: int
    topic: str
    payload: bytes
    created: float  # Unix time of the put


class Outbox(SqliteStore):
    """Open with `Outbox.open(path)`; `close()` (or `with`) at the end."""

    _spec = StoreSpec(
        name="outbox",
        error=OutboxError,
        log=log,
        schema=_SCHEMA,
        version=1,
        synchronous="FULL",  # why FULL: see the module docstring
        init=_init_counters,
        lost="its unconfirmed events are lost",
    )

    def __init__(self, conn: sqlite3.Connection, path: Path, max_events: int, overflow: Overflow) -> None:
        super().__init__(conn, path)
        self._max_events = max_events
        self._overflow = overflow
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
        outbox = cls(cls._open_connection(path), path, max_events, overflow)
        log.info("outbox %s opened: %d unconfirmed events, next seq %d", path, outbox.depth(), outbox.next_seq())
        return outbox

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

        event, dropped = self._write_counted(work)
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

        row_id, dropped = self._write_counted(work)
        self._after_insert(event, dropped)
        return row_id

    def _insert(self, conn: sqlite3.Connection, event: AttendanceEvent) -> tuple[int, list[str]]:
        dropped: list[str] = []
        excess = self._depth + 1 - self._max_events
        if excess > 0:
            if self._overflow == "refuse_new":
                raise OutboxFullError(
                    f"outbox {self._path} is full ({self._depth} unconfirmed events, limit {self._max_events}): "
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
                "outbox %s full (limit %d): dropped the %d oldest unconfirmed events to keep event %s: %s",
                self._path,
                self._max_events,
                len(dropped),
                event.event_id,
                ", ".join(dropped),
            )
        log.debug("outbox: stored event %s seq %d (depth %d)", event.event_id, event.seq, self._depth)

    def delete(self, row_ids: Iterable[int]) -> int:
        """Remove delivered events by row id (ids already gone are ignored: dropped on overflow meanwhile);
        returns how many rows went."""
        ids = [(int(i),) for i in row_ids]
        if not ids:
            return 0

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            removed = conn.executemany("DELETE FROM outbox WHERE id = ?", ids).rowcount
            return removed, -removed

        removed = self._write_counted(work)
        if removed:
            log.debug("outbox: %d delivered events removed (depth %d)", removed, self._depth)
        return removed

    def confirm(self, event_ids: Iterable[str]) -> list[int]:
        """Remove the events the server confirmed (ids not here are ignored: confirmed before, or from another
        run); returns the row ids that went."""
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return []

        def work(conn: sqlite3.Connection) -> tuple[list[int], int]:
            gone: list[int] = []
            for i in range(0, len(ids), _MAX_PARAMS):
                part = ids[i : i + _MAX_PARAMS]
                marks = ",".join("?" * len(part))
                gone += [
                    r[0] for r in conn.execute(f"DELETE FROM outbox WHERE event_id IN ({marks}) RETURNING id", part)
                ]
            return gone, -len(gone)

        gone = self._write_counted(work)
        if gone:
            log.debug("outbox: %d confirmed events removed (depth %d)", len(gone), self._depth)
        return gone

    # ---- reading ----

    def items(self, row_ids: Iterable[int]) -> list[OutboxItem]:
        """The rows still here among `row_ids`, oldest first (to publish again)."""
        ids = [int(i) for i in row_ids]
        out: list[OutboxItem] = []
        for i in range(0, len(ids), _MAX_PARAMS):
            part = ids[i : i + _MAX_PARAMS]
            marks = ",".join("?" * len(part))
            rows = self._read(
                f"SELECT id, event_id, seq, topic, payload, created FROM outbox WHERE id IN ({marks})", tuple(part)
            )
            out += [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) for r in rows]
        return sorted(out, key=lambda item: item.row_id)

    def pending(self, limit: int, *, after_id: int = 0) -> list[OutboxItem]:
        """Up to `limit` unconfirmed events with a row id above `after_id`, oldest first."""
        rows = self._read(
            "SELECT id, event_id, seq, topic, payload, created FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [OutboxItem(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) for r in rows]

    def depth(self) -> int:
        """Unconfirmed events (published or not)."""
        return self._depth

    def oldest_age_s(self) -> float:
        """Seconds since the oldest unconfirmed event was put; 0.0 when the outbox is empty."""
        rows = self._read("SELECT created FROM outbox ORDER BY id LIMIT 1", ())
        # max(): a wall clock set back must not make an age negative
        return max(0.0, time.time() - rows[0][0]) if rows else 0.0

    def next_seq(self) -> int:
        """The seq the next `put_new` will assign (not consumed by asking)."""
        return int(self._read("SELECT value FROM counters WHERE name = 'next_seq'", ())[0][0])

    def dropped(self) -> int:
        """Events dropped on overflow over the outbox's lifetime (persistent)."""
        return int(self._read("SELECT value FROM counters WHERE name = 'dropped'", ())[0][0])

    # ---- internals ----

    def _write_counted(self, work: Callable[[sqlite3.Connection], tuple[T, int]]) -> T:
        """`_write(work)` where `work` returns (result, change in depth): the change is applied to the cached depth
        only once committed, still under the lock (the next `_insert` reads it)."""
        return self._write(work, on_commit=self._add_depth)[0]

    def _add_depth(self, outcome: tuple[object, int]) -> None:
        self._depth += outcome[1]


def _counter(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])
