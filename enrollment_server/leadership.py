"""Which server process publishes galleries: exactly one per database (and so per site) at a time.

Several `enrollment-server serve` processes may share a site (docs/deployment.md, "Two servers, one site"): each
ingests a share of the events, but gallery publication must have one writer, or two publications of one site
would overwrite each other's chunk topics. The one publisher is whoever holds a *lease*:

- PostgreSQL (`PgAdvisoryLease`): a session-level advisory lock, keyed by the database's schema, held on a
  connection of its own. A standby server tries to take it every `retry_s`; the lock goes with its holder's
  connection, so a leader that dies (kill -9, power) or loses the database hands over within seconds. The lease
  connection also LISTENs: a standby that changed a gallery through its admin API tells the leader with a
  NOTIFY naming the site, and the leader publishes it.
- SQLite (`FileLease`): one server per database is the rule (SQLite has one writer and no server to coordinate
  through). An exclusive lock on `<database>.serve.lock`, taken at start, makes a second `serve` on the same file
  refuse to start, naming the file, instead of publishing beside the first.

`GalleryLeadership` wires a lease to the publisher: `on_change(site)` publishes at once on the leader and hands
the site to the leader on a standby; taking the lease re-publishes every site (the data may have changed while
no one held it, and a NOTIFY sent then reached nobody), at once when the publisher's link is up, else through
`sites_to_republish()`, which is what the publisher's reconnect hook re-publishes: every site on the leader, none
on a standby.

Known window: leadership is checked before each publication, and a holder learns that its connection (hence the
lock) is gone within one `check_s`. A leader whose database connection breaks in the middle of a publication may
finish it while the new leader starts its own; the edges then see two valid, signed versions, and the newer one
wins once its publication completes.
"""

from __future__ import annotations

import abc
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import ConfigError, FaceAttendError, LeaseError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from enrollment_server.gallery_publisher import GalleryPublisher

log = logging.getLogger(__name__)

# the advisory lock key and NOTIFY channel are derived from this and the schema, so that two sites kept in two
# schemas of one database do not share a publisher
LEASE_NAME = "faceattend.gallery_publisher"
DEFAULT_RETRY_S = 2.0


class Lease(abc.ABC):
    """Held by at most one process at a time. `start(on_held)` calls `on_held(True / False)` on every change,
    `on_site(site)` for each site a standby handed over (on the lease's own thread)."""

    @abc.abstractmethod
    def start(self, on_held: Callable[[bool], None], on_site: Callable[[str], None]) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def held(self) -> bool: ...

    @abc.abstractmethod
    def hand_over(self, site: str) -> None:
        """Ask the holder to publish `site` (called on a process that does not hold the lease)."""


class FileLease(Lease):
    """SQLite: the process that holds the exclusive lock on the file serves the database; there is no standby."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def start(self, on_held: Callable[[bool], None], on_site: Callable[[str], None]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseError(
                f"another enrollment-server serve holds {self.path}: one server per SQLite database (two servers "
                "on one site need PostgreSQL, see docs/deployment.md)"
            ) from None
        self._fd = fd
        on_held(True)

    def stop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def hand_over(self, site: str) -> None:
        raise LeaseError(f"site {site}: this server does not hold {self.path}")  # never: it started holding it


class PgAdvisoryLease(Lease):
    """PostgreSQL: a session advisory lock on a dedicated connection (psycopg, autocommit), checked every
    `check_s`; LISTEN for hand-overs on the same connection."""

    def __init__(self, url: URL, *, retry_s: float = DEFAULT_RETRY_S, check_s: float = 1.0) -> None:
        # libpq's own URI: the SQLAlchemy driver name goes, query options (search_path) stay
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._where = url.render_as_string(hide_password=True)
        self._retry_s = retry_s
        self._check_s = check_s
        self._held = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: str | None = None

    def start(self, on_held: Callable[[bool], None], on_site: Callable[[str], None]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(on_held, on_site), name="faceattend-publisher-lease", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self._check_s + self._retry_s + 10.0)

    @property
    def held(self) -> bool:
        return self._held.is_set()

    def hand_over(self, site: str) -> None:
        import psycopg

        try:
            with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10) as conn:
                channel = self._channel or _channel(conn)
                conn.execute("SELECT pg_notify(%s, %s)", (channel, site))
        except psycopg.Error as exc:
            raise LeaseError(f"site {site}: cannot hand the gallery to the publishing server: {exc}") from exc
        log.info("site %s: gallery change handed to the publishing server", site)

    def _run(self, on_held: Callable[[bool], None], on_site: Callable[[str], None]) -> None:
        import psycopg
        from psycopg import sql

        conn: Any = None
        while not self._stopping.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
                    self._channel = _channel(conn)
                if not self._held.is_set():
                    got = conn.execute(
                        "SELECT pg_try_advisory_lock(hashtextextended(%s || ':' || current_schema(), 0))",
                        (LEASE_NAME,),
                    ).fetchone()[0]
                    if got:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                        self._held.set()
                        log.info("gallery publisher lease taken (%s): this server publishes the galleries", self._where)
                        on_held(True)
                    else:
                        self._stopping.wait(self._retry_s)
                    continue
                conn.execute("SELECT 1")  # the lock lives exactly as long as this connection
                for note in conn.notifies(timeout=self._check_s):
                    on_site(note.payload)
            except psycopg.Error as exc:
                if conn is not None:
                    conn.close()
                    conn = None
                self._lost(on_held, f"database connection lost: {exc}")
                self._stopping.wait(self._retry_s)
            except Exception:  # a callback's bug: the lease must stay truthful, so give it up
                log.exception("gallery publisher lease: unexpected error; letting the lease go")
                if conn is not None:
                    conn.close()
                    conn = None
                self._lost(on_held, "unexpected error")
                self._stopping.wait(self._retry_s)
        if conn is not None:
            conn.close()  # releases the lock: a standby takes over within its retry interval
        if self._held.is_set():
            self._held.clear()
            on_held(False)

    def _lost(self, on_held: Callable[[bool], None], why: str) -> None:
        if self._held.is_set():
            self._held.clear()
            log.error("gallery publisher lease lost (%s); another server may publish now", why)
            on_held(False)
        else:
            log.warning("gallery publisher lease: %s; retrying", why)


def _channel(conn: Any) -> str:
    schema = conn.execute("SELECT current_schema()").fetchone()[0]
    return f"{LEASE_NAME}:{schema}"[:63]  # PostgreSQL truncates identifiers at 63 bytes


def lease_for(url: URL) -> Lease:
    """The lease kind the database needs: an advisory lock on PostgreSQL, a lock file beside a SQLite file."""
    if url.get_backend_name() == "postgresql":
        return PgAdvisoryLease(url)
    database = url.database
    if not database or database == ":memory:":
        raise ConfigError("serve needs a database file or PostgreSQL, not an in-memory SQLite database")
    return FileLease(Path(f"{database}.serve.lock"))


class GalleryLeadership:
    """Publishes through `publisher` while `lease` is held; see the module docstring."""

    def __init__(
        self,
        publisher: GalleryPublisher,
        lease: Lease,
        sites: Callable[[], Sequence[str]],
        connected: Callable[[], bool],
    ) -> None:
        """`connected`: whether the publisher's link is up now (when it is not, its reconnect hook publishes)."""
        self._publisher = publisher
        self._lease = lease
        self._sites = sites
        self._connected = connected
        self._cond = threading.Condition()
        self._requested: dict[str, None] = {}  # sites to re-publish, in request order
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="faceattend-gallery-leader", daemon=True)

    def start(self) -> None:
        """Take or wait for the lease; raises LeaseError when a SQLite database is served already."""
        self._lease.start(self._on_held, self._request)  # requests made meanwhile wait for the worker
        self._worker.start()

    def stop(self) -> None:
        self._lease.stop()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join(10.0)

    def is_leader(self) -> bool:
        return self._lease.held

    def sites_to_republish(self) -> list[str]:
        """For the publisher's reconnect hook: the sites, on the leader only."""
        return list(self._sites()) if self.is_leader() else []

    def on_change(self, site: str, publish: Callable[[str], object]) -> None:
        """A gallery changed through this server's API: `publish(site)` here when leading, else hand it over."""
        if self.is_leader():
            publish(site)
        else:
            self._lease.hand_over(site)

    def _on_held(self, held: bool) -> None:
        # taken while disconnected: the reconnect hook (sites_to_republish) publishes once the link is up
        if held and self._connected():
            try:
                sites = list(self._sites())
            except FaceAttendError as exc:
                log.warning("gallery leadership: cannot list the sites to re-publish: %s", exc)
                return
            for site in sites:
                self._request(site)

    def _request(self, site: str) -> None:
        with self._cond:
            self._requested[site] = None
            self._cond.notify_all()

    def _run(self) -> None:
        # publications wait for PUBACKs: never on the lease's thread, whose checks must go on meanwhile
        while True:
            with self._cond:
                while not self._requested and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                site = next(iter(self._requested))
                del self._requested[site]
            if not self.is_leader():
                continue
            try:
                result = self._publisher.republish_latest(site)
            except FaceAttendError as exc:
                log.warning("site %s: gallery not published by the lease holder: %s (next connect retries)", site, exc)
                continue
            log.info(
                "site %s: gallery v%d %s by the lease holder",
                site,
                result.version,
                "re-sent" if result.republished else "published",
            )
