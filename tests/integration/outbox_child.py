"""An edge's event path in its own process, for the kill -9 test in tests/integration/test_event_publisher.py.

Not a test module: `python outbox_child.py OUTBOX_PATH BROKER_URL DEVICE COUNT INTERVAL_S` opens the outbox, starts
a PahoMqttLink and an EventPublisher, prints `ready` once connected, then puts COUNT events (one every
INTERVAL_S seconds), printing `<seq> <event_id>` after each commit (so the test knows the event is on disk),
then `done`, and waits to be killed. The test SIGKILLs it part-way: no DISCONNECT, no clean stop, whatever was in
flight or never published stays in the outbox file.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from edge_agent.delivery.event_publisher import EventPublisher
from edge_agent.delivery.outbox import Outbox
from models.contract.events import AttendanceEvent, new_event
from models.contract.mqtt_link import MqttConfig, PahoMqttLink


def make_event(device: str, seq: int) -> AttendanceEvent:
    return new_event(
        seq=seq,
        device_id=device,
        site="hq",
        camera="front",
        track_id=seq,
        person_id=None,
        name=None,
        distance=None,
        margin=None,
        threshold=0.6,
        gallery_version=1,
        fingerprint="fp-test",
    )


def main(path: str, url: str, device: str, count: int, interval_s: float) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    outbox = Outbox.open(path)
    link = PahoMqttLink(MqttConfig.from_url(url, reconnect_min_delay=1, reconnect_max_delay=2, keepalive=5))
    publisher = EventPublisher(outbox, link, device)
    link.start()
    publisher.start()
    if not link.wait_connected(10.0):
        sys.exit("child: no connection to the broker")
    print("ready", flush=True)
    for _ in range(count):
        event = outbox.put_new(lambda seq: make_event(device, seq))
        publisher.notify()
        print(event.seq, event.event_id, flush=True)
        time.sleep(interval_s)
    print("done", flush=True)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
