"""Integration fixtures: a real Mosquitto broker and real databases.

Broker: on a free local port, restartable on the same port. The broker binary is taken from $FACEATTEND_MOSQUITTO,
then PATH, then /usr/sbin/mosquitto; tests that need it are skipped with a reason when there is none (CI installs
the `mosquitto` package). Its log is attached to the report of a failing test.

Databases: `db` (a `storedb.Db`) and `store` (an open `Store` on it) run each test on SQLite and on PostgreSQL;
`pg_database` is the session's PostgreSQL database (skipped when unreachable). See tests/integration/storedb.py.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from storedb import PG_ADMIN_URL, Db, pg_unreachable

from edge_agent.devtools.videogen import load_people
from enrollment_server.store import Store
from models.contract.mqtt_link import MqttConfig, PahoMqttLink, Will
from models.face.pipeline import FacePipeline

BROKER_START_TIMEOUT_S = 10.0
# a 1 MiB gallery chunk plus topic and header; Mosquitto's default limit is far larger, but a deployment sets one
MAX_PACKET_SIZE = 2 * 1024 * 1024


def mosquitto_binary() -> str | None:
    env = os.environ.get("FACEATTEND_MOSQUITTO")
    if env:
        return env if Path(env).is_file() else None
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """One broker process: `start()`, `stop()` (SIGTERM: persistence is saved), `kill()` (SIGKILL), `start()`
    again on the same port with the same persistence directory. `extra_config`: more mosquitto.conf lines."""

    def __init__(self, workdir: Path, binary: str, port: int | None = None, extra_config: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = port or free_port()
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {workdir}/",
            "persistence_file mosquitto.db",
            f"max_packet_size {MAX_PACKET_SIZE}",
            f"log_dest file {self.log_path}",
            "log_type all",
            "connection_messages true",
            # run as root (containers), mosquitto would drop to user "mosquitto", who cannot write workdir;
            # as any other user this line has no effect
            f"user {getpass.getuser()}",
            *extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("broker already running")
        self._stderr = (self.workdir / "mosquitto.stderr").open("ab")  # closed when the process ends
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}:\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {BROKER_START_TIMEOUT_S}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: Mosquitto saves its persistence file (retained messages, sessions) on SIGTERM."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """A crash: nothing saved since the last autosave."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self.workdir / "mosquitto.stderr"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)


def _broker(tmp: Path) -> Iterator[MosquittoBroker]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary (apt install mosquitto, or set FACEATTEND_MOSQUITTO)")
    broker = MosquittoBroker(tmp / "mosquitto", binary)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class BrokerFactory:
    """`make_broker(*extra_config)`: a started broker with more mosquitto.conf lines (a deployment setting the
    test depends on); every broker made is stopped at the end of the test."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.made: list[MosquittoBroker] = []

    def __call__(self, *extra_config: str) -> MosquittoBroker:
        broker = MosquittoBroker(self.root / f"mosquitto-{len(self.made)}", self.binary, extra_config=extra_config)
        self.made.append(broker)
        broker.start()
        return broker


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[BrokerFactory]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary (apt install mosquitto, or set FACEATTEND_MOSQUITTO)")
    factory = BrokerFactory(tmp_path, binary)
    yield factory
    for broker in factory.made:
        broker.stop()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh broker per test (empty retained store): the one to restart or kill."""
    yield from _broker(tmp_path)


@pytest.fixture(scope="module")
def mosquitto_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker for a module's tests: never stop it in a test, and use topics no other test uses."""
    yield from _broker(tmp_path_factory.mktemp("broker"))


# --- MQTT links ---------------------------------------------------------------------------------------------------

# paho retries every 1, 2, 2, ... s with these settings: a restarted broker is found again within ~2 s
FAST_RECONNECT = {"reconnect_min_delay": 1, "reconnect_max_delay": 2, "keepalive": 5}
CONNECT_TIMEOUT_S = 10.0


class LinkFactory:
    """`mqtt_links(broker, **MqttConfig options)`: a started PahoMqttLink, connected unless `wait=False`; every
    link made is stopped at the end of the test. `mqtt_links.make(...)`: built, not started."""

    def __init__(self) -> None:
        self.made: list[PahoMqttLink] = []

    def make(self, config: MqttConfig, *, will: Will | None = None) -> PahoMqttLink:
        link = PahoMqttLink(config, will=will)
        self.made.append(link)
        return link

    def __call__(
        self, broker: MosquittoBroker, *, will: Will | None = None, wait: bool = True, **options: object
    ) -> PahoMqttLink:
        link = self.make(MqttConfig.from_url(broker.url, **{**FAST_RECONNECT, **options}), will=will)
        link.start()
        if wait and not link.wait_connected(CONNECT_TIMEOUT_S):
            raise AssertionError(f"link did not connect to {broker.url}")
        return link


@pytest.fixture
def mqtt_links() -> Iterator[LinkFactory]:
    factory = LinkFactory()
    yield factory
    for link in reversed(factory.made):
        link.stop()


# --- databases --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_database() -> Iterator[URL]:
    admin_url = make_url(PG_ADMIN_URL)
    reason = pg_unreachable(admin_url)
    if reason:
        pytest.skip(reason)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"faceattend_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"cannot create a test database on {admin_url.render_as_string()}: {exc}")
    try:
        yield admin_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def _pg_schema(base: URL) -> Iterator[str]:
    """A fresh schema in the session's database: the URL (search_path set) to it, dropped afterwards."""
    schema_name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema_name}")
    url = base.update_query_dict({"options": f"-csearch_path={schema_name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema_name} CASCADE")
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    with _database(request, request.param, tmp_path) as handle:
        yield handle


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    """As `db`, shared by a module's tests (a server process that lives for the whole module)."""
    with _database(request, request.param, tmp_path_factory.mktemp("db")) as handle:
        yield handle


@contextmanager
def _database(request: pytest.FixtureRequest, backend: str, folder: Path) -> Iterator[Db]:
    """An empty database: a SQLite file in `folder`, or a schema of its own in the session's PostgreSQL database."""
    if backend == "sqlite":
        yield Db(url=str(folder / "faceattend.db"), backend="sqlite")
        return
    with _pg_schema(request.getfixturevalue("pg_database")) as url:
        yield Db(url=url, backend="postgresql")


@pytest.fixture
def pg_url(pg_database: URL) -> Iterator[str]:
    """PostgreSQL only (skipped when unreachable): a fresh schema's URL, for a server process's config."""
    with _pg_schema(pg_database) as url:
        yield url


@pytest.fixture
def store(db: Db) -> Iterator[Store]:
    s = Store.open(db.url)
    try:
        yield s
    finally:
        s.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            brokers = value.made if isinstance(value, BrokerFactory) else [value]
            for broker in brokers:
                if isinstance(broker, MosquittoBroker):
                    report.sections.append((f"mosquitto log (port {broker.port})", broker.log_text()[-20000:]))


# ---- real faces: the test face set and one pipeline per module ----


@pytest.fixture(scope="module")
def pipeline() -> Iterator[FacePipeline]:
    pipe = FacePipeline.create()
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def people(test_faces: Path) -> dict[str, tuple[Path, ...]]:
    """The test face set (tests/facesets.py), one entry per person, read by the video generator's own loader."""
    return load_people(test_faces)
