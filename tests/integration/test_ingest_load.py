"""Ingest under load (benchmark-style, prints its figures): 50 simulated edges x 20 events/s for 30 s through a
real Mosquitto, which is stopped for ~2 s mid-run and started again on the same port.

The edges run in a few processes (tests/integration/load_edges.py, 10 edges each: 50 paho clients with their
network threads in one process would compete with the ingest for the GIL on a 2-core machine), each edge its own
client id and connection, re-publishing its unacknowledged events after a reconnect like an outbox. The ingest
uses a persistent session, and the broker runs with `max_queued_messages` raised as a deployment must (the
default 1000 is less than what 50 edges re-send in the seconds after the restart, see enrollment_server.ingest).

At the end every one of the 30,000 event ids is in the store exactly once (the id is the primary key, so the check
is that none is missing and nothing else is there), and the redeliveries are counted as duplicates. The ingest
runs as deployed: MQTT 5, each event acknowledged to the broker after its commit, confirmations published.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from load_edges import device_id, event_id

from enrollment_server.ingest import Ingest, ingest_config
from enrollment_server.store import Store

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOAD_EDGES = Path(__file__).with_name("load_edges.py")
SITE = "load"
EDGES, PROCESSES, RATE, DURATION_S = 50, 5, 20.0, 30.0
RESTART_AT_S, DOWN_S = 12.0, 2.0
TOTAL = int(EDGES * RATE * DURATION_S)
BUDGET_S = 90.0


def test_50_edges_through_a_broker_restart_every_event_stored_once(store: Store, make_broker, mqtt_links):
    began = time.monotonic()
    broker = make_broker("max_queued_messages 1000000")
    link = mqtt_links.make(
        ingest_config(
            broker.url, "load-ingest", protocol="5", keepalive=5, reconnect_min_delay=1, reconnect_max_delay=2
        )
    )
    ingest_outages: list[float] = []
    down_at: list[float] = []

    def on_connection(up: bool) -> None:
        if not up:
            down_at.append(time.monotonic())
        elif down_at:
            ingest_outages.append(time.monotonic() - down_at[-1])

    link.add_connection_listener(on_connection)
    ingest = Ingest(store, link)
    ingest.start()
    link.start()
    assert link.wait_connected(10.0)
    assert ingest.wait_subscribed()

    per = EDGES // PROCESSES
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [sys.executable, str(LOAD_EDGES), broker.url, SITE, str(p * per), str(per), str(RATE), str(DURATION_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for p in range(PROCESSES)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        start = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

        time.sleep(max(0.0, start + RESTART_AT_S - time.monotonic()))
        stopped = time.monotonic()
        broker.stop()  # SIGTERM: retained messages and sessions saved, as in a restart for maintenance
        time.sleep(DOWN_S)
        broker.start()
        down_s = time.monotonic() - stopped

        summaries = []
        for proc in procs:
            out, _ = proc.communicate(timeout=DURATION_S + 60.0)
            summaries.append(json.loads(out.strip().splitlines()[-1]))
        edges_done = time.monotonic()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    assert sum(s["unacknowledged"] for s in summaries) == 0, summaries
    assert sum(s["published"] for s in summaries) == TOTAL
    deadline = time.monotonic() + 30.0
    while ingest.stats().stored < TOTAL and time.monotonic() < deadline:
        time.sleep(0.02)
    all_stored = time.monotonic()
    assert ingest.wait_idle(30.0)
    stats = ingest.stats()

    expected = {event_id(device_id(i), seq) for i in range(EDGES) for seq in range(1, int(RATE * DURATION_S) + 1)}
    stored = store.events(site_id=SITE)
    ids = [s.event.event_id for s in stored]
    assert len(ids) == len(set(ids)) == TOTAL and set(ids) == expected
    assert {s.event.device_id for s in stored} == {device_id(i) for i in range(EDGES)}
    assert stats.stored == TOTAL and stats.rejected_total == 0 and stats.abandoned == 0
    assert stats.received == stats.accounted
    assert sum(s.duplicates for s in stored) == stats.duplicates
    ingest.stop()

    elapsed = time.monotonic() - began
    reconnects = [r for s in summaries for r in s["reconnect_s"]]
    print(
        f"\ningest load ({store.dialect}): {EDGES} edges x {RATE:.0f} events/s x {DURATION_S:.0f} s = {TOTAL} events"
        f"\n  stored {stats.stored} in {all_stored - start:.1f} s from the first publish"
        f" = {stats.stored / (all_stored - start):.0f} events/s (offered {EDGES * RATE:.0f}/s);"
        f" edges done after {edges_done - start:.1f} s"
        f"\n  broker down {down_s:.1f} s at t={stopped - start:.1f} s; edge reconnect after the stop:"
        f" max {max(reconnects, default=0):.1f} s, mean {sum(reconnects) / max(len(reconnects), 1):.1f} s"
        f" ({len(reconnects)} reconnects); ingest reconnect {', '.join(f'{r:.1f} s' for r in ingest_outages)}"
        f"\n  duplicates {stats.duplicates} (edges re-published {sum(s['republished'] for s in summaries)});"
        f" max ingest lag {stats.max_lag_s:.2f} s, mean {stats.mean_lag_s:.3f} s;"
        f" {stats.batches} commits, max queue depth {stats.max_queue_depth}, backpressure waits"
        f" {stats.backpressure_waits}, store retries {stats.store_retries}"
        f"\n  test wall time {elapsed:.1f} s"
    )
    assert elapsed < BUDGET_S
