"""An edge's status reporting in its own process, for the crash test in tests/integration/test_status.py.

Not a test module: `python status_child.py BROKER_URL DEVICE SITE` creates a PahoMqttLink with the retained
`offline` last will and a StatusReporter, prints `ready` once the broker acknowledged its `online` status, and
waits to be killed. The test SIGKILLs it: no `stopped`, no DISCONNECT, so the broker publishes the will.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from edge_agent.health.status import StatusConfig, StatusReporter, offline_will
from models.contract.mqtt_link import MqttConfig, PahoMqttLink

AGENT_VERSION = "0.1.0-child"
FINGERPRINT = "fp-child"


def main(url: str, device: str, site: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    will = offline_will(device, site, AGENT_VERSION, FINGERPRINT, gallery_version=7)
    link = PahoMqttLink(MqttConfig.from_url(url, reconnect_min_delay=1, reconnect_max_delay=2, keepalive=5), will=will)
    reporter = StatusReporter(
        link,
        device,
        site,
        AGENT_VERSION,
        FINGERPRINT,
        health=lambda: {"fps": 10.0, "cameras": {"front": {"fps": 10.0}}},
        gallery_version=lambda: 7,
        config=StatusConfig(interval_s=60.0),
    )
    link.start()
    reporter.start()
    deadline = time.monotonic() + 10.0
    while reporter.stats().acknowledged < 1:
        if time.monotonic() > deadline:
            sys.exit("child: online status not acknowledged")
        time.sleep(0.02)
    print("ready", flush=True)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
