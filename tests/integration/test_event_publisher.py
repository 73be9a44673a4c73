"""The outbox drained to a real Mosquitto by EventPublisher (edge_agent/delivery/event_publisher.py): delivery and
latency, a broker outage, a graceful stop with the broker down, and `kill -9` of the publishing process.

The consumer is a persistent session (clean_session=False, a stable client id, QoS 1), as the server's ingest is:
what the broker accepted while the consumer was away is delivered when it is back.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from outbox_child import make_event
from waiting import wait_until

from edge_agent.delivery.event_publisher import EventPublisher
from edge_agent.delivery.outbox import Outbox
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


class HeldLink:
    """A TCP relay in front of the broker whose traffic can be held: `hold()` freezes the network path (bytes
    wait in the relay, nothing is acknowledged), `release()` lets them through."""

    def __init__(self, broker_port: int) -> None:
        self._broker_port = broker_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self._broker_port))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                sock.close()


@pytest.fixture
def consumer(mosquitto, mqtt_links) -> Consumer:
    received = Consumer()
    link = mqtt_links(mosquitto, client_id=f"ingest-{uuid.uuid4().hex[:8]}", clean_session=False)
    link.subscribe(topics.ALL_EDGE_EVENTS, 1, received)
    # once a probe comes back the subscription is in place: from then on the broker keeps everything for us
    assert link.publish(PROBE_TOPIC, b"probe").wait(5.0)
    assert received.subscribed.wait(5.0)
    return received


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


def start_publisher(made: list[EventPublisher], box: Outbox, link) -> EventPublisher:
    publisher = EventPublisher(box, link)
    made.append(publisher)
    publisher.start()
    return publisher


def put(box: Outbox, publisher: EventPublisher) -> AttendanceEvent:
    event = box.put_new(lambda seq: make_event(DEVICE, seq))
    publisher.notify()
    return event


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def test_every_event_arrives_and_the_outbox_empties(mosquitto, mqtt_links, consumer, outbox, publishers) -> None:
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
    assert wait_until(lambda: publisher.stats().acked == 400)
    stats = publisher.stats()
    assert (stats.published, stats.republished, stats.in_flight, stats.depth, stats.oldest_age_s) == (400, 0, 0, 0, 0)
    assert stats.connected and stats.last_error is None


def test_broker_outage_loses_nothing(mosquitto, mqtt_links, consumer, outbox, publishers) -> None:
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


def test_stop_with_the_broker_down_keeps_every_event(mosquitto, mqtt_links, consumer, tmp_path) -> None:
    path = tmp_path / "graceful.db"
    box = Outbox.open(path)
    link = mqtt_links(mosquitto)
    publisher = EventPublisher(box, link)
    publisher.start()
    mosquitto.stop()
    assert wait_until(lambda: not link.is_connected())
    ids = [put(box, publisher).event_id for _ in range(10)]
    assert publisher.stop(1.0)
    assert box.depth() == 10
    box.close()

    mosquitto.start()
    box = Outbox.open(path)
    again = EventPublisher(box, mqtt_links(mosquitto))
    again.start()
    try:
        assert wait_until(lambda: consumer.has(ids) and box.depth() == 0)
    finally:
        assert again.stop(2.0)
        box.close()


@pytest.fixture
def held_link(mosquitto) -> Iterator[HeldLink]:
    relay = HeldLink(mosquitto.port)
    yield relay
    relay.close()


def test_kill_9_mid_run_loses_nothing_and_reuses_no_seq(mosquitto, mqtt_links, consumer, held_link, tmp_path) -> None:
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
        assert left >= held  # none of the held events was acknowledged, so none left the outbox
        publisher = EventPublisher(box, mqtt_links(mosquitto))
        publisher.start()
        later = [put(box, publisher) for _ in range(20)]
        assert [e.seq for e in later] == list(range(next_seq, next_seq + 20))  # no seq handed out twice
        everything = set(range(next_seq + 20))
        assert wait_until(lambda: consumer.seqs == everything and box.depth() == 0, timeout=20.0), (
            f"missing seqs: {sorted(everything - consumer.seqs)[:20]}"
        )
        assert consumer.has(list(committed.values()))
        assert publisher.stop(2.0)
    finally:
        box.close()
    print(
        f"\nkill -9: child reported {len(committed)} committed events ({held} while the network path was frozen), "
        f"{next_seq} committed by the kill, {received_before} received before the restart, {left} left in the outbox"
        f"; after restart + 20 new: {consumer.count()} distinct delivered, {consumer.duplicates} duplicates"
    )


def test_missing_pubacks_are_published_again_after_the_ack_timeout(
    mosquitto, mqtt_links, consumer, held_link, outbox, publishers
) -> None:
    # the link stays connected (TCP up, keep-alive not yet due) but nothing comes back: lost PUBACKs
    publisher = EventPublisher(outbox, mqtt_links(held_link), ack_timeout_s=0.5)
    publishers.append(publisher)
    publisher.start()
    held_link.hold()
    ids = [put(outbox, publisher).event_id for _ in range(10)]
    assert wait_until(lambda: publisher.stats().republished >= 10, timeout=5.0)
    assert outbox.depth() == 10  # nothing acknowledged: everything still in the outbox
    held_link.release()
    assert wait_until(lambda: consumer.has(ids) and outbox.depth() == 0)
    stats = publisher.stats()
    assert stats.acked == 10 and stats.in_flight == 0 and stats.published == 10 + stats.republished
