"""The offline style worker: paints the agent's snapshots with feed-forward style networks (ONNX Runtime or
TensorRT; never torch) while the door is idle, writes `<snapshot stem>.<style>.jpg` next to each snapshot and
announces each result with a follow-up MQTT message (`faceattend/v1/edge/{device}/stylized`, see
models/contract/stylized.py). Disabled by default.

Wiring (the agent):

    worker = StyleWorker(
        config.style, snapshots,
        is_idle=lambda: inference.idle().quiet_for(config.style.idle_after_s),   # or an IdleGate
        publish=mqtt_publisher(link), device_id=..., site=..., backend=config.models.backend,
        queue_path=config.style_queue_path,
    )
    worker.start()
    ...  after the attendance event is committed with its snapshot reference `ref`:
    worker.enqueue(event.event_id, ref)                # cheap, never raises, returns False when not queued
    ...  health: worker.stats().health();  at exit: worker.stop()

Never slowing recognition:

- it starts an image only while `is_idle()` is true (no face seen for `idle_after_s`) and asks again before every
  image (one style of one snapshot), so a person arriving waits for at most one image in progress;
- the painting runs at the lowest CPU priority Linux offers: SCHED_IDLE by default (it gets a core only when
  nothing else wants it), or nice 19 (`priority: nice`);
- `isolation: process` (default): the painting runs in a child process (`python -m edge_agent.style.worker`),
  which lowers its priority before it loads a runtime, so every thread it ever starts inherits it. A thread of
  the agent would share the pipeline's GIL: each of its Python steps between ONNX Runtime calls holds it, and a
  SCHED_IDLE holder preempted on a busy machine stalls the inference thread until it gets a core back (priority
  inversion). The child also keeps a crashing model away from the agent: it is restarted (with a back-off) and
  the job retried, up to MAX_ATTEMPTS. Its cost: a second runtime in memory (about 100 MB with ONNX Runtime;
  with TensorRT on a Jetson a second CUDA context as well). `isolation: thread` paints in the worker's own
  thread instead (lowered per thread: `sched_setscheduler` / `setpriority` on its native id);
- ONNX Runtime runs with `threads` intra-op threads (default 1: the calling thread itself, no pool).

Figures (`python -m edge_agent.devtools.style_bench --rounds 6`, a shared 2-core x86 VM, ONNX Runtime, detect + encode
on both cores; each condition's fps against the same round's run without painting, median of 6 rounds):
painting without pause beside a detect + encode loop that never idles (the worst case, which the gating never
allows) costs 7 % of the fps from a SCHED_IDLE process, 18 % from a SCHED_IDLE thread or a nice-19 process,
37 % from a plain thread at normal priority (the end-to-end inference worker on the same video is noisier on a
shared machine: 1 %, -4 % / 26 %, 27 %); gated as the agent gates it, on a 15 fps camera, the pipeline keeps its
15 fps (no extra frame dropped) and the worker paints in the gaps between visitors.

The queue (`StyleQueue`, one SQLite file, WAL) survives restarts and `kill -9`: a job is a snapshot to paint; a
job whose process died while painting it is painted again (the output file is simply rewritten), and one that
was started `MAX_ATTEMPTS` times without finishing (a snapshot that crashes the process) is dropped. Each style's
result is committed together with its follow-up message, and the message leaves the queue only when the
broker's PUBACK has been seen (`publish` returns the PublishHandle), so neither is lost to a crash, a broker
outage or a restart; a message may be published twice (QoS 1), consumers de-duplicate on (event_id, style).
`synchronous=NORMAL`: a power cut may roll back the last commits, which only means a snapshot painted or a
message published again; nothing in this queue is the only copy of anything that matters (the attendance event
has its own outbox).

Bounds and overflow (`max_queue`): the oldest waiting jobs are dropped when a new one would exceed it (logged
at WARNING, counted in `dropped`): stylisation is a courtesy, the newest visitors are the ones looking at the
screen, and the oldest snapshots are also the first that retention deletes. Undelivered follow-up messages are
bounded the same way (the oldest message goes, its image stays on disk).

Robustness: a snapshot that is missing (pruned by retention) or unreadable is logged and dropped from the queue
(`failed`); a style whose model cannot be loaded, or fails at run time, is logged and disabled for this run while
the others go on (with none left the worker idles; the agent keeps running); every other error is logged and
retried after a pause. Stylised files whose snapshot has since been pruned are deleted by a periodic sweep.

Styles without files: `model-tool train-style --style procedural:mosaic` (or `procedural:swirl`, or any image
file) trains a model from a texture made in code; see the module docstring of models/style/procedural.py and
the demo recipe in edge_agent/devtools/style_bench.py. A model exported with a failed or missing held-out check says so
in its metadata; the worker logs it and shows it in `stats().styles`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from edge_agent.sqlite_store import SqliteStore, StoreSpec
from models.cache import atomic_write_bytes
from models.contract import timestamps, topics
from models.contract.stylized import STYLE_NAME, StylizedSnapshot, valid_style_name
from models.errors import BackendError, ConfigError, ImageError, PayloadError, StyleError
from models.imageio import encode_jpeg

if TYPE_CHECKING:
    from edge_agent.delivery.snapshots import SnapshotStore
    from models.contract.mqtt_link import MqttLink, PublishHandle
    from models.style.runtime import Stylizer

log = logging.getLogger(__name__)

Priority = Literal["idle", "nice"]
PRIORITIES: tuple[Priority, ...] = ("idle", "nice")
Isolation = Literal["process", "thread"]
ISOLATIONS: tuple[Isolation, ...] = ("process", "thread")
NICE_LOWEST = 19
MAX_ATTEMPTS = 3  # a job started this many times without finishing is dropped (it kills the process, or hangs it)
PAINTER_RESTART_S = (5.0, 300.0)  # back-off between painter restarts: first, longest
INIT_TIMEOUT_S = 1800.0  # a painter process loading its models (a TensorRT engine build included)
DEFAULT_QUEUE_NAME = "style-queue.db"
MODEL_ID_CHARS = 16  # hex digits of the ONNX file's sha256 in the follow-up message's `model`

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        snapshot TEXT NOT NULL,                 -- the snapshot's reference, relative to the snapshot directory
        styles_done TEXT NOT NULL DEFAULT '',   -- comma-separated: styles written and announced
        attempts INTEGER NOT NULL DEFAULT 0,    -- times a worker started this job
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL,
        style TEXT NOT NULL,
        payload BLOB NOT NULL,                  -- a StylizedSnapshot, as published
        created REAL NOT NULL,
        UNIQUE (event_id, style)
    )""",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_COUNTERS = ("done", "failed", "dropped", "messages_dropped")
# what a snapshot reference may look like: relative, no "..", a .jpg whose stem has no dot (SnapshotStore's
# "<YYYY-MM-DD>/<event_id>.jpg" is one); it becomes a path under the snapshot directory
_REF_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_SUFFIX = ".jpg"
_DERIVED = re.compile(rf"(?P<stem>[A-Za-z0-9_-]+)\.(?P<style>{STYLE_NAME.pattern})\.jpg")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class StyleQueueError(StyleError):
    """The style queue's file failed an operation (disk error, a file from a newer version)."""


class PublishLater(Exception):
    """Raised by a `publish` callable to say "not now" (e.g. not connected): the message is tried again later,
    without a warning in the log."""


# ---- configuration ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleSpec:
    """One style: its name (used in file names and messages) and its ONNX model (from `model-tool train-style
    --onnx` or `export-style`)."""

    name: str
    model: Path

    def __post_init__(self) -> None:
        if not valid_style_name(self.name):
            raise ConfigError(f"style.styles: name {self.name!r} must match {STYLE_NAME.pattern}")
        if isinstance(self.model, str):
            object.__setattr__(self, "model", Path(self.model))
        if not isinstance(self.model, Path) or not str(self.model):
            raise ConfigError(f"style.styles[{self.name}].model: expected the path of an ONNX file, got {self.model!r}")


@dataclass(frozen=True, kw_only=True)
class StyleConfig:
    enabled: bool = False
    styles: tuple[StyleSpec, ...] = ()
    max_side: int = 512  # images are painted at most this large (long side) and scaled back
    threads: int = 1  # ONNX Runtime intra-op threads of the style models
    idle_after_s: float = 5.0  # paint only when no face has been seen for this long
    queue: Path | None = None  # the queue's SQLite file; None: <snapshots.dir>/style-queue.db
    max_queue: int = 1000  # waiting snapshots (and, separately, undelivered messages); the oldest go beyond
    priority: Priority = "idle"  # "idle": SCHED_IDLE (falls back to nice 19); "nice": nice 19
    isolation: Isolation = "process"  # paint in a child process (no GIL shared with the pipeline) or a thread

    def __post_init__(self) -> None:
        from models.style.runtime import MAX_SIDE, MIN_SIDE

        if not isinstance(self.enabled, bool):
            raise ConfigError(f"style.enabled: expected true or false, got {self.enabled!r}")
        styles = tuple(self.styles)
        for i, spec in enumerate(styles):
            if not isinstance(spec, StyleSpec):
                raise ConfigError(f"style.styles[{i}]: expected a style (name, model), got {spec!r}")
        object.__setattr__(self, "styles", styles)
        names = [s.name for s in styles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"style.styles: style names must be unique, {', '.join(dupes)} repeated")
        if self.enabled and not styles:
            raise ConfigError("style.styles: stylisation is enabled but no style is configured")
        if not _is_int(self.max_side) or not MIN_SIDE <= self.max_side <= MAX_SIDE:
            raise ConfigError(f"style.max_side: must be an integer in [{MIN_SIDE}, {MAX_SIDE}], got {self.max_side!r}")
        if not _is_int(self.threads) or not 1 <= self.threads <= 64:
            raise ConfigError(f"style.threads: must be an integer in [1, 64], got {self.threads!r}")
        if (
            isinstance(self.idle_after_s, bool)
            or not isinstance(self.idle_after_s, (int, float))
            or not (math.isfinite(self.idle_after_s) and self.idle_after_s >= 0)
        ):
            raise ConfigError(f"style.idle_after_s: must be a finite number >= 0, got {self.idle_after_s!r}")
        if isinstance(self.queue, str):
            object.__setattr__(self, "queue", Path(self.queue))
        if self.queue is not None and (not isinstance(self.queue, Path) or not str(self.queue)):
            raise ConfigError(f"style.queue: expected a file path, got {self.queue!r}")
        if not _is_int(self.max_queue) or not 1 <= self.max_queue <= 10_000_000:
            raise ConfigError(f"style.max_queue: must be an integer in [1, 10000000], got {self.max_queue!r}")
        if self.priority not in PRIORITIES:
            raise ConfigError(f"style.priority: expected one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if self.isolation not in ISOLATIONS:
            raise ConfigError(f"style.isolation: expected one of {', '.join(ISOLATIONS)}, got {self.isolation!r}")

    def queue_path(self, snapshot_dir: Path) -> Path:
        return self.queue if self.queue is not None else snapshot_dir / DEFAULT_QUEUE_NAME


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def stylized_ref(snapshot_ref: str, style: str) -> str:
    """`2026-01-02/<event_id>.jpg` + `mosaic` -> `2026-01-02/<event_id>.mosaic.jpg` (next to the snapshot)."""
    ref = PurePosixPath(check_snapshot_ref(snapshot_ref))
    return str(ref.with_name(f"{ref.stem}.{style}{_SUFFIX}"))


def check_snapshot_ref(ref: object) -> str:
    """A snapshot reference the worker may turn into a path: relative, plain parts, a `.jpg` without a dot in its
    stem. Raises StyleError otherwise."""
    if not isinstance(ref, str) or not ref or len(ref) > 512:
        raise StyleError(f"snapshot reference {ref!r}: expected a relative path such as 2026-01-02/<event_id>.jpg")
    parts = ref.split("/")
    path = PurePosixPath(ref)
    if (
        not all(_REF_PART.fullmatch(p) for p in parts)
        or path.suffix != _SUFFIX
        or "." in path.stem  # "." and ".." parts never get here: _REF_PART refuses a leading dot
    ):
        raise StyleError(f"snapshot reference {ref!r}: expected a relative path such as 2026-01-02/<event_id>.jpg")
    return ref


# ---- the persistent queue ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleJob:
    """A snapshot waiting to be painted: `styles_done` are the styles already written and announced."""

    job_id: int
    event_id: str
    snapshot: str
    styles_done: frozenset[str]
    attempts: int
    created: float


@dataclass(frozen=True)
class StyleMessage:
    """A follow-up message waiting for its PUBACK."""

    message_id: int
    event_id: str
    style: str
    payload: bytes


def _init_counters(conn: sqlite3.Connection, _replaced: bool) -> None:
    conn.executemany("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(c,) for c in _COUNTERS])


class StyleQueue(SqliteStore):
    """Open with `StyleQueue.open(path)`; thread-safe (one connection behind a lock); `close()` at the end.

    Jobs: `enqueue` (idempotent while the event is queued) -> `next` -> `begin` -> `mark_style` per style ->
    `done`, or `fail`. Messages: `mark_style` stores one with its style's result -> `messages` -> `delivered`.
    Counters (`done`, `failed`, `dropped`, `messages_dropped`) persist with the file."""

    _spec = StoreSpec(
        name="style queue",
        error=StyleQueueError,
        log=log,
        schema=_SCHEMA,
        version=1,
        synchronous="NORMAL",  # why NORMAL: see the module docstring
        init=_init_counters,
        lost="its waiting snapshots and messages are forgotten (the snapshots themselves are untouched)",
    )

    def __init__(self, conn: sqlite3.Connection, path: Path, max_jobs: int, max_messages: int) -> None:
        super().__init__(conn, path)
        self._max_jobs = max_jobs
        self._max_messages = max_messages

    @classmethod
    def open(cls, path: str | Path, *, max_jobs: int = 1000, max_messages: int | None = None) -> StyleQueue:
        if max_jobs < 1 or (max_messages is not None and max_messages < 1):
            raise ConfigError(f"style queue: max_jobs and max_messages must be >= 1, got {max_jobs}, {max_messages}")
        path = Path(path)
        queue = cls(cls._open_connection(path), path, max_jobs, max_messages if max_messages is not None else max_jobs)
        log.info("style queue %s opened: %d snapshots waiting, %d messages", path, queue.depth(), queue.backlog())
        return queue

    # ---- jobs ----

    def enqueue(self, event_id: str, snapshot_ref: str) -> bool:
        """Queue event `event_id`'s snapshot; False when that event is already queued (nothing changes). Over
        `max_jobs`, the oldest jobs are dropped to make room."""
        try:
            event_id = str(uuid.UUID(event_id))
        except (ValueError, TypeError, AttributeError):
            raise StyleError(f"style queue: event id {event_id!r} is not a UUID") from None
        check_snapshot_ref(snapshot_ref)

        def work(conn: sqlite3.Connection) -> tuple[bool, list[str]]:
            if conn.execute("SELECT 1 FROM jobs WHERE event_id = ?", (event_id,)).fetchone():
                return False, []
            dropped: list[str] = []
            excess = _count(conn, "jobs") + 1 - self._max_jobs
            if excess > 0:
                oldest = conn.execute("SELECT id, event_id FROM jobs ORDER BY id LIMIT ?", (excess,)).fetchall()
                conn.execute("DELETE FROM jobs WHERE id <= ?", (oldest[-1][0],))
                _bump(conn, "dropped", len(oldest))
                dropped = [row[1] for row in oldest]
            conn.execute(
                "INSERT INTO jobs (event_id, snapshot, created) VALUES (?, ?, ?)", (event_id, snapshot_ref, time.time())
            )
            return True, dropped

        added, dropped = self._write(work)
        if dropped:
            log.warning(
                "style queue full (limit %d): dropped the %d oldest waiting snapshots: %s",
                self._max_jobs,
                len(dropped),
                ", ".join(dropped),
            )
        return added

    def next(self) -> StyleJob | None:
        """The oldest waiting job, or None."""
        rows = self._read(
            "SELECT id, event_id, snapshot, styles_done, attempts, created FROM jobs ORDER BY id LIMIT 1", ()
        )
        if not rows:
            return None
        r = rows[0]
        return StyleJob(r[0], r[1], r[2], frozenset(s for s in r[3].split(",") if s), r[4], r[5])

    def begin(self, job_id: int) -> int:
        """Record that a worker starts the job (committed before any work); returns its attempts so far, this
        one included (0 when the job is gone)."""

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (job_id,))
            row = conn.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return int(row[0]) if row else 0

        return self._write(work)

    def mark_style(self, job_id: int, message: StylizedSnapshot) -> None:
        """One style of the job is written: its follow-up message is stored (replacing an undelivered one for the
        same event and style) and the style is recorded as done, in one transaction."""

        def work(conn: sqlite3.Connection) -> list[str]:
            dropped = self._make_room(conn)
            conn.execute(
                "INSERT OR REPLACE INTO messages (event_id, style, payload, created) VALUES (?, ?, ?, ?)",
                (message.event_id, message.style, message.to_json(), time.time()),
            )
            row = conn.execute("SELECT styles_done FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                done = {s for s in row[0].split(",") if s} | {message.style}
                conn.execute("UPDATE jobs SET styles_done = ? WHERE id = ?", (",".join(sorted(done)), job_id))
            return dropped

        dropped = self._write(work)
        if dropped:
            log.warning(
                "style queue: %d undelivered follow-up messages dropped (limit %d; their images stay): %s",
                len(dropped),
                self._max_messages,
                ", ".join(dropped),
            )

    def _make_room(self, conn: sqlite3.Connection) -> list[str]:
        excess = _count(conn, "messages") + 1 - self._max_messages
        if excess <= 0:
            return []
        oldest = conn.execute("SELECT id, event_id, style FROM messages ORDER BY id LIMIT ?", (excess,)).fetchall()
        conn.execute("DELETE FROM messages WHERE id <= ?", (oldest[-1][0],))
        _bump(conn, "messages_dropped", len(oldest))
        return [f"{row[1]}/{row[2]}" for row in oldest]

    def done(self, job_id: int) -> bool:
        """Every style of the job is written and announced: it leaves the queue. False when it was gone already."""
        return self._finish(job_id, "done")

    def fail(self, job_id: int) -> bool:
        """The job cannot be done (snapshot missing or unreadable, too many attempts): it leaves the queue."""
        return self._finish(job_id, "failed")

    def _finish(self, job_id: int, counter: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            removed = conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
            if removed:
                _bump(conn, counter, 1)
            return bool(removed)

        return self._write(work)

    # ---- messages ----

    def messages(self, limit: int, *, after_id: int = 0) -> list[StyleMessage]:
        """Up to `limit` undelivered follow-up messages with an id above `after_id`, oldest first."""
        rows = self._read(
            "SELECT id, event_id, style, payload FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [StyleMessage(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def delivered(self, message_ids: Iterable[int]) -> int:
        """Remove acknowledged messages (ids already gone are ignored); returns how many went."""
        ids = [(int(i),) for i in message_ids]
        if not ids:
            return 0
        return self._write(lambda conn: conn.executemany("DELETE FROM messages WHERE id = ?", ids).rowcount)

    # ---- figures ----

    def depth(self) -> int:
        """Snapshots waiting."""
        return int(self._read("SELECT count(*) FROM jobs", ())[0][0])

    def backlog(self) -> int:
        """Follow-up messages waiting for their PUBACK."""
        return int(self._read("SELECT count(*) FROM messages", ())[0][0])

    def counters(self) -> dict[str, int]:
        """Persistent: jobs `done`, `failed`, `dropped` on overflow; `messages_dropped` on overflow."""
        return {name: int(value) for name, value in self._read("SELECT name, value FROM counters", ())}


def _count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # table: one of our own names


def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
    conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (by, name))


# ---- idleness, priority, publishing -----------------------------------------------------------------------------


class IdleGate:
    """`is_idle` for the worker: true once no face has been seen for `idle_after_s`. The pipeline calls
    `face_seen()` for every frame with a face (or a live track); cheap and thread-safe (one float). The door
    counts as busy for `idle_after_s` after the gate is made (start-up)."""

    def __init__(self, idle_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._idle_after_s = idle_after_s
        self._clock = clock
        self._last_face = clock()

    def face_seen(self) -> None:
        self._last_face = self._clock()

    def __call__(self) -> bool:
        return self._clock() - self._last_face >= self._idle_after_s


def lower_thread_priority(priority: Priority = "idle") -> str:
    """Lower the calling thread's CPU priority (Linux: per thread). Returns what was applied: "SCHED_IDLE",
    "nice 19" or "unchanged (...)"."""
    if not sys.platform.startswith("linux"):
        # elsewhere setpriority takes a process id: lowering "this thread" would lower the whole agent
        log.warning("style worker: per-thread priorities need Linux; the worker runs at normal priority")
        return "unchanged (not Linux)"
    tid = threading.get_native_id()
    if priority == "idle":
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError as exc:
            log.info("style worker: SCHED_IDLE refused (%s); using nice %d", exc, NICE_LOWEST)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, NICE_LOWEST)  # on Linux a thread id: this thread only
        return f"nice {NICE_LOWEST}"
    except OSError as exc:
        log.warning("style worker: cannot lower the thread's priority (%s); it runs at normal priority", exc)
        return f"unchanged ({exc})"


def mqtt_publisher(link: MqttLink) -> Callable[[StylizedSnapshot], PublishHandle]:
    """The `publish` of a StyleWorker over an MqttLink: QoS 1, not retained, on the device's stylized topic;
    while the link is down it says "later" (the message stays in the queue)."""

    def publish(message: StylizedSnapshot) -> PublishHandle:
        if not link.is_connected():
            raise PublishLater("not connected")
        return link.publish(topics.edge_stylized(message.device_id), message.to_json(), qos=1, retain=False)

    return publish


# ---- painting: in a child process (default) or in the worker's own thread ---------------------------------------


@dataclass(frozen=True)
class StyleState:
    ok: bool
    model: str  # sha256 prefix of the ONNX file ("" when it could not be read)
    error: str | None = None
    undertrained: bool | None = None  # the model's own held-out verdict; None: never checked

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "model": self.model, "error": self.error, "undertrained": self.undertrained}


class _PainterDied(Exception):
    """Internal: the painter process ended (crashed, killed) or stopped answering."""


def _load_stylizers(
    specs: Iterable[StyleSpec], backend: str, threads: int, max_side: int
) -> tuple[dict[str, Stylizer], dict[str, StyleState]]:
    """Every style's model, or why it cannot be used (logged); never raises for one bad model."""
    from models.registry import sha256_bytes
    from models.style.runtime import Stylizer

    stylizers: dict[str, Stylizer] = {}
    states: dict[str, StyleState] = {}
    for spec in specs:
        model_id, error, undertrained = "", None, None
        try:
            model_id = sha256_bytes(Path(spec.model).read_bytes())[:MODEL_ID_CHARS]
            stylizer = Stylizer.from_onnx(spec.model, backend, threads=threads, max_side=max_side)
            undertrained = stylizer.info.undertrained
            stylizers[spec.name] = stylizer
        except Exception as exc:  # StyleError, BackendError, OSError, a runtime's own: this style only is off
            error = f"{type(exc).__name__}: {exc}"
            log.error("style %r disabled: cannot load %s: %s", spec.name, spec.model, error)
        else:
            verdict = {True: "UNDERTRAINED by its held-out check", False: "trained (held-out check passed)"}
            log.info(
                "style %r: %s (model %s, %s), max side %d, %d thread(s)",
                spec.name,
                spec.model,
                model_id,
                verdict.get(undertrained, "never checked on held-out images"),
                max_side,
                threads,
            )
        states[spec.name] = StyleState(error is None, model_id, error, undertrained)
    return stylizers, states


def _paint_file(stylizer: Stylizer, source: Path, target: Path, quality: int) -> float:
    """Read `source`, stylise it, write `target` (JPEG, atomically); returns the stylisation time in ms.
    ImageError: missing / unreadable / unusable snapshot; BackendError: the model failed; OSError: the write."""
    from models.imageio import load_image

    if not source.is_file():
        raise ImageError(f"{source}: the snapshot is gone (deleted by retention?)")
    image = load_image(source)
    started = time.perf_counter()
    painted = stylizer.stylize_rgb(image)
    ms = (time.perf_counter() - started) * 1e3
    atomic_write_bytes(target, encode_jpeg(painted, quality))
    return ms


class _ThreadPainter:
    """Paints in the calling thread (the worker's), lowered to the configured priority. Shares the agent's GIL:
    its Python steps between ONNX Runtime calls compete with the pipeline's (measured: style_bench)."""

    def __init__(self, config: StyleConfig, backend: str, quality: int) -> None:
        self.priority = lower_thread_priority(config.priority)
        self._stylizers, self.states = _load_stylizers(config.styles, backend, config.threads, config.max_side)
        self._quality = quality

    def paint(self, style: str, source: Path, target: Path) -> float:
        return _paint_file(self._stylizers[style], source, target, self._quality)

    def close(self) -> None:
        for stylizer in self._stylizers.values():
            with contextlib.suppress(Exception):
                stylizer.close()
        self._stylizers.clear()


class _ProcessPainter:
    """Paints in a child process (`python -m edge_agent.style.worker`, JSON lines over its stdin / stdout) that
    lowers its own priority before loading anything, so every thread its runtime starts inherits it. It shares
    nothing with the agent (no GIL, no memory, no crash): a model that kills its process kills only the child,
    which is started again. It exits when its stdin closes (the agent ended, even by kill -9)."""

    def __init__(self, config: StyleConfig, backend: str, quality: int, *, reply_timeout_s: float) -> None:
        self._timeout = reply_timeout_s
        self._quality = quality
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.style.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        init = {
            "styles": [{"name": s.name, "model": str(s.model)} for s in config.styles],
            "backend": backend,
            "threads": config.threads,
            "max_side": config.max_side,
            "priority": config.priority,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        try:
            # loading may build a TensorRT engine on first use: minutes on a Jetson
            reply = self._call(init, timeout=max(reply_timeout_s, INIT_TIMEOUT_S))
        except BaseException:
            self.close()
            raise
        self.priority = str(reply.get("priority", "?"))
        self.states = {
            name: StyleState(bool(st["ok"]), str(st["model"]), st.get("error"), st.get("undertrained"))
            for name, st in reply["styles"].items()
        }
        log.info("style painter process %d started (%s)", self._proc.pid, self.priority)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def paint(self, style: str, source: Path, target: Path) -> float:
        reply = self._call(
            {"op": "paint", "style": style, "source": str(source), "target": str(target), "quality": self._quality}
        )
        if reply.get("ok"):
            return float(reply["ms"])
        kind, error = reply.get("kind"), str(reply.get("error"))
        if kind == "image":
            raise ImageError(error)
        if kind == "backend":
            raise BackendError(error)
        if kind == "io":
            raise OSError(error)
        raise StyleError(f"style painter: {error}")

    def _call(self, request: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        proc = self._proc
        if proc.stdin is None or proc.stdout is None or proc.poll() is not None:
            raise _PainterDied(f"the painter process has ended (exit status {proc.returncode})")
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except OSError as exc:
            raise _PainterDied(f"the painter process does not take requests ({exc})") from exc
        ready, _, _ = select.select([proc.stdout], [], [], timeout if timeout is not None else self._timeout)
        if not ready:
            self.close()
            raise _PainterDied(f"the painter process did not answer within {timeout or self._timeout:g} s; killed")
        line = proc.stdout.readline()
        if not line:
            code = proc.wait(5)
            raise _PainterDied(f"the painter process ended (exit status {code})")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            self.close()
            raise _PainterDied(f"the painter process answered garbage ({exc}); killed") from exc
        if not isinstance(reply, dict):
            self.close()
            raise _PainterDied("the painter process answered garbage; killed")
        return reply

    def kill(self) -> None:
        """From another thread: end the child now (a blocked request then fails with _PainterDied)."""
        with contextlib.suppress(OSError):
            self._proc.kill()

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # the child's signal to finish
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _painter_main() -> int:
    """The child's side of _ProcessPainter: one JSON request per stdin line, one reply per stdout line."""
    import signal

    # a Ctrl-C in the agent's terminal reaches the whole process group: the agent stops us (stdin closes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies go here; fd 1 becomes stderr, so that a library's
    os.dup2(2, 1)  # prints cannot break the protocol
    first = sys.stdin.readline()
    if not first:
        return 0
    init = json.loads(first)
    logging.basicConfig(
        level=int(init.get("log_level", logging.INFO)), format="style-painter %(levelname)s %(message)s"
    )
    priority = lower_thread_priority(init.get("priority", "idle"))  # before any runtime thread exists
    specs = [StyleSpec(s["name"], Path(s["model"])) for s in init["styles"]]
    stylizers, states = _load_stylizers(specs, init["backend"], int(init["threads"]), int(init["max_side"]))
    proto.write(json.dumps({"priority": priority, "styles": {n: s.to_json() for n, s in states.items()}}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") != "paint":
            reply: dict[str, Any] = {"ok": False, "kind": "protocol", "error": f"unknown request {request!r}"}
        elif request["style"] not in stylizers:
            reply = {"ok": False, "kind": "backend", "error": f"style {request['style']!r} is not loaded"}
        else:
            try:
                ms = _paint_file(
                    stylizers[request["style"]], Path(request["source"]), Path(request["target"]), request["quality"]
                )
                reply = {"ok": True, "ms": ms}
            except ImageError as exc:
                reply = {"ok": False, "kind": "image", "error": str(exc)}
            except BackendError as exc:
                reply = {"ok": False, "kind": "backend", "error": str(exc)}
            except OSError as exc:
                reply = {"ok": False, "kind": "io", "error": str(exc)}
            except Exception as exc:
                reply = {"ok": False, "kind": "other", "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")
    for stylizer in stylizers.values():
        stylizer.close()
    return 0


# ---- the worker -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleWorkerStats:
    enabled: bool
    running: bool
    isolation: str
    priority: str  # what the painting runs at: "SCHED_IDLE", "nice 19", or "unchanged (...)"
    styles: dict[str, StyleState]
    queue_depth: int  # snapshots waiting
    unpublished: int  # follow-up messages waiting for their PUBACK (in flight included)
    in_flight: int
    done: int  # snapshots finished (persistent)
    failed: int  # snapshots dropped as missing / unreadable / crashing (persistent)
    dropped: int  # snapshots dropped on overflow (persistent)
    stylized: int  # images written by this run
    acked: int  # follow-up messages acknowledged in this run
    painter_restarts: int  # painter processes that died and were started again, this run
    last_ms: float | None  # the last image's stylisation time
    last_error: str | None

    def health(self) -> dict[str, Any]:
        """Figures for the edge status (`health.style`): numbers and short strings, two levels."""
        out: dict[str, Any] = {
            "enabled": self.enabled,
            "running": self.running,
            "queue": self.queue_depth,
            "unpublished": self.unpublished,
            "done": self.done,
            "failed": self.failed,
            "dropped": self.dropped,
            "stylized": self.stylized,
            "painter_restarts": self.painter_restarts,
        }
        if self.last_ms is not None:
            out["last_ms"] = round(self.last_ms, 1)
        if self.styles:
            out["styles"] = {name: _style_health(s) for name, s in list(self.styles.items())[:16]}
        if self.last_error:
            out["last_error"] = self.last_error[:200]
        return out


def _style_health(state: StyleState) -> str:
    if not state.ok:
        return "disabled"
    return {True: "ok, undertrained", False: "ok, trained", None: "ok, unchecked"}[state.undertrained]


@dataclass
class _InFlight:
    message: StyleMessage
    handle: Any  # a PublishHandle (acknowledged / failed / rejected)
    sent: float


@dataclass
class _Current:
    job_id: int
    errors: int = 0  # unexpected errors while working on it, this run


Publish = Callable[[StylizedSnapshot], Any]  # returns a PublishHandle, or None once the message is safely handed on


class StyleWorker:
    """`start()` once, `enqueue()` after each snapshot, `stats()` for health, `stop()` at the end.

    `publish(message)` sends one follow-up message and returns its PublishHandle (see `mqtt_publisher`): the
    message leaves the queue on `handle.acknowledged`, is sent again when the handle fails, is refused, or stays
    unacknowledged for `ack_timeout_s`. It may instead return None once it has taken the message over durably
    (the agent's own outbox), or raise PublishLater (not now) or any error (logged, retried).

    `queue_path` overrides `config.queue_path(snapshot dir)` (the agent's config decides where its state lives).
    `paint_timeout_s`: a painter process that takes longer for one image is killed (and the job counted as an
    attempt)."""

    def __init__(
        self,
        config: StyleConfig,
        snapshots: SnapshotStore,
        is_idle: Callable[[], bool],
        publish: Publish,
        *,
        device_id: str,
        site: str,
        backend: str = "onnxruntime",
        queue_path: Path | None = None,
        ack_timeout_s: float = 60.0,
        max_in_flight: int = 20,
        poll_interval_s: float = 0.5,
        sweep_interval_s: float = 600.0,
        paint_timeout_s: float = 300.0,
    ) -> None:
        topics.validate_id(device_id, "device_id")
        topics.validate_id(site, "site")
        if min(ack_timeout_s, poll_interval_s, sweep_interval_s, paint_timeout_s) <= 0 or max_in_flight < 1:
            raise ConfigError("style worker: timeouts, intervals and max_in_flight must be > 0")
        root = snapshots.config.dir
        if root is None:
            raise ConfigError("snapshots.dir: the style worker needs the snapshot folder")
        self._config = config
        self._snapshots = snapshots
        self._root = root
        self._is_idle = is_idle
        self._publish = publish
        self._device_id = device_id
        self._site = site
        self._backend = backend
        self._ack_timeout_s = ack_timeout_s
        self._max_in_flight = max_in_flight
        self._poll_s = poll_interval_s
        self._sweep_s = sweep_interval_s
        self._paint_timeout_s = paint_timeout_s
        self._queue: StyleQueue | None = None
        if config.enabled:
            path = queue_path if queue_path is not None else config.queue_path(root)
            self._queue = StyleQueue.open(path, max_jobs=config.max_queue)
        self._painter: _ThreadPainter | _ProcessPainter | None = None
        self._painter_down_until = 0.0
        self._in_flight: dict[int, _InFlight] = {}
        self._current: _Current | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._run, name="style-worker", daemon=True)
        self._lock = threading.Lock()  # guards the figures below
        self._states: dict[str, StyleState] = {}
        self._disabled: set[str] = set()  # styles switched off at run time (their model failed)
        self._priority = "not started"
        self._stylized = 0
        self._acked = 0
        self._restarts = 0
        self._last_ms: float | None = None
        self._last_error: str | None = None
        self._idle_error_logged = False
        self._next_sweep = 0.0

    @classmethod
    def for_agent(
        cls,
        config: StyleConfig,
        snapshots: SnapshotStore,
        link: MqttLink,
        device_id: str,
        site: str,
        *,
        is_idle: Callable[[], bool],
        backend: str = "onnxruntime",
        queue_path: Path | None = None,
    ) -> StyleWorker:
        """The agent's worker: follow-up messages on `link` (QoS 1, kept in the queue until their PUBACK)."""
        return cls(
            config,
            snapshots,
            is_idle,
            mqtt_publisher(link),
            device_id=device_id,
            site=site,
            backend=backend,
            queue_path=queue_path,
        )

    @property
    def enabled(self) -> bool:
        return self._queue is not None

    @property
    def painter_pid(self) -> int | None:
        """The painter process's id (isolation "process", while one runs)."""
        painter = self._painter
        return painter.pid if isinstance(painter, _ProcessPainter) else None

    # ---- API ----

    def start(self) -> None:
        if self._queue is None:
            log.info("style worker disabled (style.enabled is false)")
            return
        if not self._started:
            self._started = True
            self._thread.start()

    def enqueue(self, event_id: str, snapshot_ref: str | None) -> bool:
        """Queue an event's snapshot for painting (call it once the event and its snapshot are stored). Never
        raises: False when disabled, without a snapshot, already queued, or when the queue failed (logged)."""
        if self._queue is None or snapshot_ref is None:
            return False
        try:
            added = self._queue.enqueue(event_id, snapshot_ref)
        except StyleError as exc:
            log.error("style worker: cannot queue the snapshot of event %s: %s", event_id, exc)
            self._note_error(str(exc))
            return False
        if added:
            self._wake.set()
        return added

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop after the image in progress; messages not yet acknowledged stay queued for the next run. True when
        the thread ended in time."""
        self._stopping.set()
        self._wake.set()
        ok = True
        if self._started and self._thread.is_alive():
            self._thread.join(timeout)
            painter = self._painter
            if self._thread.is_alive() and isinstance(painter, _ProcessPainter):
                log.warning("style worker: the painter process is still busy after %.1f s; killing it", timeout)
                painter.kill()
                self._thread.join(5.0)
            ok = not self._thread.is_alive()
            if not ok:
                log.error("style worker did not stop within %.1f s (an image still in progress)", timeout)
        if ok and self._queue is not None:
            self._queue.close()
        return ok

    def stats(self) -> StyleWorkerStats:
        queue = self._queue
        counters = {"done": 0, "failed": 0, "dropped": 0}
        depth = backlog = 0
        if queue is not None:
            with contextlib.suppress(StyleError):  # closed, or a failing disk: figures are best effort
                counters = queue.counters()
                depth, backlog = queue.depth(), queue.backlog()
        with self._lock:
            return StyleWorkerStats(
                enabled=queue is not None,
                running=self._thread.is_alive(),
                isolation=self._config.isolation,
                priority=self._priority,
                styles=dict(self._states),
                queue_depth=depth,
                unpublished=backlog,
                in_flight=len(self._in_flight),
                done=counters["done"],
                failed=counters["failed"],
                dropped=counters["dropped"],
                stylized=self._stylized,
                acked=self._acked,
                painter_restarts=self._restarts,
                last_ms=self._last_ms,
                last_error=self._last_error,
            )

    def stats_dict(self) -> dict[str, Any]:
        """`stats().health()`: the figures for the edge status and the metrics endpoint."""
        return self.stats().health()

    # ---- the thread ----

    def _run(self) -> None:
        queue = self._queue
        if queue is None:  # start() never starts the thread without a queue
            return
        cursor = 0
        while not self._stopping.is_set():
            self._wake.clear()
            pause = self._poll_s
            try:
                cursor = self._settle(queue, cursor)
                cursor = self._send(queue, cursor)
                if self._paint_ready() and self._idle() and not self._stopping.is_set() and self._step(queue):
                    pause = 0.0  # one image done: ask again at once (idleness is checked before the next)
                elif self._in_flight:
                    pause = min(pause, 0.05)
                self._sweep_if_due()
            except _PainterDied as exc:
                self._painter_died(str(exc))
            except Exception as exc:  # the thread outlives any failure; the work waits in the queue
                log.exception("style worker: %s; retrying", exc)
                self._note_error(f"{type(exc).__name__}: {exc}")
                self._give_up_on_repeats(queue)
                pause = max(pause, 2.0)
            if pause:
                self._wake.wait(pause)
        with contextlib.suppress(Exception):
            self._settle(queue, 0)
        if self._painter is not None:
            self._painter.close()
            self._painter = None
        log.info("style worker stopped")

    def _paint_ready(self) -> bool:
        """A painter with at least one usable style, started (again) when needed."""
        if self._painter is None:
            if time.monotonic() < self._painter_down_until:
                return False
            self._painter = self._make_painter()  # _PainterDied: handled by the loop (back-off)
            with self._lock:
                self._states = dict(self._painter.states)
                self._priority = self._painter.priority
            if not self._usable():
                log.error("style worker: no usable style model; stylisation is off for this run (the agent runs on)")
        return bool(self._usable())

    def _make_painter(self) -> _ThreadPainter | _ProcessPainter:
        quality = self._snapshots.config.jpeg_quality
        if self._config.isolation == "thread":
            return _ThreadPainter(self._config, self._backend, quality)
        return _ProcessPainter(self._config, self._backend, quality, reply_timeout_s=self._paint_timeout_s)

    def _painter_died(self, why: str) -> None:
        painter, self._painter = self._painter, None
        if painter is not None:
            painter.close()
        with self._lock:
            self._restarts += 1
            restarts = self._restarts
        delay = min(PAINTER_RESTART_S[0] * 2 ** min(restarts - 1, 10), PAINTER_RESTART_S[1])
        self._painter_down_until = time.monotonic() + delay
        log.error("style worker: %s; a new painter in %.0f s", why, delay)
        self._note_error(why)

    def _usable(self) -> list[str]:
        """Styles to paint with, in configuration order."""
        with self._lock:
            return [
                s.name
                for s in self._config.styles
                if self._states.get(s.name, _OFF).ok and s.name not in self._disabled
            ]

    def _disable(self, style: str, why: str) -> None:
        log.error("style %r disabled for this run: %s", style, why)
        with self._lock:
            self._disabled.add(style)
            old = self._states.get(style, _OFF)
            self._states[style] = StyleState(False, old.model, why, old.undertrained)

    def _idle(self) -> bool:
        try:
            idle = bool(self._is_idle())
        except Exception as exc:  # a broken probe means "busy": never paint on a guess
            if not self._idle_error_logged:
                log.exception("style worker: is_idle() failed (%s); treating the door as busy", exc)
                self._idle_error_logged = True
            return False
        return idle

    def _step(self, queue: StyleQueue) -> bool:
        """Paint one style of the oldest job; True when something was done (work, or a job retired)."""
        job = queue.next()
        if job is None:
            return False
        current = self._current
        if current is None or current.job_id != job.job_id:
            attempts = queue.begin(job.job_id)
            if attempts > MAX_ATTEMPTS:
                log.error(
                    "style worker: snapshot %s of event %s was started %d times without finishing; dropped",
                    job.snapshot,
                    job.event_id,
                    attempts - 1,
                )
                queue.fail(job.job_id)
                self._current = None
                return True
            current = self._current = _Current(job.job_id)
        todo = [name for name in self._usable() if name not in job.styles_done]
        if not todo:
            queue.done(job.job_id)
            self._current = None
            return True
        style = todo[0]
        painter = self._painter
        if painter is None:
            return False
        ref = stylized_ref(job.snapshot, style)
        source, target = self._root / job.snapshot, self._root / ref
        try:
            ms = painter.paint(style, source, target)  # OSError: logged by the loop, retried after a pause
        except ImageError as exc:
            self._drop(queue, job, str(exc))
            return True
        except BackendError as exc:
            self._disable(style, f"inference failed: {exc}")
            return True
        if not source.is_file():  # pruned while it was painted: nothing to show next to it
            target.unlink(missing_ok=True)
            self._drop(queue, job, "the snapshot was deleted by retention while it was stylised")
            return True
        with self._lock:
            model = self._states.get(style, _OFF).model
        message = StylizedSnapshot(
            event_id=job.event_id,
            device_id=self._device_id,
            site=self._site,
            style=style,
            snapshot=job.snapshot,
            stylized=ref,
            model=model or "unknown",
            ms=round(ms, 1),
            ts=timestamps.utc_now(),
        )
        queue.mark_style(job.job_id, message)
        with self._lock:
            self._stylized += 1
            self._last_ms = ms
        log.debug("style worker: %s -> %s in %.0f ms", job.snapshot, ref, ms)
        if len(todo) == 1:
            queue.done(job.job_id)
            self._current = None
        return True

    def _give_up_on_repeats(self, queue: StyleQueue) -> None:
        # the same job failing again and again (an unwritable folder for its day, say) must not block the rest
        current = self._current
        if current is None:
            return
        current.errors += 1
        if current.errors >= MAX_ATTEMPTS:
            with contextlib.suppress(StyleError):
                if queue.fail(current.job_id):
                    log.error("style worker: job %d failed %d times in a row; dropped", current.job_id, current.errors)
            self._current = None

    def _drop(self, queue: StyleQueue, job: StyleJob, why: str) -> None:
        log.warning("style worker: snapshot %s of event %s dropped: %s", job.snapshot, job.event_id, why)
        queue.fail(job.job_id)
        self._current = None

    def _settle(self, queue: StyleQueue, cursor: int) -> int:
        """Remove acknowledged messages; take back those to send again. Returns the cursor, lowered below any
        message taken back."""
        if not self._in_flight:
            return cursor
        now = time.monotonic()
        acked: list[int] = []
        retry: list[_InFlight] = []
        for message_id, entry in self._in_flight.items():
            handle = entry.handle
            if handle.acknowledged and not handle.rejected:
                acked.append(message_id)
            elif handle.failed or now - entry.sent > self._ack_timeout_s:
                retry.append(entry)  # a refused one (MQTT 5) waits for the timeout too: no spinning on an ACL
        if acked:
            queue.delivered(acked)
            for message_id in acked:
                del self._in_flight[message_id]
            with self._lock:
                self._acked += len(acked)
        for entry in retry:
            del self._in_flight[entry.message.message_id]
            cursor = min(cursor, entry.message.message_id - 1)
        if retry:
            if any(e.handle.rejected for e in retry):
                self._note_error("follow-up messages refused by the broker")
            log.warning(
                "style worker: sending %d follow-up messages again (failed, refused or unacknowledged for %g s)",
                len(retry),
                self._ack_timeout_s,
            )
        return cursor

    def _send(self, queue: StyleQueue, cursor: int) -> int:
        free = self._max_in_flight - len(self._in_flight)
        if free <= 0:
            return cursor
        for item in queue.messages(free, after_id=cursor):
            if item.message_id in self._in_flight:
                cursor = item.message_id
                continue
            try:
                message = StylizedSnapshot.from_json(item.payload)
            except PayloadError as exc:  # cannot happen with our own payloads; never block the queue on one
                log.error("style worker: stored message %d is unreadable (%s); dropped", item.message_id, exc)
                queue.delivered([item.message_id])
                cursor = item.message_id
                continue
            try:
                handle = self._publish(message)
            except PublishLater:
                return cursor  # not now: from this message on, next turn
            except Exception as exc:
                log.warning("style worker: publishing %s/%s failed: %s", item.event_id, item.style, exc)
                self._note_error(f"publish: {exc}")
                return cursor
            if handle is None:  # handed over durably by the caller
                queue.delivered([item.message_id])
                with self._lock:
                    self._acked += 1
            else:
                self._in_flight[item.message_id] = _InFlight(item, handle, time.monotonic())
            cursor = item.message_id
        return cursor

    def _sweep_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_s
        removed = sweep_orphans(self._root)
        if removed:
            log.info("style worker: removed %d stylised images whose snapshot is gone", removed)

    def _note_error(self, text: str) -> None:
        with self._lock:
            self._last_error = text


_OFF = StyleState(False, "")


def sweep_orphans(root: Path, *, today: datetime | None = None) -> int:
    """Delete `<stem>.<style>.jpg` files under `root`'s day folders whose `<stem>.jpg` is gone (retention deleted
    the snapshot); day folders older than yesterday left empty are removed. Returns how many files went."""
    if not root.is_dir():
        return 0
    moment = today or datetime.now(timezone.utc)
    keep_days = {f"{moment - timedelta(days=d):%Y-%m-%d}" for d in (0, 1)}  # the store may be writing there
    removed = 0
    try:
        days = [d for d in root.iterdir() if d.is_dir() and _DAY.fullmatch(d.name)]
    except OSError as exc:
        log.warning("style worker: cannot list %s: %s", root, exc)
        return 0
    for day in days:
        try:
            for path in day.iterdir():
                m = _DERIVED.fullmatch(path.name)
                if m and not (day / f"{m['stem']}{_SUFFIX}").exists():
                    path.unlink(missing_ok=True)
                    removed += 1
            if day.name not in keep_days and next(day.iterdir(), None) is None:
                day.rmdir()
        except OSError as exc:
            log.warning("style worker: sweeping %s: %s", day, exc)
    return removed


if __name__ == "__main__":  # the painter process (see _ProcessPainter)
    sys.exit(_painter_main())
