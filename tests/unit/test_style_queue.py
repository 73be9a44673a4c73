"""The style worker's persistent queue (edge_agent/style/worker.py StyleQueue), its configuration and helpers:
persistence across reopen, idempotent enqueue, overflow, a corrupt or newer file, message bookkeeping."""

from __future__ import annotations

import logging
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edge_agent.style.worker import (
    MAX_ATTEMPTS,
    IdleGate,
    StyleConfig,
    StyleQueue,
    StyleQueueError,
    StyleSpec,
    check_snapshot_ref,
    lower_thread_priority,
    stylized_ref,
    sweep_orphans,
)
from models.contract.stylized import StylizedSnapshot
from models.errors import ConfigError, StyleError


def ev(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def ref(i: int) -> str:
    return f"2026-01-02/{ev(i)}.jpg"


def msg(i: int, style: str = "mosaic") -> StylizedSnapshot:
    return StylizedSnapshot(
        event_id=ev(i),
        device_id="door-1",
        site="hq",
        style=style,
        snapshot=ref(i),
        stylized=stylized_ref(ref(i), style),
        model="0123456789abcdef",
        ms=12.5,
        ts="2026-01-02T03:05:00Z",
    )


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    return tmp_path / "q" / "style-queue.db"


# ---------------------------------------------------------------- jobs


def test_fifo_idempotent_and_persistent(qpath: Path):
    with StyleQueue.open(qpath) as q:
        assert q.next() is None and q.depth() == 0
        assert q.enqueue(ev(0), ref(0)) and q.enqueue(ev(1), ref(1))
        assert not q.enqueue(ev(0), ref(0))  # already queued: nothing changes
        assert not q.enqueue(ev(0).upper(), ref(0))  # the same UUID spelled otherwise
        assert q.depth() == 2
        job = q.next()
        assert job is not None and job.event_id == ev(0) and job.snapshot == ref(0)
        assert job.styles_done == frozenset() and job.attempts == 0
        assert q.begin(job.job_id) == 1
        q.mark_style(job.job_id, msg(0, "mosaic"))
    # reopened: the job, its progress, its attempt and its message are all there
    with StyleQueue.open(qpath) as q:
        job = q.next()
        assert job is not None and job.event_id == ev(0)
        assert job.styles_done == {"mosaic"} and job.attempts == 1
        assert [m.style for m in q.messages(10)] == ["mosaic"]
        q.mark_style(job.job_id, msg(0, "swirl"))
        assert q.next().styles_done == {"mosaic", "swirl"}
        assert q.done(job.job_id) and not q.done(job.job_id)
        nxt = q.next()
        assert nxt is not None and nxt.event_id == ev(1)
        assert q.fail(nxt.job_id)
        assert q.next() is None
        assert q.counters() == {"done": 1, "failed": 1, "dropped": 0, "messages_dropped": 0}
    with StyleQueue.open(qpath) as q:
        assert q.counters()["done"] == 1 and q.depth() == 0 and q.backlog() == 2


def test_messages_delivered_and_replaced(qpath: Path):
    with StyleQueue.open(qpath) as q:
        q.enqueue(ev(0), ref(0))
        job = q.next()
        q.mark_style(job.job_id, msg(0, "mosaic"))
        q.mark_style(job.job_id, msg(0, "swirl"))
        q.mark_style(job.job_id, msg(0, "mosaic"))  # painted again (a restart mid-job): one message per style
        items = q.messages(10)
        assert sorted(m.style for m in items) == ["mosaic", "swirl"] and q.backlog() == 2
        assert StylizedSnapshot.from_json(items[0].payload).event_id == ev(0)
        assert [m.message_id for m in q.messages(10, after_id=items[0].message_id)] == [items[1].message_id]
        assert q.delivered([items[0].message_id, 99999]) == 1
        assert q.delivered([]) == 0
        assert [m.message_id for m in q.messages(10)] == [items[1].message_id]


def test_overflow_drops_the_oldest_jobs(qpath: Path, caplog: pytest.LogCaptureFixture):
    with StyleQueue.open(qpath, max_jobs=3) as q:
        for i in range(3):
            assert q.enqueue(ev(i), ref(i))
        with caplog.at_level(logging.WARNING):
            assert q.enqueue(ev(3), ref(3))
        assert q.depth() == 3 and q.next().event_id == ev(1)
        assert q.counters()["dropped"] == 1
        assert "dropped the 1 oldest" in caplog.text and ev(0) in caplog.text
        assert q.enqueue(ev(0), ref(0))  # gone from the queue: it may come back (as the newest)
        assert q.counters()["dropped"] == 2


def test_overflow_drops_the_oldest_messages(qpath: Path, caplog: pytest.LogCaptureFixture):
    with StyleQueue.open(qpath, max_jobs=10, max_messages=2) as q:
        for i in range(3):
            with caplog.at_level(logging.WARNING):
                q.mark_style(0, msg(i))  # job 0 does not exist: only the message is stored
        assert [StylizedSnapshot.from_json(m.payload).event_id for m in q.messages(10)] == [ev(1), ev(2)]
        assert q.counters()["messages_dropped"] == 1 and "follow-up messages dropped" in caplog.text


def test_refuses_bad_input(qpath: Path):
    with StyleQueue.open(qpath) as q:
        with pytest.raises(StyleError, match="UUID"):
            q.enqueue("nope", ref(0))
        for bad in ("/etc/passwd.jpg", "../x.jpg", "2026-01-02/../../x.jpg", "a/b.png", "a/b.c.jpg", "", "a//b.jpg"):
            with pytest.raises(StyleError, match="snapshot reference"):
                q.enqueue(ev(0), bad)
        assert q.depth() == 0
    with pytest.raises(ConfigError):
        StyleQueue.open(qpath, max_jobs=0)


def test_closed_queue_raises(qpath: Path):
    q = StyleQueue.open(qpath)
    q.close()
    q.close()
    with pytest.raises(StyleQueueError, match="closed"):
        q.enqueue(ev(0), ref(0))


def test_corrupt_file_is_moved_aside(qpath: Path, caplog: pytest.LogCaptureFixture):
    qpath.parent.mkdir(parents=True)
    qpath.write_bytes(b"this is not a database at all" * 100)
    with caplog.at_level(logging.ERROR), StyleQueue.open(qpath) as q:
        assert q.depth() == 0 and q.enqueue(ev(0), ref(0))
    aside = list(qpath.parent.glob("style-queue.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "is corrupt" in caplog.text
    with StyleQueue.open(qpath) as q:
        assert q.depth() == 1


def test_damaged_pages_are_moved_aside(qpath: Path):
    with StyleQueue.open(qpath) as q:
        for i in range(200):
            q.enqueue(ev(i), ref(i))
    # checkpointed into the main file at close; overwrite the middle of it (past the header page)
    data = bytearray(qpath.read_bytes())
    assert len(data) > 8192
    data[4096 : len(data) - 1024] = b"\xa5" * (len(data) - 1024 - 4096)
    qpath.write_bytes(bytes(data))
    with StyleQueue.open(qpath) as q:
        assert q.depth() == 0
    assert list(qpath.parent.glob("style-queue.db.corrupt-*"))


def test_newer_file_is_left_alone(qpath: Path):
    qpath.parent.mkdir(parents=True)
    conn = sqlite3.connect(qpath)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StyleQueueError, match="newer version"):
        StyleQueue.open(qpath)
    assert qpath.exists() and not list(qpath.parent.glob("*.corrupt-*"))


def test_concurrent_enqueue_from_threads(qpath: Path):
    with StyleQueue.open(qpath, max_jobs=10_000) as q:
        errors: list[BaseException] = []

        def put(base: int) -> None:
            try:
                for i in range(base, base + 50):
                    q.enqueue(ev(i), ref(i))
                    q.enqueue(ev(i), ref(i))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(k * 50,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and q.depth() == 200


def test_max_attempts_is_small():
    assert 1 < MAX_ATTEMPTS <= 5


# ---------------------------------------------------------------- configuration and helpers


def test_config_defaults_disabled(tmp_path: Path):
    cfg = StyleConfig()
    assert cfg.enabled is False and cfg.styles == () and cfg.threads == 1 and cfg.priority == "idle"
    assert cfg.isolation == "process"
    assert cfg.queue_path(tmp_path) == tmp_path / "style-queue.db"
    cfg = StyleConfig(enabled=True, styles=[StyleSpec("mosaic", "m.onnx")], queue=str(tmp_path / "q.db"))
    assert cfg.styles == (StyleSpec("mosaic", Path("m.onnx")),) and cfg.queue_path(tmp_path) == tmp_path / "q.db"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"enabled": True}, "style.styles"),
        ({"enabled": "yes"}, "style.enabled"),
        ({"styles": (StyleSpec("a", Path("a.onnx")), StyleSpec("a", Path("b.onnx")))}, "style.styles"),
        ({"styles": ("a.onnx",)}, r"style.styles\[0\]"),
        ({"max_side": 8}, "style.max_side"),
        ({"max_side": 512.0}, "style.max_side"),
        ({"threads": 0}, "style.threads"),
        ({"threads": True}, "style.threads"),
        ({"idle_after_s": -1}, "style.idle_after_s"),
        ({"idle_after_s": float("nan")}, "style.idle_after_s"),
        ({"max_queue": 0}, "style.max_queue"),
        ({"priority": "realtime"}, "style.priority"),
        ({"isolation": "container"}, "style.isolation"),
        ({"queue": 3}, "style.queue"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        StyleConfig(**kwargs)


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "../x", "x" * 33])
def test_style_spec_names(name):
    with pytest.raises(ConfigError, match=r"style\.styles"):
        StyleSpec(name, Path("m.onnx"))


def test_refs():
    assert stylized_ref(ref(0), "mosaic") == f"2026-01-02/{ev(0)}.mosaic.jpg"
    assert check_snapshot_ref("x.jpg") == "x.jpg"
    with pytest.raises(StyleError):
        check_snapshot_ref(None)


def test_idle_gate():
    now = [100.0]
    gate = IdleGate(5.0, clock=lambda: now[0])
    assert not gate()  # busy right after start-up
    now[0] = 105.0
    assert gate()
    gate.face_seen()
    now[0] = 109.9
    assert not gate()
    now[0] = 110.0
    assert gate()
    assert IdleGate(0.0)()


def test_priority_is_lowered_for_the_calling_thread_only():
    import os

    if not hasattr(os, "sched_getscheduler"):
        pytest.skip("Linux only")
    main_tid = threading.get_native_id()
    main_policy, main_nice = os.sched_getscheduler(main_tid), os.getpriority(os.PRIO_PROCESS, main_tid)
    seen: dict[str, object] = {}

    def body(priority: str) -> None:
        seen["applied"] = lower_thread_priority(priority)
        tid = threading.get_native_id()
        seen["policy"], seen["nice"] = os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)

    for priority, policy in (("idle", os.SCHED_IDLE), ("nice", os.SCHED_OTHER)):
        t = threading.Thread(target=body, args=(priority,))
        t.start()
        t.join()
        assert seen["policy"] == policy
        if priority == "nice":
            assert seen["applied"] == "nice 19" and seen["nice"] == 19
        else:
            assert seen["applied"] == "SCHED_IDLE"
    assert os.sched_getscheduler(main_tid) == main_policy and os.getpriority(os.PRIO_PROCESS, main_tid) == main_nice


def test_sweep_orphans(tmp_path: Path):
    old, today = tmp_path / "2020-01-01", tmp_path / "2026-01-02"
    for day in (old, today):
        day.mkdir()
    (old / f"{ev(0)}.mosaic.jpg").write_bytes(b"x")  # its snapshot is gone
    (today / f"{ev(1)}.jpg").write_bytes(b"x")
    (today / f"{ev(1)}.mosaic.jpg").write_bytes(b"x")  # kept: the snapshot is there
    (today / f"{ev(2)}.swirl.jpg").write_bytes(b"x")  # gone
    (today / "notes.txt").write_bytes(b"x")  # not ours
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / f"{ev(3)}.mosaic.jpg").write_bytes(b"x")  # not a day folder: left alone
    assert sweep_orphans(tmp_path, today=datetime(2026, 1, 2, tzinfo=timezone.utc)) == 2
    assert not old.exists()  # an old day left empty goes
    assert sorted(p.name for p in today.iterdir()) == sorted([f"{ev(1)}.jpg", f"{ev(1)}.mosaic.jpg", "notes.txt"])
    assert (tmp_path / "other" / f"{ev(3)}.mosaic.jpg").exists()
    assert sweep_orphans(tmp_path / "missing") == 0
