"""Light edges for tests/integration/test_faults.py (not a test module): one process running several edges, each
with the real event path of an edge agent (its own SQLite `Outbox`, `EventPublisher` and `PahoMqttLink`, client
id = device id) but no camera: events (outbox_child.make_event) are made at a fixed rate instead of by
recognition.

    python fault_edges.py SPEC_JSON

SPEC_JSON: {"url", "workdir", "devices": [...], "rate": events/s per edge, "produce_s", "drain_s",
"confirm_timeout_s", "max_republish_interval_s"}. The process prints `ready` once every edge is connected, waits
for a line on stdin, then puts events for `produce_s` seconds. After each put is committed it appends
`<seq> <event_id>` to `workdir/<device>.created` (flushed: the test counts what was created even if this process
dies). Then it waits, for at most `drain_s`, until every outbox is empty, i.e. the server confirmed every event,
and prints one JSON line: per-edge outbox depth left and publisher figures.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from outbox_child import make_event

from edge_agent.delivery.event_publisher import DeliveryConfig, EventPublisher
from edge_agent.delivery.outbox import Outbox
from models.contract.mqtt_link import MqttConfig, PahoMqttLink


class Edge:
    def __init__(self, device: str, spec: dict) -> None:
        self.device = device
        workdir = Path(spec["workdir"])
        self.outbox = Outbox.open(workdir / f"{device}.outbox.db")
        self.created = (workdir / f"{device}.created").open("a", encoding="utf-8")
        config = MqttConfig.from_url(
            spec["url"], client_id=device, keepalive=5, reconnect_min_delay=1, reconnect_max_delay=2
        )
        self.link = PahoMqttLink(config)
        delivery = DeliveryConfig(
            confirm_timeout_s=spec["confirm_timeout_s"], max_republish_interval_s=spec["max_republish_interval_s"]
        )
        self.publisher = EventPublisher(self.outbox, self.link, device, delivery=delivery)
        self.publisher.start()
        self.link.start()

    def put(self) -> None:
        event = self.outbox.put_new(lambda seq: make_event(self.device, seq))
        self.publisher.notify()
        self.created.write(f"{event.seq} {event.event_id}\n")
        self.created.flush()

    def close(self) -> dict:
        stats = self.publisher.stats()
        self.publisher.stop(2.0)
        self.link.stop()
        self.outbox.close()
        self.created.close()
        return {
            "depth": stats.depth,
            "published": stats.published,
            "republished": stats.republished,
            "confirmed": stats.confirmed,
        }


def main(spec: dict) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    # the planned outages make paho and the publisher say so for every edge; the test reads the figures instead
    logging.getLogger("models.contract.mqtt_link").setLevel(logging.ERROR)
    edges = [Edge(device, spec) for device in spec["devices"]]
    if not all(e.link.wait_connected(20.0) for e in edges):
        print(json.dumps({"error": "edges did not connect"}), flush=True)
        return 2
    print("ready", flush=True)
    sys.stdin.readline()

    period = 1.0 / spec["rate"]
    start = time.monotonic()
    for tick in range(round(spec["produce_s"] * spec["rate"])):
        delay = start + tick * period - time.monotonic()  # a fixed schedule: a late tick catches up at once
        if delay > 0:
            time.sleep(delay)
        for edge in edges:
            edge.put()
    produced_s = time.monotonic() - start

    deadline = time.monotonic() + spec["drain_s"]
    while any(e.outbox.depth() for e in edges) and time.monotonic() < deadline:
        time.sleep(0.1)
    drained_s = time.monotonic() - start - produced_s
    print(
        json.dumps(
            {
                "produced_s": produced_s,
                "drained_s": drained_s,
                "edges": {e.device: e.close() for e in edges},
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
