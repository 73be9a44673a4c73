"""Ingest at the MQTT door: real Mosquitto, real store (SQLite and PostgreSQL through the `store` fixture), the
ingest's own link settings (`ingest_config`: manual acknowledgement, persistent session, MQTT 5).

Bad input is rejected and counted while the valid events around it are stored; redeliveries are counted, not
stored; events are acknowledged to the broker only once committed (a crashed server gets them again); stored
events are confirmed to 1.1 edges, a 1.0 edge's events are stored and not confirmed; a database that fails is
retried, a write lock held by another writer is waited out, and only a row the database refuses is rejected
alone; events published while the server is away wait in its persistent session.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_RECONNECT
from storedb import Db
from tcp_proxy import TcpProxy
from waiting import wait_until

from enrollment_server.ingest import Ingest, IngestStats, ingest_config
from enrollment_server.store import Store
from models.contract import topics
from models.contract.events import AttendanceEvent, EventsStored, new_event
from models.contract.mqtt_link import MqttLink
from models.contract.status import EdgeStatus, GalleryAck
from models.contract.timestamps import utc_now
from models.errors import StoreDataError, StoreError

SITE = "hq"
FP = "dlib_resnet_v1-0123456789abcdef"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def event(device: str = "door-1", seq: int = 1, person: str | None = "alice") -> AttendanceEvent:
    return new_event(
        seq=seq,
        device_id=device,
        site=SITE,
        camera="cam0",
        track_id=seq,
        person_id=person,
        name=person,
        distance=0.31 if person else None,
        margin=0.12 if person else None,
        threshold=0.5,
        gallery_version=1,
        fingerprint=FP,
        snapshot=f"snap/{device}/{seq}.jpg",
    )


def as_object(e: AttendanceEvent, **changes: Any) -> bytes:
    obj = e.to_object()
    obj.update(changes)
    return json.dumps(obj).encode()


def start_ingest(store: Any, mqtt_links, url: str, client_id: str | None = None, **options: Any) -> Ingest:
    """An ingest on a link with its deployment settings (persistent session, manual acknowledgement, MQTT 5),
    subscribed before the link connects, as the server does (what the session holds arrives right after CONNACK)."""
    config = ingest_config(url, client_id or f"ingest-{uuid.uuid4().hex[:8]}", protocol="5", **FAST_RECONNECT)
    link = mqtt_links.make(config)
    ingest = Ingest(store, link, **options)
    ingest.start()
    link.start()
    assert ingest.wait_subscribed()
    return ingest


@pytest.fixture
def running(store: Store, mosquitto, mqtt_links) -> Iterator[tuple[Ingest, MqttLink]]:
    """An ingest on its own link, and an edge link to publish with."""
    ingest = start_ingest(store, mqtt_links, mosquitto.url)
    yield ingest, mqtt_links(mosquitto)
    ingest.stop()


def publish_all(link: MqttLink, messages: Sequence[tuple[str, bytes]]) -> None:
    handles = [link.publish(topic, payload, qos=1) for topic, payload in messages]
    assert all(h.wait(10.0) for h in handles)


def settled(ingest: Ingest, received: int, timeout: float = 15.0) -> IngestStats:
    """Wait until `received` messages came in and every one of them reached a final counter."""
    assert wait_until(lambda: ingest.stats().received >= received, timeout), ingest.stats()
    assert ingest.wait_idle(timeout)
    stats = ingest.stats()
    assert stats.received == received and stats.accounted == received, stats
    return stats


def stored_ids(store: Store) -> set[str]:
    return {s.event.event_id for s in store.events()}


def test_bad_input_is_rejected_and_counted_while_valid_events_are_stored(store: Store, running, caplog):
    caplog.set_level(logging.WARNING, logger="enrollment_server.ingest")
    ingest, edge = running
    door1 = topics.edge_events("door-1")
    huge = as_object(event(seq=90), padding="x" * 70_000)  # valid JSON, over the 64 KiB event limit
    bad = {
        "malformed": b'{"schema": "faceattend.attendance_event", "seq": ',
        "oversized": huge,
        "unknown_major": as_object(event(seq=91), schema_version="2.0"),
        "wrong_schema": as_object(event(seq=92), schema="faceattend.attendance_evnt"),
        "device_mismatch": event(device="door-2", seq=93).to_json(),  # published on door-1's topic
        "not_utf8": b'{"schema": "faceattend.attendance_event", "name": "\xff\xfe"}',
        "invalid_field": as_object(event(seq=94), seq=-1),
        "empty": b"",
    }
    good = [event(seq=i) for i in range(len(bad) + 1)]
    messages = []
    for valid, payload in zip(good, bad.values(), strict=False):  # each bad message between two valid ones
        messages += [(door1, valid.to_json()), (door1, payload)]
    messages.append((door1, good[-1].to_json()))
    # statuses and acks are checked the same way
    status = EdgeStatus("online", "door-1", SITE, "0.1.0", 1, FP, utc_now())
    messages += [
        (topics.edge_status("door-1"), status.to_json()),
        (topics.edge_status("door-9"), status.to_json()),  # device_mismatch
        (topics.gallery_ack("door-1"), as_object_ack(status="maybe")),  # invalid_field
        (topics.gallery_ack("door-1"), GalleryAck("door-1", SITE, 1, "ok", None, utc_now()).to_json()),
    ]
    publish_all(edge, messages)

    stats = settled(ingest, len(messages))
    assert (stats.stored, stats.duplicates, stats.statuses, stats.acks) == (len(good), 0, 1, 1)
    assert dict(stats.rejected) == {reason: 1 for reason in bad} | {"device_mismatch": 2, "invalid_field": 2}
    assert stored_ids(store) == {g.event_id for g in good}
    assert store.count_events() == len(good)
    for reason in bad:
        assert f"on {door1}: {reason}:" in caplog.text

    # still running: the next valid event is stored
    late = event(seq=100)
    publish_all(edge, [(door1, late.to_json())])
    assert settled(ingest, len(messages) + 1).stored == len(good) + 1
    assert late.event_id in stored_ids(store)


def as_object_ack(**changes: Any) -> bytes:
    obj = GalleryAck("door-1", SITE, 1, "ok", None, utc_now()).to_object()
    obj.update(changes)
    return json.dumps(obj).encode()


def test_the_same_event_three_times_is_stored_once(store: Store, running):
    ingest, edge = running
    e = event(seq=7)
    publish_all(edge, [(topics.edge_events("door-1"), e.to_json())] * 3)
    stats = settled(ingest, 3)
    assert (stats.stored, stats.duplicates) == (1, 2)
    [stored] = store.events()
    assert stored.event.event_id == e.event_id and stored.duplicates == 2
    assert stored.event.site_id == SITE and stored.event.person_id == "alice" and stored.event.seq == 7
    assert stats.max_lag_s is not None and 0 <= stats.max_lag_s < 5


def test_event_id_spellings_are_one_event(store: Store, running):
    ingest, edge = running
    e = event(seq=8)
    publish_all(
        edge,
        [
            (topics.edge_events("door-1"), e.to_json()),
            (topics.edge_events("door-1"), as_object(e, event_id=e.event_id.upper())),
        ],
    )
    stats = settled(ingest, 2)
    assert (stats.stored, stats.duplicates) == (1, 1)


def test_events_published_while_the_server_is_away_wait_in_its_session(store: Store, mosquitto, mqtt_links):
    config = ingest_config(mosquitto.url, f"server-ingest-{uuid.uuid4().hex[:8]}", protocol="5", **FAST_RECONNECT)
    first_link = mqtt_links.make(config)
    first = Ingest(store, first_link)
    first.start()
    first_link.start()
    assert first_link.wait_connected(10.0)
    assert first.wait_subscribed()
    assert first.stop()
    first_link.stop()  # the server goes away: its session (and subscription) stays at the broker

    edge = mqtt_links(mosquitto)
    away = [event(seq=i) for i in range(20)]
    publish_all(edge, [(topics.edge_events("door-1"), e.to_json()) for e in away])

    again_link = mqtt_links.make(config)
    again = Ingest(store, again_link)
    again.start()  # subscribes before connecting: the queued events arrive right after CONNACK
    again_link.start()
    stats = settled(again, 20)
    assert stats.stored == 20
    assert stored_ids(store) == {e.event_id for e in away}
    again.stop()


class GatedStore:
    """The real store, with insert_events held until the test opens the gate."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.gate = threading.Event()

    def insert_events(self, batch, **kw):  # type: ignore[no-untyped-def]
        self.gate.wait(30.0)
        return self._store.insert_events(batch, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_full_queue_holds_the_network_thread_and_loses_nothing(store: Store, mosquitto, mqtt_links):
    gated = GatedStore(store)
    ingest = start_ingest(gated, mqtt_links, mosquitto.url, queue_size=2, batch_size=1)
    edge = mqtt_links(mosquitto)
    sent = [event(seq=i) for i in range(40)]
    handles = [edge.publish(topics.edge_events("door-1"), e.to_json()) for e in sent]
    assert all(h.wait(10.0) for h in handles)  # the broker took them all (and queues for the slow consumer)
    assert wait_until(lambda: ingest.stats().backpressure_waits >= 1)
    held = ingest.stats()
    assert held.stored == 0 and held.received <= 3  # 1 in the worker, 2 queued (1 more waits in the handler)
    gated.gate.set()
    stats = settled(ingest, 40)
    assert stats.stored == 40 and stats.max_queue_depth == 2
    assert stored_ids(store) == {e.event_id for e in sent}
    ingest.stop()


class FlakyStore:
    """The real store behind a switchable failure: `down` (every call fails as an unreachable database does) or
    one poisoned event_id (its batches are refused for their data, as a PostgreSQL DataError is)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.down = False
        self.poison: str | None = None
        self.failures = 0

    def _check(self, batch: Sequence[Any] = ()) -> None:
        if self.down:
            self.failures += 1
            raise StoreError("database error: connection refused (simulated)")
        if any(e.event_id == self.poison for e in batch):
            self.failures += 1
            raise StoreDataError("database refused the data: integer out of range (simulated)")

    def insert_events(self, batch, **kw):  # type: ignore[no-untyped-def]
        self._check(batch)
        return self._store.insert_events(batch, **kw)

    def schema_version(self) -> int:
        self._check()
        return self._store.schema_version()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_an_unreachable_database_is_retried_and_a_refused_row_rejected_alone(store: Store, mosquitto, mqtt_links):
    flaky = FlakyStore(store)
    ingest = start_ingest(flaky, mqtt_links, mosquitto.url)
    edge = mqtt_links(mosquitto)
    door1 = topics.edge_events("door-1")

    flaky.down = True
    during = [event(seq=i) for i in range(10)]
    publish_all(edge, [(door1, e.to_json()) for e in during])
    assert wait_until(lambda: ingest.stats().store_retries >= 2)
    assert ingest.stats().stored == 0
    flaky.down = False
    stats = settled(ingest, 10)
    assert stats.stored == 10 and stats.rejected_total == 0

    poisoned = [event(seq=i) for i in range(20, 30)]
    flaky.poison = poisoned[4].event_id
    # published back to back, so they can share a batch with the poisoned one
    publish_all(edge, [(door1, e.to_json()) for e in poisoned])
    stats = settled(ingest, 20)
    assert stats.stored == 19 and dict(stats.rejected) == {"store_refused": 1}
    assert stored_ids(store) == {e.event_id for e in during + poisoned} - {flaky.poison}
    ingest.stop()


def test_a_row_the_database_cannot_hold_is_rejected_alone(db: Db, store: Store, running):
    ingest, edge = running
    door1 = topics.edge_events("door-1")
    # valid on the wire; PostgreSQL refuses NUL in text (a DataError), SQLite stores it
    nul = dataclasses.replace(event(seq=5), name="a\x00b")
    batch = [event(seq=4), nul, event(seq=6)]
    publish_all(edge, [(door1, e.to_json()) for e in batch])
    stats = settled(ingest, 3)
    if db.backend == "postgresql":
        assert stats.stored == 2 and dict(stats.rejected) == {"store_refused": 1}
        assert stored_ids(store) == {batch[0].event_id, batch[2].event_id}
    else:
        assert stats.stored == 3 and stats.rejected_total == 0


def test_a_write_lock_held_by_another_writer_is_waited_out_not_rejected(tmp_path, mosquitto, mqtt_links):
    """Fix 8: under lock contention the writes fail while the database answers every read. Those events were
    received (and, before manual acknowledgement, already acknowledged): rejecting them lost them."""
    path = tmp_path / "locked.db"
    store = Store.open(path, busy_timeout_s=0.2)  # each write gives up on the lock after 0.2 s
    try:
        ingest = start_ingest(store, mqtt_links, mosquitto.url)
        edge = mqtt_links(mosquitto)
        other = sqlite3.connect(path, isolation_level=None)  # another writer (a backup, an admin's sqlite3 shell)
        other.execute("BEGIN IMMEDIATE")
        sent = [event(seq=i) for i in range(5)]
        publish_all(edge, [(topics.edge_events("door-1"), e.to_json()) for e in sent])
        assert wait_until(lambda: ingest.stats().store_retries >= 4, timeout=10.0)
        time.sleep(2.0)  # several seconds of contention: well past three failed writes
        assert ingest.stats().rejected_total == 0
        other.execute("COMMIT")
        other.close()
        stats = settled(ingest, 5, timeout=20.0)
        assert stats.stored == 5 and stats.rejected_total == 0, stats
        assert stored_ids(store) == {e.event_id for e in sent}
        ingest.stop()
    finally:
        store.close()


def test_events_are_acknowledged_only_after_their_commit(store: Store, mosquitto, mqtt_links):
    """A server that dies with events received but not committed gets them again: the broker has no PUBACK for
    them. The first server's network path is cut while its store is stalled (it can neither commit nor send
    anything); a second server on the same session must receive and store every event."""
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    relay = TcpProxy(mosquitto.port)
    gated = GatedStore(store)
    first = start_ingest(gated, mqtt_links, relay.url, client_id)
    edge = mqtt_links(mosquitto)
    sent = [event(seq=i) for i in range(30)]
    publish_all(edge, [(topics.edge_events("door-1"), e.to_json()) for e in sent])
    assert wait_until(lambda: first.stats().received == 30)  # all taken off the wire, none committed
    relay.cut()  # the first server vanishes: no DISCONNECT, no PUBACK (its link retries the dead relay)
    try:
        second = start_ingest(store, mqtt_links, mosquitto.url, client_id)
        stats = settled(second, 30)
        assert stats.stored == 30 and stored_ids(store) == {e.event_id for e in sent}
        second.stop()
    finally:
        gated.gate.set()  # the first one may store them now: duplicates, counted as such
        first.stop()
        relay.close()
    assert first.stats().duplicates + first.stats().stored == 30


def test_new_edges_get_confirmations_and_an_old_edges_events_are_stored_unconfirmed(store: Store, running, mqtt_links):
    ingest, edge = running
    confirmations: list[EventsStored] = []
    tap = edge  # the edge link reads its own confirmations, as a 1.1 edge does
    tap.subscribe(topics.events_stored("door-1"), 1, lambda m: confirmations.append(EventsStored.from_json(m.payload)))
    assert tap.wait_subscribed(topics.events_stored("door-1"), 5.0)
    old = (GOLDEN / "1.0" / "attendance_event.json").read_bytes()  # byte for byte what a 1.0 edge sends
    old_event = AttendanceEvent.from_json(old)
    new = event(device=old_event.device_id, seq=8)
    again = event(device=old_event.device_id, seq=9)
    publish_all(edge, [(topics.edge_events(old_event.device_id), p) for p in (old, new.to_json())])
    stats = settled(ingest, 2)
    assert stats.stored == 2 and stored_ids(store) == {old_event.event_id, new.event_id}
    assert wait_until(lambda: len(confirmations) == 1)
    assert confirmations[0].event_ids == (new.event_id,)  # the 1.0 edge's event is not confirmed: it never reads
    # a duplicate is confirmed again (the edge publishes again when it missed the first confirmation)
    publish_all(edge, [(topics.edge_events("door-1"), p) for p in (new.to_json(), again.to_json())])
    stats = settled(ingest, 4)
    assert (stats.stored, stats.duplicates) == (3, 1)
    assert wait_until(lambda: {i for c in confirmations for i in c.event_ids} == {new.event_id, again.event_id})
    assert sum(len(c.event_ids) for c in confirmations) == 3
    assert stats.confirmed == 3 and stats.confirmations >= 2


def test_a_device_files_events_only_under_its_registered_site(store: Store, running, caplog):
    """The site comes from the device registry (provision-device writes it; an unprovisioned device is pinned to the
    site of its first message), never from the payload alone: a door cannot file attendance at another site."""
    caplog.set_level(logging.WARNING, logger="enrollment_server.ingest")
    ingest, edge = running
    store.register_device("door-7", SITE)  # what provision-device --device door-7 --site hq records
    door7 = topics.edge_events("door-7")

    def at(site: str, seq: int) -> AttendanceEvent:
        e = event(device="door-7", seq=seq)
        return AttendanceEvent.from_json(as_object(e, site=site))

    home, away = at(SITE, 1), at("branch", 2)
    status_away = EdgeStatus("online", "door-7", "branch", "0.1.0", 1, FP, utc_now())
    ack_away = GalleryAck("door-7", "branch", 1, "ok", None, utc_now())
    publish_all(
        edge,
        [
            (door7, home.to_json()),
            (door7, away.to_json()),
            (topics.edge_status("door-7"), status_away.to_json()),
            (topics.gallery_ack("door-7"), ack_away.to_json()),
        ],
    )
    stats = settled(ingest, 4)
    assert stats.stored == 1 and dict(stats.rejected) == {"site_mismatch": 3}
    assert stored_ids(store) == {home.event_id}
    assert "registered at site 'hq'" in caplog.text
    assert [(d.device_id, d.site_id) for d in store.list_devices()] == [("door-7", SITE)]

    # an unprovisioned device is pinned to the site of its first message
    first, other = (
        event(device="door-8", seq=1),
        AttendanceEvent.from_json(as_object(event(device="door-8", seq=2), site="branch")),
    )
    publish_all(
        edge, [(topics.edge_events("door-8"), first.to_json()), (topics.edge_events("door-8"), other.to_json())]
    )
    stats = settled(ingest, 6)
    assert stats.stored == 2 and stats.rejected["site_mismatch"] == 4
    assert store.device_site("door-8") == SITE

    # moved by provisioning (another process): the registry is read again before anything is refused
    store.register_device("door-7", "branch")
    later = at("branch", 3)
    publish_all(edge, [(door7, later.to_json())])
    assert settled(ingest, 7).stored == 3 and later.event_id in stored_ids(store)
