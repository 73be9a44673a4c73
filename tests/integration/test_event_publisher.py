"""The outbox drained to a real Mosquitto by EventPublisher (edge_agent/delivery/event_publisher.py): delivery and
latency, a broker outage, a graceful stop with the broker down, `kill -9` of the publishing process, events the
broker acknowledged but never delivered, and a server that never confirms (older than contract 1.1).

The server is the real ingest (enrollment_server/ingest.py) on a SQLite store: it confirms what it stored, which
is what empties the outbox. Beside it a consumer with a persistent session records every delivery (first arrival
per event_id, duplicates), as a dashboard would.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST_RECONNECT
from outbox_child import make_event
from tcp_proxy import TcpProxy
from waiting import wait_until

from edge_agent.delivery.event_publisher import DeliveryConfig, EventPublisher
from edge_agent.delivery.outbox import Outbox
from enrollment_server.ingest import Ingest, ingest_config
from enrollment_server.store import Store
from models.contract import topics
from models.contract.events import AttendanceEvent
from models.contract.mqtt_link import InboundMessage

DEVICE = "door-7"
PROBE_TOPIC = topics.edge_events("probe")
CHILD = Path(__file__).with_name("outbox_child.py")
REPO = Path(__file__).resolve().parents[2]


class Consumer:
    """Records every event received: first arrival time per event_id, and the duplicates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.first_seen: dict[str, float] = {}
        self.seqs: set[int] = set()
        self.duplicates = 0
        self.subscribed = threading.Event()

    def __call__(self, msg: InboundMessage) -> None:
        now = time.monotonic()
        if msg.topic == PROBE_TOPIC:
            self.subscribed.set()
            return
        event = AttendanceEvent.from_json(msg.payload)
        with self._lock:
            if event.event_id in self.first_seen:
                self.duplicates += 1
                return
            self.first_seen[event.event_id] = now
            self.seqs.add(event.seq)

    def has(self, event_ids: list[str]) -> bool:
        with self._lock:
            return all(e in self.first_seen for e in event_ids)

    def count(self) -> int:
        with self._lock:
            return len(self.first_seen)


@pytest.fixture
def consumer(mosquitto, mqtt_links) -> Consumer:
    received = Consumer()
    link = mqtt_links(mosquitto, client_id=f"ingest-{uuid.uuid4().hex[:8]}", clean_session=False)
    link.subscribe(topics.ALL_EDGE_EVENTS, 1, received)
    # once a probe comes back the subscription is in place: from then on the broker keeps everything for us
    assert link.publish(PROBE_TOPIC, b"probe").wait(5.0)
    assert received.subscribed.wait(5.0)
    return received


class Server:
    """The real ingest on its own SQLite store, with the deployment's link settings (persistent session, manual
    acknowledgement after the commit, MQTT 5); `start()` / `stop()` as a server process comes and goes."""

    def __init__(self, broker, mqtt_links, store: Store) -> None:
        self._broker = broker
        self._links = mqtt_links
        self.store = store
        self.client_id = f"ingest-{uuid.uuid4().hex[:8]}"
        self.ingest: Ingest | None = None
        self._link = None

    def start(self) -> Server:
        config = ingest_config(self._broker.url, self.client_id, protocol="5", **FAST_RECONNECT)
        self._link = self._links.make(config)
        self.ingest = Ingest(self.store, self._link)
        self.ingest.start()
        self._link.start()
        assert self._link.wait_connected(10.0) and self.ingest.wait_subscribed()
        return self

    def stop(self) -> None:
        if self.ingest is not None and self._link is not None:
            self.ingest.stop()
            self._link.stop()
            self.ingest = self._link = None

    def stored(self) -> set[str]:
        return {s.event.event_id for s in self.store.events(device_id=DEVICE)}


@pytest.fixture
def server(mosquitto, mqtt_links, tmp_path: Path) -> Iterator[Server]:
    store = Store.open(tmp_path / "server.db")
    running = Server(mosquitto, mqtt_links, store).start()
    yield running
    running.stop()
    store.close()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path / "outbox.db")
    yield box
    box.close()


@pytest.fixture
def publishers() -> Iterator[list[EventPublisher]]:
    made: list[EventPublisher] = []
    yield made
    for publisher in made:
        publisher.stop(2.0)


def start_publisher(made: list[EventPublisher], box: Outbox, link, **options) -> EventPublisher:
    publisher = EventPublisher(box, link, DEVICE, **options)
    made.append(publisher)
    publisher.start()
    return publisher


def put(box: Outbox, publisher: EventPublisher) -> AttendanceEvent:
    event = box.put_new(lambda seq: make_event(DEVICE, seq))
    publisher.notify()
    return event


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_every_event_arrives_and_the_outbox_empties(
    mosquitto, mqtt_links, server, consumer, outbox, publishers
) -> None:
    publisher = start_publisher(publishers, outbox, mqtt_links(mosquitto))
    put_at: dict[str, float] = {}
    # paced like a busy door, then a burst larger than the in-flight window
    for _ in range(100):
        t0 = time.monotonic()
        put_at[put(outbox, publisher).event_id] = t0
        time.sleep(0.01)
    paced = list(put_at)
    for _ in range(300):
        t0 = time.monotonic()
        put_at[put(outbox, publisher).event_id] = t0
    assert wait_until(lambda: consumer.has(list(put_at)) and outbox.depth() == 0)

    latency_ms = [(consumer.first_seen[e] - put_at[e]) * 1000 for e in paced]
    burst_ms = [(consumer.first_seen[e] - put_at[e]) * 1000 for e in put_at if e not in set(paced)]
    p50, p95 = percentile(latency_ms, 50), percentile(latency_ms, 95)
    print(
        f"\nput -> subscriber latency, 100 paced events: p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(latency_ms):.1f}"
        f" ms; 300-event burst: p50 {percentile(burst_ms, 50):.1f} ms, p95 {percentile(burst_ms, 95):.1f} ms"
    )
    assert p95 <= 500
    assert consumer.seqs == set(range(400))
    assert wait_until(lambda: publisher.stats().confirmed == 400)
    assert server.stored() == set(put_at)
    stats = publisher.stats()
    assert (stats.published, stats.acked, stats.republished, stats.in_flight, stats.depth) == (400, 400, 0, 0, 0)
    assert stats.awaiting_confirmation == 0 and stats.oldest_age_s == 0
    assert stats.connected and stats.confirmations_subscribed and stats.last_error is None
    assert stats.last_confirmation_age_s is not None and not stats.confirmation_overdue


def test_broker_outage_loses_nothing(mosquitto, mqtt_links, server, consumer, outbox, publishers) -> None:
    publisher = start_publisher(publishers, outbox, mqtt_links(mosquitto))
    ids = [put(outbox, publisher).event_id for _ in range(20)]
    assert wait_until(lambda: consumer.has(ids))

    stop_writer = threading.Event()

    def keep_putting() -> None:  # the door goes on seeing people through the outage
        while not stop_writer.is_set():
            ids.append(put(outbox, publisher).event_id)
            time.sleep(0.02)

    writer = threading.Thread(target=keep_putting)
    writer.start()
    try:
        time.sleep(0.2)
        mosquitto.stop()  # SIGTERM: the consumer's persistent session is saved
        time.sleep(1.5)
        during = publisher.stats()
        mosquitto.start()
        time.sleep(0.5)
    finally:
        stop_writer.set()
        writer.join(10)
    assert not during.connected and during.depth > 20
    ids += [put(outbox, publisher).event_id for _ in range(20)]
    assert wait_until(lambda: consumer.has(ids) and outbox.depth() == 0, timeout=20.0)
    stats = publisher.stats()
    print(
        f"\noutage: {len(ids)} events, {during.depth} waiting in the outbox during the outage (oldest "
        f"{during.oldest_age_s:.2f} s); delivered {consumer.count()}, duplicates at the consumer "
        f"{consumer.duplicates}, republished by the publisher {stats.republished}"
    )
    assert consumer.seqs == set(range(len(ids)))
    assert stats.depth == 0 and stats.in_flight == 0
    assert server.stored() == set(ids)


def test_stop_with_the_broker_down_keeps_every_event(mosquitto, mqtt_links, server, consumer, tmp_path) -> None:
    path = tmp_path / "graceful.db"
    box = Outbox.open(path)
    link = mqtt_links(mosquitto)
    publisher = EventPublisher(box, link, DEVICE)
    publisher.start()
    mosquitto.stop()
    assert wait_until(lambda: not link.is_connected())
    ids = [put(box, publisher).event_id for _ in range(10)]
    assert publisher.stop(1.0)
    assert box.depth() == 10
    box.close()

    mosquitto.start()
    box = Outbox.open(path)
    again = EventPublisher(box, mqtt_links(mosquitto), DEVICE)
    again.start()
    try:
        assert wait_until(lambda: consumer.has(ids) and box.depth() == 0)
        assert server.stored() == set(ids)
    finally:
        assert again.stop(2.0)
        box.close()


@pytest.fixture
def held_link(mosquitto) -> Iterator[TcpProxy]:
    relay = TcpProxy(mosquitto.port)
    yield relay
    relay.close()


def test_kill_9_mid_run_loses_nothing_and_reuses_no_seq(
    mosquitto, mqtt_links, server, consumer, held_link, tmp_path
) -> None:
    path = tmp_path / "edge.db"
    total, flowing, held = 400, 100, 80
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), held_link.url, DEVICE, str(total), "0.002"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    committed: dict[int, str] = {}

    def read_committed(n: int) -> None:
        assert child.stdout is not None
        for _ in range(n):
            seq, event_id = child.stdout.readline().split()
            committed[int(seq)] = event_id

    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        read_committed(flowing)
        # the network path freezes: the next events are committed and published, but no PUBACK can come back
        held_link.hold()
        read_committed(held)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    # what the dead edge had sent reaches the broker now: those events arrive twice in the end
    held_link.release()
    received_before = consumer.count()

    box = Outbox.open(path)
    try:
        next_seq, left = box.next_seq(), box.depth()
        # every reported event was committed; more may have been committed before the kill landed
        assert next_seq >= flowing + held and max(committed) < next_seq
        assert left >= held  # none of the held events was confirmed, so none left the outbox
        publisher = EventPublisher(box, mqtt_links(mosquitto), DEVICE)
        publisher.start()
        later = [put(box, publisher) for _ in range(20)]
        assert [e.seq for e in later] == list(range(next_seq, next_seq + 20))  # no seq handed out twice
        everything = set(range(next_seq + 20))
        assert wait_until(lambda: consumer.seqs == everything and box.depth() == 0, timeout=20.0), (
            f"missing seqs: {sorted(everything - consumer.seqs)[:20]}"
        )
        assert consumer.has(list(committed.values()))
        assert server.stored() >= set(committed.values())
        assert publisher.stop(2.0)
    finally:
        box.close()
    print(
        f"\nkill -9: child reported {len(committed)} committed events ({held} while the network path was frozen), "
        f"{next_seq} committed by the kill, {received_before} received before the restart, {left} left in the outbox"
        f"; after restart + 20 new: {consumer.count()} distinct delivered, {consumer.duplicates} duplicates"
    )


def test_missing_pubacks_are_published_again_after_the_ack_timeout(
    mosquitto, mqtt_links, server, consumer, held_link, outbox, publishers
) -> None:
    # the link stays connected (TCP up, keep-alive not yet due) but nothing comes back: lost PUBACKs
    publisher = EventPublisher(outbox, mqtt_links(held_link), DEVICE, ack_timeout_s=0.5)
    publishers.append(publisher)
    publisher.start()
    held_link.hold()
    ids = [put(outbox, publisher).event_id for _ in range(10)]
    assert wait_until(lambda: publisher.stats().republished >= 10, timeout=5.0)
    assert outbox.depth() == 10  # nothing acknowledged: everything still in the outbox
    held_link.release()
    assert wait_until(lambda: consumer.has(ids) and outbox.depth() == 0)
    stats = publisher.stats()
    assert stats.confirmed == 10 and stats.in_flight == 0 and stats.published == 10 + stats.republished
    assert server.stored() == set(ids)


def test_events_the_broker_acknowledged_but_never_delivered_are_published_again_until_stored(
    mosquitto, mqtt_links, tmp_path, outbox, publishers
) -> None:
    # no server session exists yet: the broker acknowledges every event and hands it to nobody, as a broker that
    # restarted without its persistence file does. The broker's PUBACK is not delivery: the outbox keeps them.
    fast = DeliveryConfig(confirm_timeout_s=1.0, max_republish_interval_s=2.0)
    publisher = start_publisher(publishers, outbox, mqtt_links(mosquitto), delivery=fast)
    ids = [put(outbox, publisher).event_id for _ in range(20)]
    assert wait_until(lambda: publisher.stats().acked >= 20)
    assert outbox.depth() == 20 and publisher.stats().confirmed == 0

    store = Store.open(tmp_path / "server.db")
    server = Server(mosquitto, mqtt_links, store).start()
    try:
        assert wait_until(lambda: outbox.depth() == 0, timeout=15.0), publisher.stats()
        assert server.stored() == set(ids)
        stats = publisher.stats()
        assert stats.confirmed == 20 and stats.republished >= 20
        print(
            f"\nnever delivered: 20 events PUBACKed with no subscriber, stored after the server came: "
            f"{stats.published} publications ({stats.republished} again), {stats.acked} PUBACKs"
        )
    finally:
        server.stop()
        store.close()


def test_a_server_that_never_confirms_is_reported_and_confirm_by_broker_forgets_on_puback(
    mosquitto, mqtt_links, consumer, tmp_path, caplog
) -> None:
    # the consumer stands for a server older than contract 1.1: it takes the events and never confirms
    caplog.set_level(logging.ERROR, logger="edge_agent.delivery.event_publisher")
    path = tmp_path / "old-server.db"
    box = Outbox.open(path)
    patient = DeliveryConfig(confirm_timeout_s=0.3, max_republish_interval_s=0.6, unconfirmed_warning_s=1.0)
    publisher = EventPublisher(box, mqtt_links(mosquitto), DEVICE, delivery=patient)
    publisher.start()
    try:
        ids = [put(box, publisher).event_id for _ in range(5)]
        assert wait_until(lambda: consumer.has(ids))
        watched = 3.0
        time.sleep(watched)
        stats = publisher.stats()
        assert box.depth() == 5 and stats.confirmed == 0  # kept: nobody said they are stored
        # re-published with a bounded back-off: at most one copy per 0.3, 0.6, 0.6 ... s per event
        assert 5 <= stats.republished <= 5 * (1 + int((watched - 0.3) / 0.6) + 1), stats
        assert stats.confirmation_overdue and "older than contract 1.1" in (stats.last_error or "")
        assert "no confirmation from the server" in caplog.text and "delivery.confirm_by: broker" in caplog.text
        duplicates = consumer.duplicates
        assert publisher.stop(1.0)
    finally:
        box.close()
    print(
        f"\nold server: 5 events kept, {stats.republished} re-publications in {watched:.0f} s, "
        f"{duplicates} duplicates at the server; overdue reported: {stats.last_error}"
    )

    # the operator's way out for such a server: the 1.0 behaviour, an event goes on the broker's PUBACK
    box = Outbox.open(path)
    broker_mode = EventPublisher(box, mqtt_links(mosquitto), DEVICE, delivery=DeliveryConfig(confirm_by="broker"))
    broker_mode.start()
    try:
        assert wait_until(lambda: box.depth() == 0)
        assert broker_mode.stats().confirmed == 5 and consumer.has(ids)
    finally:
        assert broker_mode.stop(2.0)
        box.close()
