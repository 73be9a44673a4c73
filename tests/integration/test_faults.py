"""Faults that count (issue 14): the edge forgets an event only when the server has stored it, whatever fails.

Real parts throughout: Mosquitto (tests/integration/conftest.py), `enrollment-server serve` processes
(tests/integration/server_process.py) on SQLite or PostgreSQL, and edges that run the real event path of an edge
agent (outbox, publisher, link) in their own processes (tests/integration/fault_edges.py), making events at a
fixed rate while the test breaks something:

- the server killed with SIGKILL under load, and started again;
- the broker restarted with its state lost (persistence file deleted) while the server is down;
- the broker's queue limit (`max_queued_messages`) exceeded while the server is down;
- the server down for a long time while the edges keep producing (FACEATTEND_FAULT_OUTAGE_S, 60 s by default:
  a compressed "several minutes"; the test prints what it ran);
- the database unavailable, then back: SQLite locked by another writer, PostgreSQL cut off behind a TCP relay;
- two servers sharing the site (PostgreSQL, shared subscription), the one that publishes galleries killed.

Each test prints created / stored / lost / duplicates (redeliveries the server recognised and did not store again)
/ stored twice, and ends with 0 lost, 0 stored twice and every edge's outbox empty (every event confirmed).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BrokerFactory
from server_process import Server
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy
from waiting import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAULT_EDGES = Path(__file__).with_name("fault_edges.py")
SITE = "hq"
OUTAGE_S = float(os.environ.get("FACEATTEND_FAULT_OUTAGE_S", "60"))
DRAIN_S = 90.0  # what an edge process waits, after its last event, for every confirmation


class Edges:
    """One fault_edges.py process: `go()` starts production, `finish()` waits for its summary."""

    def __init__(
        self,
        workdir: Path,
        url: str,
        devices: Sequence[str],
        *,
        rate: float,
        produce_s: float,
        confirm_timeout_s: float = 2.0,
        max_republish_interval_s: float = 4.0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.devices = list(devices)
        self.produce_s = produce_s
        spec = {
            "url": url,
            "workdir": str(workdir),
            "devices": self.devices,
            "rate": rate,
            "produce_s": produce_s,
            "drain_s": DRAIN_S,
            "confirm_timeout_s": confirm_timeout_s,
            "max_republish_interval_s": max_republish_interval_s,
        }
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._log = (workdir / "edges.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(FAULT_EDGES), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready", self.log_tail()
        self.t0 = 0.0

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.t0 = time.monotonic()

    def at(self, t: float) -> None:
        """Sleep until `t` seconds after go()."""
        time.sleep(max(0.0, self.t0 + t - time.monotonic()))

    def now(self) -> float:
        return time.monotonic() - self.t0

    def finish(self) -> dict:
        out, _ = self.proc.communicate(timeout=self.produce_s + DRAIN_S + 60.0)
        self._log.close()
        return json.loads(out.strip().splitlines()[-1])

    def created(self) -> dict[str, str]:
        """event_id -> device of every event an edge committed to its outbox."""
        out: dict[str, str] = {}
        for device in self.devices:
            for line in (self.workdir / f"{device}.created").read_text().splitlines():
                out[line.split()[1]] = device
        return out

    def log_tail(self) -> str:
        return (self.workdir / "edges.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


@dataclass(frozen=True)
class Counts:
    created: int
    stored: int
    lost: int
    duplicates: int  # redeliveries the server recognised (the stored rows' duplicate counters)
    stored_twice: int
    republished: int  # publications the edges made again for want of a confirmation
    left_in_outboxes: int


def count(name: str, edges: Edges, server: Server, details: Callable[[], str]) -> Counts:
    """Wait for the edges to finish (every event confirmed, or their drain time out), count, print, check."""
    summary = edges.finish()
    created = edges.created()
    rows = [s for device in edges.devices for s in server.events(device)]
    ids = [s.event.event_id for s in rows]
    counts = Counts(
        created=len(created),
        stored=len(set(ids)),
        lost=len(set(created) - set(ids)),
        duplicates=sum(s.duplicates for s in rows),
        stored_twice=len(ids) - len(set(ids)),
        republished=sum(e["republished"] for e in summary["edges"].values()),
        left_in_outboxes=sum(e["depth"] for e in summary["edges"].values()),
    )
    print(
        f"\n[{name}] created {counts.created} / stored {counts.stored} / lost {counts.lost} / duplicates "
        f"{counts.duplicates} / stored twice {counts.stored_twice}; edges re-published {counts.republished}, "
        f"{counts.left_in_outboxes} left in their outboxes, all confirmed {summary['drained_s']:.1f} s after the "
        f"last event; {details()}"
    )
    assert counts.lost == 0 and counts.stored_twice == 0, counts
    assert set(ids) == set(created), "the server stored events no edge created"
    assert counts.left_in_outboxes == 0, summary
    return counts


@pytest.fixture
def cleanup() -> Iterator[Callable[[object], object]]:
    """Register servers and edge processes; killed / closed at the end whatever happened."""
    made: list[object] = []
    yield lambda thing: made.append(thing) or thing
    for thing in reversed(made):
        if isinstance(thing, Edges):
            thing.kill()
        elif isinstance(thing, Server):
            thing.kill()
            thing.close()


def devices(n: int, prefix: str = "door") -> list[str]:
    return [f"{prefix}-{i:02d}" for i in range(n)]


def server_at(tmp_path: Path, broker_url: str, name: str = "server", **options) -> Server:
    return Server(tmp_path / name, broker_url, SITE, **options)


# --- the faults --------------------------------------------------------------------------------------------------


def test_server_killed_with_sigkill_under_load(tmp_path: Path, make_broker: BrokerFactory, cleanup):
    broker = make_broker()
    server = cleanup(server_at(tmp_path, broker.url))
    server.start()
    edges = cleanup(Edges(tmp_path / "edges", broker.url, devices(8), rate=25.0, produce_s=12.0))
    edges.go()
    edges.at(6.0)
    before = server.health()["ingest"]
    server.kill()
    killed_at = edges.now()
    server.start()
    back_at = edges.now()
    count(
        "server kill -9 under load",
        edges,
        server,
        lambda: (
            f"8 edges x 25 events/s for 12 s; SIGKILL at t={killed_at:.1f} s after {before['received']} received "
            f"({before['stored']} stored), healthy again at t={back_at:.1f} s"
        ),
    )


def test_broker_restarted_with_its_state_lost_while_the_server_is_down(
    tmp_path: Path, make_broker: BrokerFactory, cleanup
):
    broker = make_broker()  # persistence on, as deployed
    server = cleanup(server_at(tmp_path, broker.url))
    server.start()
    edges = cleanup(Edges(tmp_path / "edges", broker.url, devices(4), rate=5.0, produce_s=18.0))
    edges.go()
    edges.at(3.0)
    assert server.stop() == 0  # events now wait in the server's session at the broker
    edges.at(7.0)
    broker.kill()  # a crash, and its persistence file is gone: the queued events and the session with them
    (broker.workdir / "mosquitto.db").unlink(missing_ok=True)
    broker.start()
    restarted_at = edges.now()
    edges.at(10.0)
    server.start()  # subscribes anew: a new session, which has none of the events published before
    back_at = edges.now()
    count(
        "broker state lost while the server was down",
        edges,
        server,
        lambda: (
            f"4 edges x 5 events/s for 18 s; server stopped at t=3 s, broker killed and started empty at "
            f"t={restarted_at:.1f} s, server back at t={back_at:.1f} s"
        ),
    )


def test_broker_queue_limit_exceeded_while_the_server_is_down(tmp_path: Path, make_broker: BrokerFactory, cleanup):
    limit = 50
    broker = make_broker(f"max_queued_messages {limit}")
    server = cleanup(server_at(tmp_path, broker.url))
    server.start()
    assert server.stop() == 0  # its persistent session stays at the broker, queueing at most `limit` events
    edges = cleanup(Edges(tmp_path / "edges", broker.url, devices(4), rate=10.0, produce_s=8.0))
    edges.go()
    edges.at(10.0)
    assert wait_until(lambda: "Outgoing messages are being dropped" in broker.log_text(), timeout=5.0)
    server.start()
    back_at = edges.now()
    count(
        "broker queue limit exceeded",
        edges,
        server,
        lambda: (
            f"4 edges x 10 events/s for 8 s = 320 events while the server was down, broker max_queued_messages "
            f"{limit} (it logged dropping), server back at t={back_at:.1f} s"
        ),
    )


def test_server_down_for_a_long_outage_while_the_edges_keep_producing(
    tmp_path: Path, make_broker: BrokerFactory, cleanup
):
    broker = make_broker("max_queued_messages 1000000")  # the deployment's setting
    server = cleanup(server_at(tmp_path, broker.url))
    server.start()
    edges = cleanup(
        Edges(
            tmp_path / "edges",
            broker.url,
            devices(3),
            rate=2.0,
            produce_s=OUTAGE_S + 8.0,
            confirm_timeout_s=5.0,
            max_republish_interval_s=20.0,
        )
    )
    edges.go()
    edges.at(4.0)
    assert server.stop() == 0
    down_at = edges.now()
    edges.at(4.0 + OUTAGE_S)
    server.start()
    back_at = edges.now()
    count(
        f"server down {back_at - down_at:.0f} s",
        edges,
        server,
        lambda: (
            f"FACEATTEND_FAULT_OUTAGE_S={OUTAGE_S:g}: 3 edges x 2 events/s for {OUTAGE_S + 8:g} s, server stopped at "
            f"t={down_at:.1f} s and back at t={back_at:.1f} s (re-publication back-off 5 s doubling to 20 s)"
        ),
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_database_unavailable_then_back(tmp_path: Path, make_broker: BrokerFactory, cleanup, request, backend):
    broker = make_broker()
    outage_s = 8.0
    if backend == "sqlite":
        # a write gives up on the lock after 1 s (the default is 30 s): the ingest's retries are what is tested
        server = cleanup(server_at(tmp_path, broker.url, database_options={"busy_timeout_s": 1.0}))
        database = server.database
    else:
        pg_url = request.getfixturevalue("pg_url")
        url = make_url(pg_url)
        relay = TcpProxy(url.port or 5432, url.host or "127.0.0.1")
        request.addfinalizer(relay.close)
        through = url.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
        server = cleanup(server_at(tmp_path, broker.url, database=through))
    server.start()
    edges = cleanup(Edges(tmp_path / "edges", broker.url, devices(4), rate=5.0, produce_s=14.0))
    edges.go()
    edges.at(3.0)
    if backend == "sqlite":
        other = sqlite3.connect(database, isolation_level=None)  # another writer holds the file's write lock
        other.execute("BEGIN EXCLUSIVE")
        edges.at(3.0 + outage_s)
        other.execute("COMMIT")
        other.close()
        what = f"SQLite write lock held by another connection for {outage_s:g} s (busy timeout 1 s)"
    else:
        relay.cut()  # the database is unreachable: every connection dropped, new ones refused
        edges.at(3.0 + outage_s)
        relay.restore()
        what = f"PostgreSQL cut off behind a TCP relay for {outage_s:g} s"
    server.wait_healthy()  # /healthz answers 503 while the database does not
    retries = server.health()["ingest"]["store_retries"]
    assert retries > 0, "the outage did not reach the server's writes"
    count(
        f"database unavailable ({backend})",
        edges,
        server,
        lambda: (
            f"4 edges x 5 events/s for 14 s; {what}: {retries} failed writes retried during it, "
            f"rejected {server.health()['ingest']['rejected']}"
        ),
    )
    assert server.health()["ingest"]["rejected"] == {}


def test_two_servers_share_the_site_and_one_is_killed(tmp_path: Path, make_broker: BrokerFactory, cleanup, pg_url):
    broker = make_broker()
    group = {"shared_group": "ingest"}
    servers = [cleanup(server_at(tmp_path, broker.url, n, database=pg_url, mqtt=group)) for n in ("a", "b")]
    for server in servers:
        server.start()

    def leaders() -> list[Server]:
        return [s for s in servers if s.running and s.health()["gallery_publisher"]["leader"]]

    assert wait_until(lambda: len(leaders()) == 1, timeout=15.0)
    leader = leaders()[0]
    survivor = next(s for s in servers if s is not leader)
    edges = cleanup(Edges(tmp_path / "edges", broker.url, devices(8), rate=20.0, produce_s=14.0))
    edges.go()
    edges.at(6.0)
    shares = {s.root.name: s.health()["ingest"]["received"] for s in servers}
    assert all(shares.values()), f"each server should take a share of the events: {shares}"
    assert len(leaders()) == 1
    leader.kill()
    killed_at = edges.now()
    assert wait_until(lambda: survivor.health()["gallery_publisher"]["leader"], timeout=20.0)
    takeover_s = edges.now() - killed_at
    count(
        "two servers, the publishing one killed",
        edges,
        survivor,
        lambda: (
            f"8 edges x 20 events/s for 14 s on PostgreSQL; received before the kill {shares}; {leader.root.name} "
            f"(the gallery publisher) killed at t={killed_at:.1f} s, {survivor.root.name} took the publisher lease "
            f"{takeover_s:.1f} s later and stored the rest; received by it in all "
            f"{survivor.health()['ingest']['received']}"
        ),
    )
