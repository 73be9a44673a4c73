"""Simulated edges for tests/integration/test_ingest_load.py: one process running several edges.

Not a test module: `python load_edges.py URL SITE FIRST COUNT RATE DURATION` starts COUNT edges
(`load-door-{FIRST}` ...), each its own PahoMqttLink (own client id, own connection), prints `ready` once all are
connected, waits for a line on stdin, then publishes RATE events/s per edge for DURATION s, QoS 1, with a
per-device seq and event_id = uuid5(LOAD_NAMESPACE, "device:seq") so the test knows every id without being told.

Each edge behaves like an outbox: an event stays until one of its publishes is acknowledged, and after every
reconnect all unacknowledged events are published again (paho also resends its own unacknowledged copies: the
ingest sees duplicates, which it must count and not store). At the end the process waits for every event to be
acknowledged and prints one JSON line: published, republished, unacknowledged, reconnect times.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from models.contract import topics
from models.contract.events import AttendanceEvent
from models.contract.mqtt_link import MqttConfig, PahoMqttLink, PublishHandle
from models.contract.timestamps import utc_now

LOAD_NAMESPACE = uuid.UUID("6f6b2c1e-3f5d-4c3a-9a0e-2d1f3b4c5d6e")
DRAIN_TIMEOUT_S = 45.0


def event_id(device: str, seq: int) -> str:
    return str(uuid.uuid5(LOAD_NAMESPACE, f"{device}:{seq}"))


def device_id(i: int) -> str:
    return f"load-door-{i:03d}"


@dataclass
class SimEdge:
    device: str
    link: PahoMqttLink
    seq: int = 0
    outbox: dict[int, tuple[bytes, list[PublishHandle]]] = field(default_factory=dict)
    reconnected: threading.Event = field(default_factory=threading.Event)
    down_since: float | None = None
    reconnect_s: list[float] = field(default_factory=list)
    republished: int = 0

    def on_connection(self, up: bool) -> None:  # network thread: only note it, the main loop re-publishes
        now = time.monotonic()
        if not up:
            self.down_since = now
        elif self.down_since is not None:
            self.reconnect_s.append(now - self.down_since)
            self.down_since = None
            self.reconnected.set()

    def publish_next(self, site: str) -> None:
        self.seq += 1
        event = AttendanceEvent(
            event_id=event_id(self.device, self.seq),
            seq=self.seq,
            device_id=self.device,
            site=site,
            camera="cam0",
            track_id=self.seq,
            person_id=f"p{self.seq % 50:03d}",
            name=None,
            distance=0.3,
            margin=0.1,
            threshold=0.5,
            gallery_version=1,
            fingerprint="load-test",
            ts=utc_now(),
        )
        payload = event.to_json()
        self.outbox[self.seq] = (payload, [self.link.publish(topics.edge_events(self.device), payload, qos=1)])

    def prune(self) -> None:
        done = [seq for seq, (_, handles) in self.outbox.items() if any(h.acknowledged for h in handles)]
        for seq in done:
            del self.outbox[seq]

    def resend_if_reconnected(self) -> None:
        if not self.reconnected.is_set():
            return
        self.reconnected.clear()
        self.prune()
        for _, (payload, handles) in sorted(self.outbox.items()):
            handles.append(self.link.publish(topics.edge_events(self.device), payload, qos=1))
            self.republished += 1


def main(argv: list[str]) -> int:
    # paho's own warnings for every client during the planned broker stop would only bury the test's output
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    logging.getLogger("models.contract.mqtt_link.paho").setLevel(logging.CRITICAL)  # "not connected" per publish
    url, site, first, count, rate, duration = argv[0], argv[1], int(argv[2]), int(argv[3]), float(argv[4]), argv[5]
    seconds = float(duration)
    edges = []
    for i in range(first, first + count):
        device = device_id(i)
        config = MqttConfig.from_url(
            url, client_id=device, keepalive=5, reconnect_min_delay=1, reconnect_max_delay=2, max_inflight=200
        )
        edge = SimEdge(device, PahoMqttLink(config))
        edge.link.add_connection_listener(edge.on_connection)
        edge.link.start()
        edges.append(edge)
    if not all(e.link.wait_connected(20.0) for e in edges):
        print(json.dumps({"error": "edges did not connect"}), flush=True)
        return 2
    for edge in edges:
        edge.reconnected.clear()  # the first connection is not a reconnect
    print("ready", flush=True)
    sys.stdin.readline()  # the test starts every process at once

    ticks = round(seconds * rate)
    period = 1.0 / rate
    start = time.monotonic()
    for tick in range(ticks):
        # a fixed schedule: a late tick catches up at once instead of slowing the whole run down
        delay = start + tick * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for edge in edges:
            edge.resend_if_reconnected()
            edge.publish_next(site)
        if tick % 20 == 0:
            for edge in edges:
                edge.prune()
    generated = time.monotonic() - start

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        for edge in edges:
            edge.resend_if_reconnected()
            edge.prune()
        if not any(e.outbox for e in edges):
            break
        time.sleep(0.05)
    summary = {
        "published": sum(e.seq for e in edges),
        "republished": sum(e.republished for e in edges),
        "unacknowledged": sum(len(e.outbox) for e in edges),
        "reconnect_s": [r for e in edges for r in e.reconnect_s],
        "generate_s": generated,
    }
    for edge in edges:
        edge.link.stop()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
