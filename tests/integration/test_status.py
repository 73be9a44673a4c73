"""The edge's retained status (edge_agent/health/status.py) on a real Mosquitto: `online` with health figures on start,
periodically and on poke; `offline` (the last will, retained) when the edge process is SIGKILLed; `stopped` on a
clean stop; `online` again after a broker restart; and the enrollment server's device view of all three.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from status_child import AGENT_VERSION as CHILD_VERSION
from status_child import FINGERPRINT as CHILD_FINGERPRINT
from waiting import wait_until

from edge_agent.health.status import HEALTH_DROPPED_KEY, HEALTH_ERROR_KEY, StatusConfig, StatusReporter, offline_will
from enrollment_server.cli import EXIT_OK
from enrollment_server.cli import main as server_cli
from enrollment_server.ingest import Ingest
from enrollment_server.store import Store
from models.contract import limits, timestamps, topics
from models.contract.mqtt_link import InboundMessage, MqttLink
from models.contract.status import EdgeStatus

SITE = "hq"
DEVICE = "door-3"
VERSION = "0.1.0"
FP = "dlib_resnet_v1-status"
CHILD = Path(__file__).with_name("status_child.py")
REPO = Path(__file__).resolve().parents[2]


class Observer:
    """Every status received on one device's topic, in order, with its retain flag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: list[tuple[EdgeStatus, bool]] = []

    def __call__(self, msg: InboundMessage) -> None:
        status = EdgeStatus.from_json(msg.payload)
        with self._lock:
            self.received.append((status, msg.retain))

    def statuses(self) -> list[EdgeStatus]:
        with self._lock:
            return [s for s, _ in self.received]

    def states(self) -> list[str]:
        return [s.state for s in self.statuses()]

    def first(self, predicate: Callable[[EdgeStatus], bool], timeout: float = 10.0) -> EdgeStatus:
        found: list[EdgeStatus] = []

        def look() -> bool:
            found[:] = [s for s in self.statuses() if predicate(s)]
            return bool(found)

        assert wait_until(look, timeout), f"no matching status within {timeout} s; received {self.states()}"
        return found[0]


def observe(broker, mqtt_links, device: str = DEVICE) -> Observer:
    observer = Observer()
    mqtt_links(broker).subscribe(topics.edge_status(device), 1, observer)
    return observer


def retained(broker, mqtt_links, device: str = DEVICE, timeout: float = 5.0) -> EdgeStatus:
    """What a subscriber that connects now gets: the broker's retained status."""
    observer = Observer()
    mqtt_links(broker).subscribe(topics.edge_status(device), 1, observer)
    assert wait_until(lambda: bool(observer.received), timeout), "no retained status"
    status, retain = observer.received[0]
    assert retain, "the first status a new subscriber gets must be the retained one"
    return status


class Figures:
    """A health callable whose figures change between calls; `fail` makes it raise."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.gallery_version: int | None = 3
        self.gallery_epoch: int | None = 1_767_225_600_000

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("camera stats unavailable")
        return {
            "frames_total": self.calls,
            "outbox": {"depth": 0, "oldest_age_s": 0.0},
            "cameras": {"front": {"fps": 12.5, "state": "streaming"}, "back": {"fps": 0.0, "state": "reconnecting"}},
        }


class Edge:
    def __init__(self, link: MqttLink, reporter: StatusReporter, figures: Figures) -> None:
        self.link = link
        self.reporter = reporter
        self.figures = figures


@pytest.fixture
def make_edge(mosquitto, mqtt_links) -> Iterator[Callable[..., Edge]]:
    made: list[Edge] = []

    def make(device: str = DEVICE, broker=None, **config: Any) -> Edge:
        broker = broker or mosquitto
        figures = Figures()
        link = mqtt_links(broker, will=offline_will(device, SITE, VERSION, FP), wait=False)
        reporter = StatusReporter(
            link,
            device,
            SITE,
            VERSION,
            FP,
            health=figures,
            gallery_version=lambda: figures.gallery_version,
            config=StatusConfig(**{"interval_s": 60.0, "min_interval_s": 0.2, **config}),
            gallery_epoch=lambda: figures.gallery_epoch,
        )
        reporter.start()
        edge = Edge(link, reporter, figures)
        made.append(edge)
        return edge

    yield make
    for edge in made:
        edge.reporter.stop(timeout=1.0)


def test_online_is_retained_with_health_figures_for_a_later_subscriber(mosquitto, mqtt_links, make_edge):
    edge = make_edge()
    assert wait_until(lambda: edge.reporter.stats().acknowledged >= 1), edge.reporter.stats()

    status = retained(mosquitto, mqtt_links)
    assert (status.state, status.device_id, status.site) == ("online", DEVICE, SITE)
    assert (status.agent_version, status.fingerprint, status.gallery_version) == (VERSION, FP, 3)
    assert status.gallery_epoch == 1_767_225_600_000  # the release the server compares with its own (lag)
    health = json.loads(status.to_json())["health"]
    assert health["cameras"] == {
        "front": {"fps": 12.5, "state": "streaming"},
        "back": {"fps": 0.0, "state": "reconnecting"},
    }
    assert health["outbox"] == {"depth": 0, "oldest_age_s": 0.0} and health["frames_total"] >= 1
    age = time.time() - timestamps.parse_utc(status.ts).timestamp()
    assert 0 <= age < 10
    stats = edge.reporter.stats()
    assert (stats.published, stats.publish_errors, stats.health_errors, stats.last_state) == (1, 0, 0, "online")


def test_periodic_statuses_carry_fresh_figures(mosquitto, mqtt_links, make_edge):
    observer = observe(mosquitto, mqtt_links)
    make_edge(interval_s=0.3, min_interval_s=0.1)
    assert wait_until(lambda: len(observer.received) >= 4, 5.0), observer.states()
    statuses = observer.statuses()[:4]
    assert {s.state for s in statuses} == {"online"}
    counts = [s.health["frames_total"] for s in statuses]
    stamps = [timestamps.parse_utc(s.ts) for s in statuses]
    assert counts == sorted(counts) and len(set(counts)) == 4, counts
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    assert all(0.2 <= g < 1.5 for g in gaps), gaps


def test_poke_publishes_at_once_and_is_rate_limited(mosquitto, mqtt_links, make_edge):
    observer = observe(mosquitto, mqtt_links)
    edge = make_edge(min_interval_s=0.5)
    observer.first(lambda s: s.gallery_version == 3)
    time.sleep(0.6)  # past min_interval_s: the next poke goes out at once

    edge.figures.gallery_version = 4
    poked = time.monotonic()
    edge.reporter.poke()
    observer.first(lambda s: s.gallery_version == 4, timeout=2.0)
    latency = time.monotonic() - poked
    assert latency < 0.4, f"poke took {latency:.3f} s"

    # a burst of pokes: one publish per min_interval_s, the last figures included
    before = len(observer.received)
    for version in range(5, 25):
        edge.figures.gallery_version = version
        edge.reporter.poke()
        time.sleep(0.02)
    observer.first(lambda s: s.gallery_version == 24, timeout=3.0)
    time.sleep(0.7)
    burst = len(observer.received) - before
    assert 1 <= burst <= 3, f"{burst} statuses for 20 pokes in 0.4 s"
    print(f"\npoke -> status at a subscriber: {latency * 1000:.1f} ms; 20 pokes in 0.4 s -> {burst} statuses")


def test_bad_health_is_reported_not_fatal(mosquitto, mqtt_links, make_edge, caplog):
    observer = observe(mosquitto, mqtt_links)
    edge = make_edge(interval_s=0.3, min_interval_s=0.1)
    observer.first(lambda s: "frames_total" in s.health)

    edge.figures.fail = True
    failed = observer.first(lambda s: HEALTH_ERROR_KEY in s.health)
    assert failed.state == "online" and failed.gallery_version == 3
    assert "RuntimeError: camera stats unavailable" in failed.health[HEALTH_ERROR_KEY]
    assert "frames_total" not in failed.health

    edge.figures.fail = False
    n = len(observer.received)
    assert wait_until(lambda: any("frames_total" in s.health for s in observer.statuses()[n:]))
    recovered = next(s for s in observer.statuses()[n:] if "frames_total" in s.health)
    assert HEALTH_ERROR_KEY not in recovered.health
    assert edge.reporter.stats().health_errors >= 1
    # one error line with the traceback, not one per status
    errors = [r for r in caplog.records if r.name == "edge_agent.health.status" and r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_figures_outside_the_contract_are_cleaned(mosquitto, mqtt_links):
    link = mqtt_links(mosquitto)
    observer = observe(mosquitto, mqtt_links)

    def health() -> dict[str, Any]:
        return {
            "nan": float("nan"),
            "inf": float("inf"),
            "huge": 2**70,
            "ok": 1.23456789,
            "ts": 1_712_345_678.123456,
            "long": "x" * 1000,
            "k" * 100: 1,
            "none": None,
            "list": [1, 2],
            "deep": {"a": {"b": {"c": 1}, "kept": True}},
            "many": {f"n{i}": i for i in range(400)},
        }

    reporter = StatusReporter(link, DEVICE, SITE, VERSION, FP, health=health)
    reporter.start()
    try:
        status = observer.first(lambda s: True)
    finally:
        reporter.stop(timeout=2.0)
    h = json.loads(status.to_json())["health"]
    assert h["ok"] == 1.23457 and h["ts"] == 1_712_345_678.123
    assert h["long"] == "x" * limits.MAX_HEALTH_STR_CHARS and h["k" * limits.MAX_HEALTH_KEY_CHARS] == 1
    assert not {"nan", "inf", "huge", "none", "list"} & set(h)
    assert h["deep"] == {"a": {"kept": True}}  # a fourth level is dropped
    assert len(h["many"]) < 400 and h[HEALTH_DROPPED_KEY] > 150


def test_kill_9_leaves_the_offline_will_retained(mosquitto, mqtt_links):
    device = "door-crash"
    observer = observe(mosquitto, mqtt_links, device)
    child = subprocess.Popen(
        [sys.executable, str(CHILD), mosquitto.url, device, SITE], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        online = observer.first(lambda s: s.state == "online")
        assert online.health["cameras"] == {"front": {"fps": 10.0}}
        killed = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    offline = observer.first(lambda s: s.state == "offline", timeout=10.0)
    delay = time.monotonic() - killed
    # the socket closes with the process: the broker publishes the will at once, not after the keep-alive
    assert delay < 3.0, f"will published {delay:.2f} s after the kill"
    assert (offline.device_id, offline.site, offline.agent_version) == (device, SITE, CHILD_VERSION)
    assert (offline.fingerprint, offline.gallery_version, dict(offline.health)) == (CHILD_FINGERPRINT, 7, {})
    assert retained(mosquitto, mqtt_links, device).state == "offline"
    print(f"\nkill -9 -> offline will at a subscriber: {delay * 1000:.0f} ms")


def test_clean_stop_leaves_stopped_retained_and_no_will(mosquitto, mqtt_links, make_edge):
    observer = observe(mosquitto, mqtt_links)
    edge = make_edge()
    observer.first(lambda s: s.state == "online")
    started = time.monotonic()
    assert edge.reporter.stop() is True
    took = time.monotonic() - started
    edge.link.stop()
    stopped = observer.first(lambda s: s.state == "stopped")
    assert stopped.gallery_version == 3 and stopped.health["cameras"]["front"]["fps"] == 12.5
    time.sleep(1.0)
    assert observer.states()[-1] == "stopped" and "offline" not in observer.states()
    assert retained(mosquitto, mqtt_links).state == "stopped"
    assert edge.reporter.stop() is False  # once
    assert took < 1.0, f"stop took {took:.2f} s"


def test_stop_with_the_broker_down_is_bounded(mosquitto, make_edge):
    edge = make_edge()
    assert wait_until(lambda: edge.reporter.stats().acknowledged >= 1)
    mosquitto.kill()
    assert wait_until(lambda: not edge.link.is_connected())
    started = time.monotonic()
    assert edge.reporter.stop(timeout=1.0) is False
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_online_again_after_a_broker_restart(mosquitto, mqtt_links, make_edge, how):
    observer = observe(mosquitto, mqtt_links)
    edge = make_edge()
    observer.first(lambda s: s.state == "online")
    getattr(mosquitto, how)()  # SIGTERM saves the retained store; SIGKILL loses it
    assert wait_until(lambda: not edge.link.is_connected())
    restart = time.time()
    mosquitto.start()
    assert edge.link.wait_connected(15.0)
    fresh = observer.first(lambda s: s.state == "online" and timestamps.parse_utc(s.ts).timestamp() >= restart, 10.0)
    assert fresh.health["cameras"]["front"]["state"] == "streaming"
    kept = retained(mosquitto, mqtt_links)
    assert kept.state == "online" and timestamps.parse_utc(kept.ts).timestamp() >= restart
    stats = edge.reporter.stats()
    assert stats.connects >= 1 and stats.published >= 2, stats  # the first connection may predate the reporter


def test_the_server_device_view_follows_online_stopped_and_offline(mosquitto, mqtt_links, make_edge, tmp_path, capsys):
    store = Store.open(tmp_path / "server.db")
    ingest = Ingest(store, mqtt_links(mosquitto))
    ingest.start()
    try:

        def device(device_id: str) -> Any:
            return next((d for d in store.list_devices(SITE) if d.device_id == device_id), None)

        # online, with the figures
        edge = make_edge()
        assert wait_until(lambda: device(DEVICE) is not None and device(DEVICE).state == "online"), device(DEVICE)
        d = device(DEVICE)
        assert (d.agent_version, d.gallery_version, d.fingerprint) == (VERSION, 3, FP)
        assert d.health()["cameras"]["back"]["state"] == "reconnecting"

        # stopped
        assert edge.reporter.stop()
        edge.link.stop()
        assert wait_until(lambda: device(DEVICE).state == "stopped"), device(DEVICE)

        # offline: a second edge killed, the broker sends its will; the server keeps its last known figures
        child = subprocess.Popen(
            [sys.executable, str(CHILD), mosquitto.url, "door-crash", SITE], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            assert wait_until(lambda: device("door-crash") is not None and device("door-crash").state == "online")
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        assert wait_until(lambda: device("door-crash").state == "offline"), device("door-crash")
        crashed = device("door-crash")
        assert crashed.gallery_version == 7 and crashed.health() == {"fps": 10.0, "cameras": {"front": {"fps": 10.0}}}
        assert ingest.stats().rejected == {}
    finally:
        ingest.stop(timeout=5.0)
        store.close()

    # the admin's command line shows the same
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({"site": SITE, "database": {"url": str(tmp_path / "server.db")}}))
    capsys.readouterr()
    assert server_cli(["-c", str(config), "devices", "--json"]) == EXIT_OK
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted((r["device"], r["state"], r["gallery"]) for r in rows) == [
        ("door-3", "stopped", 3),
        ("door-crash", "offline", 7),
    ]
