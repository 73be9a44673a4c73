"""The durable outbox (edge_agent/delivery/outbox.py) on real SQLite files."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from edge_agent.delivery.outbox import Outbox
from models.contract import topics
from models.contract.events import AttendanceEvent, new_event
from models.errors import ConfigError, OutboxError, OutboxFullError

DEVICE = "door-1"


def make_event(seq: int, *, device: str = DEVICE, track_id: int = 1) -> AttendanceEvent:
    return new_event(
        seq=seq,
        device_id=device,
        site="hq",
        camera="front",
        track_id=track_id,
        person_id="p-ann",
        name="Ann",
        distance=0.31,
        margin=0.12,
        threshold=0.6,
        gallery_version=3,
        fingerprint="fp-test",
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "edge" / "outbox.db"


def test_put_pending_delete(path: Path) -> None:
    with Outbox.open(path) as box:
        assert (box.depth(), box.next_seq(), box.oldest_age_s(), box.pending(10)) == (0, 0, 0.0, [])
        events = [box.put_new(make_event) for _ in range(3)]
        assert [e.seq for e in events] == [0, 1, 2]
        items = box.pending(10)
        assert [i.event_id for i in items] == [e.event_id for e in events]
        assert [i.seq for i in items] == [0, 1, 2]
        assert all(i.topic == topics.edge_events(DEVICE) for i in items)
        assert AttendanceEvent.from_json(items[1].payload) == events[1]  # the contract's own encoding
        assert box.depth() == 3 and 0.0 <= box.oldest_age_s() < 5.0
        assert [i.seq for i in box.pending(10, after_id=items[0].row_id)] == [1, 2]
        assert [i.seq for i in box.pending(1)] == [0]

        assert box.delete([items[0].row_id, items[2].row_id]) == 2
        assert box.delete([items[0].row_id]) == 0  # already gone: ignored
        assert box.delete([]) == 0
        assert [i.event_id for i in box.pending(10)] == [events[1].event_id]
        assert box.depth() == 1 and box.next_seq() == 3


def test_seq_survives_reopen_even_when_empty(path: Path) -> None:
    with Outbox.open(path) as box:
        for _ in range(3):
            box.put_new(make_event)
        box.delete(i.row_id for i in box.pending(10))
        assert box.depth() == 0
    with Outbox.open(path) as box:
        assert box.next_seq() == 3
        assert box.put_new(make_event).seq == 3
        assert box.depth() == 1
    with Outbox.open(path) as box:
        assert (box.depth(), box.next_seq()) == (1, 4)


def test_put_of_a_built_event_keeps_seqs_unique(path: Path) -> None:
    with Outbox.open(path) as box:
        box.put_new(make_event)  # seq 0
        with pytest.raises(OutboxError, match="below the next free seq 1"):
            box.put(make_event(0))
        row_id = box.put(make_event(10))
        assert box.pending(10)[-1].row_id == row_id
        assert box.next_seq() == 11 and box.put_new(make_event).seq == 11
        event = make_event(20)
        box.put(event)
        with pytest.raises(OutboxError, match="already stored"):
            box.put(dataclasses.replace(event, seq=30))
        assert box.depth() == 4


def test_a_factory_that_ignores_its_seq_stores_nothing(path: Path) -> None:
    with Outbox.open(path) as box, pytest.raises(OutboxError, match="built an event with seq 7"):
        box.put_new(lambda _seq: make_event(7))
    with Outbox.open(path) as box:
        assert (box.depth(), box.next_seq()) == (0, 0)


def test_overflow_drop_oldest_keeps_the_newest_and_counts(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox.open(path, max_events=3) as box:
        events = [box.put_new(make_event) for _ in range(3)]
        with caplog.at_level(logging.ERROR, logger="edge_agent.delivery.outbox"):
            events += [box.put_new(make_event) for _ in range(2)]
        assert [i.seq for i in box.pending(10)] == [2, 3, 4]
        assert (box.depth(), box.dropped()) == (3, 2)
        logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert events[0].event_id in logged and events[1].event_id in logged
    with Outbox.open(path, max_events=3) as box:
        assert (box.depth(), box.dropped(), box.next_seq()) == (3, 2, 5)


def test_overflow_refuse_new_raises_and_keeps_what_is_stored(path: Path) -> None:
    with Outbox.open(path, max_events=2, overflow="refuse_new") as box:
        kept = [box.put_new(make_event).event_id for _ in range(2)]
        with pytest.raises(OutboxFullError, match="full"):
            box.put_new(make_event)
        with pytest.raises(OutboxFullError):
            box.put(make_event(5))
        assert [i.event_id for i in box.pending(10)] == kept
        assert (box.next_seq(), box.dropped()) == (2, 0)  # a refused event consumed no seq
        box.delete([box.pending(1)[0].row_id])
        assert box.put_new(make_event).seq == 2


def test_bad_settings_are_config_errors(path: Path) -> None:
    with pytest.raises(ConfigError, match="max_events"):
        Outbox.open(path, max_events=0)
    with pytest.raises(ConfigError, match="overflow"):
        Outbox.open(path, overflow="drop_newest")  # type: ignore[arg-type]


def _asides(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def test_a_file_that_is_not_a_database_is_moved_aside(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    garbage = b"this is not an sqlite database at all" * 200
    path.write_bytes(garbage)
    before_ms = int(time.time() * 1000)
    with caplog.at_level(logging.ERROR, logger="edge_agent.delivery.outbox"), Outbox.open(path) as box:
        event = box.put_new(make_event)
        assert box.depth() == 1
    (aside,) = _asides(path)
    assert aside.read_bytes() == garbage
    assert any("corrupt" in r.getMessage() and str(aside) in r.getMessage() for r in caplog.records)
    # seqs continue above anything the lost file can have handed out: a gap for consumers, never a reuse
    assert event.seq >= before_ms


def test_damaged_pages_are_found_at_open_and_moved_aside(path: Path) -> None:
    with Outbox.open(path) as box:
        for _ in range(300):
            box.put_new(make_event)
    size = path.stat().st_size
    assert size > 16 * 4096  # several pages of rows and of the event_id index
    with path.open("r+b") as fh:  # keep the header (page 1), scribble over the middle of the file
        fh.seek(2 * 4096)
        fh.write(b"\xa5" * (size // 2))
    with Outbox.open(path) as box:
        assert box.depth() == 0
        box.put_new(make_event)
    assert len(_asides(path)) == 1


def test_a_newer_schema_is_refused_and_left_alone(path: Path) -> None:
    with Outbox.open(path) as box:
        box.put_new(make_event)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(OutboxError, match="newer version"):
        Outbox.open(path)
    assert _asides(path) == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
    conn.close()


def test_closed_outbox_refuses_work(path: Path) -> None:
    box = Outbox.open(path)
    box.close()
    box.close()  # idempotent
    with pytest.raises(OutboxError, match="closed"):
        box.put_new(make_event)
    with pytest.raises(OutboxError, match="closed"):
        box.pending(1)


def test_concurrent_puts_get_unique_ordered_seqs(path: Path) -> None:
    threads_n, per_thread = 4, 40
    errors: list[BaseException] = []
    with Outbox.open(path) as box:

        def worker(track: int) -> None:
            try:
                for _ in range(per_thread):
                    box.put_new(partial(make_event, track_id=track))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        items = box.pending(1000)
        total = threads_n * per_thread
        # seqs are gap-free and in row order: assigned in the insert's own transaction
        assert [i.seq for i in items] == list(range(total))
        assert len({i.event_id for i in items}) == total
        assert box.depth() == total == box.next_seq()
        tracks = [AttendanceEvent.from_json(i.payload).track_id for i in items]
        assert all(tracks.count(t) == per_thread for t in range(threads_n))
