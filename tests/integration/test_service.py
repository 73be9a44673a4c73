"""`enrollment-server serve` as a real process: HTTP enrollment -> signed gallery at a subscriber; edge events and
statuses through the broker into the database; a broker outage during a change; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import facesets
import httpx
import pytest
from conftest import MosquittoBroker, free_port
from waiting import wait_until

from models.contract import topics
from models.contract.assembler import GalleryAssembler
from models.contract.events import new_event
from models.contract.gallery import Gallery
from models.contract.mqtt_link import InboundMessage, PahoMqttLink
from models.contract.signing import Verifier
from models.contract.status import EdgeStatus
from models.contract.timestamps import utc_now
from models.errors import ContractError
from models.face.fingerprint import encoder_fingerprint

SITE = "hq"
TOKEN = "service-test-token-0123456789"


class Server:
    def __init__(self, root: Path, broker: MosquittoBroker) -> None:
        self.port = free_port()
        self.key = root / "keys" / "gallery.pem"
        self.config = root / "server.yaml"
        self.config.write_text(
            json.dumps(
                {
                    "site": SITE,
                    "database": {"url": str(root / "server.db")},
                    "mqtt": {"url": broker.url, "client_id": f"svc-{self.port}"},
                    "gallery": {"signing_key": str(self.key)},
                    "api": {"port": self.port},
                }
            )
        )
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60.0)

    def start(self) -> None:
        env = {**os.environ, "FACEATTEND_ADMIN_TOKEN": TOKEN}
        cmd = [sys.executable, "-m", "enrollment_server.cli", "-c", str(self.config), "serve"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        assert wait_until(self._healthy, timeout=60.0), self.log.read_text()[-3000:]

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict:
        return self.http.get("/healthz").json()["components"]

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        return self.http.request(method, "/api/v1" + path, headers={"Authorization": f"Bearer {TOKEN}"}, **kw)

    def upload(self, person: str, name: str, photo: Path) -> dict:
        files = [("files", (photo.name, photo.read_bytes(), "application/octet-stream"))]
        r = self.api("POST", f"/people/{person}/faces", files=files, data={"name": name, "site": SITE})
        assert r.status_code in (200, 201), r.text
        return r.json()

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Subscriber:
    """An edge's gallery side: verifies every publication with the server's public key and our fingerprint."""

    def __init__(self, link: PahoMqttLink, public_key: Path) -> None:
        self.assembler = GalleryAssembler(Verifier.from_pem_file(public_key), encoder_fingerprint().value, SITE)
        self.galleries: queue.Queue[Gallery] = queue.Queue()
        self.errors: list[ContractError] = []
        link.subscribe(topics.site_gallery_filter(SITE), 1, self._feed)

    def _feed(self, msg: InboundMessage) -> None:
        try:
            gallery = self.assembler.feed(msg.topic, msg.payload)
        except ContractError as exc:
            self.errors.append(exc)
            return
        if gallery is not None:
            self.galleries.put(gallery)

    def next(self, timeout: float = 30.0) -> Gallery:
        return self.galleries.get(timeout=timeout)


@pytest.fixture
def server(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[Server]:
    s = Server(tmp_path, mosquitto)
    s.start()
    yield s
    s.close()


def photo(person: str, i: int = 0) -> Path:
    return facesets.photos(person)[i]


def test_serve_enrolls_publishes_ingests_and_stops_cleanly(server: Server, mosquitto: MosquittoBroker, mqtt_links):
    assert wait_until(lambda: all(server.health()["mqtt"].values()), timeout=20.0), server.health()
    edge = Subscriber(mqtt_links(mosquitto), server.key.with_suffix(".pub.pem"))
    # the server published the empty gallery of its site when it connected
    first = edge.next()
    assert first.count == 0

    report = server.upload("obama", "Barack Obama", photo("Barack_Obama"))
    assert report["added"] == 1 and report["gallery"] == {"changed": True, "published": True, "error": None}
    g = edge.next()
    assert g.version > first.version and g.count == 1 and [p.person_id for p in g.people] == ["obama"]

    # an edge's status and an event, through the broker into the database
    device = "door-1"
    link = mqtt_links(mosquitto)
    assert link.wait_connected(10)
    status = EdgeStatus(
        state="online", device_id=device, site=SITE, agent_version="t", gallery_version=g.version,
        fingerprint=g.fingerprint, ts=utc_now(),
    )  # fmt: skip
    assert link.publish(topics.edge_status(device), status.to_json(), retain=True).wait(10)
    ev = new_event(
        seq=1, device_id=device, site=SITE, camera="c0", track_id=1, person_id="obama", name="Barack Obama",
        distance=0.31, margin=0.2, threshold=0.5, gallery_version=g.version, fingerprint=g.fingerprint,
    )  # fmt: skip
    assert link.publish(topics.edge_events(device), ev.to_json()).wait(10)
    link.publish(topics.edge_events(device), b"{not json").wait(10)  # rejected, logged, the server goes on

    def stored() -> bool:
        events = server.api("GET", "/attendance", params={"site": SITE}).json()["events"]
        return [e["event_id"] for e in events] == [ev.event_id]

    assert wait_until(stored, timeout=15.0)
    devices = server.api("GET", f"/sites/{SITE}/devices").json()["devices"]
    assert [(d["device_id"], d["state"], d["gallery_version"]) for d in devices] == [(device, "online", g.version)]
    assert server.health()["ingest"]["rejected"] == {"malformed": 1}

    # broker down during a change: stored, reported unpublished, published once the broker is back
    mosquitto.stop()
    assert wait_until(lambda: not server.health()["mqtt"]["gallery_connected"], timeout=15.0)
    report = server.upload("jolie", "Angelina Jolie", photo("Angelina_Jolie"))
    assert report["added"] == 1 and report["gallery"]["published"] is False
    assert "not connected" in report["gallery"]["error"]
    mosquitto.start()
    # the subscriber may first see the replay of the version it has (ignored), then the new one
    deadline_gallery = edge.next(timeout=40.0)
    while deadline_gallery.version <= g.version:
        deadline_gallery = edge.next(timeout=40.0)
    assert sorted(p.person_id for p in deadline_gallery.people) == ["jolie", "obama"]
    assert not edge.errors

    assert server.terminate() == 0
    log = server.log.read_text()
    assert "enrollment server stopped: 1 events stored" in log
    assert "Traceback" not in log


def test_serve_refuses_to_start_without_a_token(tmp_path: Path, mosquitto: MosquittoBroker):
    s = Server(tmp_path, mosquitto)
    env = {k: v for k, v in os.environ.items() if k != "FACEATTEND_ADMIN_TOKEN"}
    cmd = [sys.executable, "-m", "enrollment_server.cli", "-c", str(s.config), "serve"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "FACEATTEND_ADMIN_TOKEN" in r.stderr and "Traceback" not in r.stderr


def test_a_second_serve_on_one_sqlite_database_refuses_to_start_and_says_why(server: Server, mosquitto, tmp_path):
    # the running server holds the database; a second one (another port, another client id) must not publish beside it
    (tmp_path / "second").mkdir()
    other = Server(tmp_path / "second", mosquitto)
    config = json.loads(server.config.read_text())
    config["api"]["port"] = other.port
    config["mqtt"]["client_id"] = f"svc-{other.port}"
    other.config.write_text(json.dumps(config))
    env = {**os.environ, "FACEATTEND_ADMIN_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "enrollment_server.cli", "-c", str(other.config), "serve"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "one server per SQLite database" in r.stderr and "serve.lock" in r.stderr and "Traceback" not in r.stderr
    assert server.health()["gallery_publisher"] == {"leader": True}  # the first one serves on

    # several servers need PostgreSQL: a shared subscription group on SQLite is refused
    config["mqtt"]["shared_group"] = "ingest"
    config["database"]["url"] = str(tmp_path / "another.db")
    other.config.write_text(json.dumps(config))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "mqtt.shared_group" in r.stderr and "PostgreSQL" in r.stderr, r.stderr[-2000:]
