"""The gallery publisher lease on a real PostgreSQL (enrollment_server/leadership.py): one holder at a time, a
standby hands a site over to the holder, a holder that stops or loses its database connection lets the standby
take over. The whole server wiring (two `serve` processes, the publisher killed) is in test_faults.py.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy
from waiting import wait_until

from enrollment_server.leadership import PgAdvisoryLease


class Watched:
    """A lease with what it reported: held changes and the sites handed to it."""

    def __init__(self, url) -> None:  # type: ignore[no-untyped-def]
        self.lease = PgAdvisoryLease(url, retry_s=0.2, check_s=0.2)
        self.changes: list[bool] = []
        self.sites: queue.Queue[str] = queue.Queue()

    def start(self) -> Watched:
        self.lease.start(self.changes.append, self.sites.put)
        return self


@pytest.fixture
def leases() -> Iterator[list[Watched]]:
    made: list[Watched] = []
    yield made
    for watched in made:
        watched.lease.stop()


def test_one_holder_hand_over_and_take_over(pg_url: str, leases: list[Watched]) -> None:
    url = make_url(pg_url)
    first = Watched(url).start()
    leases.append(first)
    assert wait_until(lambda: first.lease.held, timeout=10.0)
    second = Watched(url).start()
    leases.append(second)
    assert not wait_until(lambda: second.lease.held, timeout=1.0)  # a standby while the first holds it

    second.lease.hand_over("hq")  # a gallery changed through the standby's API
    assert first.sites.get(timeout=5.0) == "hq"

    first.lease.stop()
    assert wait_until(lambda: second.lease.held, timeout=5.0)
    assert first.changes == [True, False] and second.changes == [True]


def test_a_holder_that_loses_its_database_connection_lets_go(pg_url: str, leases: list[Watched]) -> None:
    url = make_url(pg_url)
    relay = TcpProxy(url.port or 5432, url.host or "127.0.0.1")
    try:
        cut_off = Watched(url.set(host="127.0.0.1", port=relay.port)).start()
        leases.append(cut_off)
        assert wait_until(lambda: cut_off.lease.held, timeout=10.0)
        standby = Watched(url).start()
        leases.append(standby)
        relay.cut()  # the holder's connection, and with it the lock, is gone
        assert wait_until(lambda: not cut_off.lease.held, timeout=5.0)
        assert wait_until(lambda: standby.lease.held, timeout=5.0)
        relay.restore()
        assert not wait_until(lambda: cut_off.lease.held, timeout=1.0)  # back, but the standby holds it now
        assert cut_off.changes == [True, False] and standby.changes == [True]
    finally:
        relay.close()
