"""`enrollment-server provision-device` / `broker-user` / `revoke-broker-user` against the shipped broker config,
and the path of a provisioned edge: its config loads with the edge agent's own loader, it connects with what the
bundle holds, it applies the gallery the server publishes through the broker, its events reach the server's
ingest and come back confirmed (the ACLs let each side through), and it refuses a gallery signed by another key
even though it came through the broker from the server's own (authorised) connection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FAST_RECONNECT, mosquitto_binary
from deploy_broker import DeployBroker, Links, make_pki, new_auth_dir, server_config
from outbox_child import make_event

from edge_agent import config as edge_config
from edge_agent.agent import check_files
from edge_agent.agent import mqtt_config as agent_mqtt_config
from edge_agent.delivery.event_publisher import EventPublisher
from edge_agent.delivery.outbox import Outbox
from edge_agent.gallery import index as gallery_index
from edge_agent.gallery import sync as gallery_sync
from enrollment_server import cli
from enrollment_server import components as c
from enrollment_server.config import ServerConfig, load_config
from enrollment_server.gallery_publisher import GalleryPublisher
from enrollment_server.ingest import Ingest, ingest_config
from enrollment_server.provisioning import BrokerAuth, check_password, device_acl
from enrollment_server.store import Store
from models.contract import topics
from models.contract.mqtt_link import InboundMessage, MqttConfig
from models.contract.signing import Signer
from models.contract.status import GalleryAck
from models.face.fingerprint import encoder_fingerprint

SITE = "hq"
DELIVERY_S = 10.0


@dataclass
class Deployment:
    broker: DeployBroker
    server_yaml: Path
    cfg: ServerConfig
    bundles: Path
    links: Links
    tmp: Path

    def cli(self, *argv: str) -> int:
        return cli.main(["-c", str(self.server_yaml), *argv])

    def provision(self, device: str, *extra: str, site: str = SITE) -> int:
        return self.cli(
            "provision-device",
            "--device",
            device,
            "--site",
            site,
            "--broker-url",
            f"mqtts://localhost:{self.broker.port}",
            "--broker-auth",
            str(self.broker.auth_dir),
            "--out",
            str(self.bundles),
            "--backend",
            "onnxruntime",
            *extra,
        )


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary (apt install mosquitto, or set FACEATTEND_MOSQUITTO)")
    pki = make_pki(tmp_path / "pki")
    broker = DeployBroker(tmp_path / "broker", binary, pki, new_auth_dir(tmp_path / "auth"))
    server_yaml = tmp_path / "server.yaml"
    server_yaml.write_text(
        yaml.safe_dump(
            {
                "site": SITE,
                "database": {"url": str(tmp_path / "server.db")},
                "mqtt": {
                    "url": broker.internal_url,
                    "client_id": "enrollment-server",
                    "ca_file": str(pki.ca_file),
                    "cert_file": str(pki.server_cert),
                    "key_file": str(pki.server_key),
                },
                "gallery": {"signing_key": str(tmp_path / "keys" / "gallery-signing.pem"), "chunk_kib": 1},
            }
        )
    )
    broker.start()
    links = Links()
    deployment = Deployment(broker, server_yaml, load_config(server_yaml), tmp_path / "bundles", links, tmp_path)
    assert deployment.cli("init") == 0
    yield deployment
    links.stop_all()
    broker.stop()


def edge_mqtt(cfg, **options: object) -> MqttConfig:
    """What the edge agent connects with (edge_agent.agent.mqtt_config: the URL with the username, the password
    file, the CA, its client id), with the tests' fast reconnects."""
    check_files(cfg)  # every file the config names exists and parses, as the agent checks at start
    return dataclasses.replace(agent_mqtt_config(cfg), **{**FAST_RECONNECT, **options})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def enroll(store: Store, fingerprint: str, people: dict[str, int]) -> None:
    store.ensure_site(SITE)
    for person_id, n in people.items():
        store.add_person(person_id, SITE, person_id.title())
        for i in range(n):
            seed = int.from_bytes(hashlib.sha256(f"{person_id}/{i}".encode()).digest()[:4], "little")
            vector = (np.random.default_rng(seed).standard_normal(128) * 0.1).astype(np.float32)
            digest = hashlib.sha256(f"{person_id}/{i}".encode()).hexdigest()
            store.add_template(person_id, vector, encoder_fingerprint=fingerprint, image_sha256=digest)


class Acks:
    def __init__(self, link) -> None:
        self.got: queue.Queue[GalleryAck] = queue.Queue()
        link.subscribe(topics.ALL_GALLERY_ACKS, 1, self._on)
        assert link.wait_subscribed(topics.ALL_GALLERY_ACKS, 5.0)

    def _on(self, msg: InboundMessage) -> None:
        self.got.put(GalleryAck.from_json(msg.payload))

    def next(self) -> GalleryAck:
        return self.got.get(timeout=DELIVERY_S)


# --- the command --------------------------------------------------------------------------------------------------


def test_a_provisioned_device_gets_a_valid_config_connects_and_applies_the_servers_gallery(deployment, capsys):
    d = deployment
    assert d.provision("door-1", "--camera", "door=/dev/video0", "--camera", "lobby=rtsp://cam.local/stream") == 0
    out = capsys.readouterr().out
    bundle = d.bundles / "door-1"
    assert str(bundle) in out and "kill -s SIGHUP mosquitto" in out and "edge-agent check-config" in out
    password_file = bundle / "mqtt.password"
    password = password_file.read_text().strip()
    assert password not in out  # the secret is in the bundle, not on the terminal
    assert (mode(bundle), mode(password_file), mode(bundle / "edge.yaml")) == (0o700, 0o600, 0o640)
    assert sorted(os.listdir(bundle)) == [
        "INSTALL.txt",
        "ca.crt",
        "edge.yaml",
        "gallery-signing.pub.pem",
        "mqtt.password",
    ]
    assert (bundle / "ca.crt").read_bytes() == d.broker.pki.ca_file.read_bytes()

    # the broker's files: a password line and an ACL block
    hashes = dict(ln.split(":", 1) for ln in (d.broker.auth_dir / "passwords").read_text().splitlines())
    assert check_password(password, hashes["door-1"])
    assert BrokerAuth(d.broker.auth_dir).blocks() == [device_acl("door-1", SITE)]

    # the edge agent's own loader accepts the config, and every file it names is the bundle's
    cfg = edge_config.load_config(bundle / "edge.yaml")
    assert (cfg.device_id, cfg.site, cfg.client_id) == ("door-1", SITE, "door-1")
    assert cfg.mqtt.url == f"mqtts://door-1@localhost:{d.broker.port}"
    assert cfg.mqtt.password_file == bundle / "mqtt.password"
    assert cfg.mqtt.ca_file == bundle / "ca.crt"
    assert cfg.gallery.public_key == bundle / "gallery-signing.pub.pem"
    assert [(cam.name, cam.source) for cam in cfg.cameras] == [
        ("door", "/dev/video0"),
        ("lobby", "rtsp://cam.local/stream"),
    ]
    assert cfg.models.backend == "onnxruntime" and str(cfg.state_dir) == "/var/lib/faceattend"
    server_signer = c.signer_for(d.cfg, create=False)
    verifier = type(server_signer.verifier).from_pem_file(cfg.gallery.public_key)
    assert verifier.key_id == server_signer.key_id
    # the encoder fingerprints agree (the config carries the server's alignment)
    edge_fp = encoder_fingerprint(alignment=cfg.models.alignment).value
    assert edge_fp == c.fingerprint(d.cfg)

    # not before the broker reloads its files; then with exactly what the bundle holds
    assert d.links.refused(edge_mqtt(cfg))
    d.broker.reload()
    edge_link = d.links.connect(edge_mqtt(cfg))

    # the server side: its ingest (persistent session, client certificate) records the edge's acks and events
    store = Store.open(d.cfg.database.url)
    ingest_link = d.links.make(
        ingest_config(d.cfg.mqtt.url, c.client_id(d.cfg, "ingest"), **c.link_options(d.cfg), **FAST_RECONNECT)
    )
    ingest = Ingest(store, ingest_link)
    ingest.start()
    ingest_link.start()
    assert ingest_link.wait_connected(DELIVERY_S)
    try:
        holder = gallery_index.IndexHolder()
        applied: queue.Queue = queue.Queue()
        sync = gallery_sync.GallerySync(
            edge_link, cfg.site, cfg.device_id, verifier, edge_fp, holder, d.tmp / "edge-gallery", applied.put
        )
        sync.start()
        try:
            enroll(store, c.fingerprint(d.cfg), {"ann": 2, "ben": 1})
            assert d.cli("publish") == 0  # the server's own command, over TLS with its client certificate
            index = applied.get(timeout=DELIVERY_S)
            assert (index.version, index.people, index.templates) == (1, 2, 3)
        finally:
            sync.stop(timeout=10.0)
        deadline = time.monotonic() + DELIVERY_S
        while not [x for x in store.list_devices(SITE) if x.device_id == "door-1" and x.gallery_version == 1]:
            assert time.monotonic() < deadline, "the server did not record door-1's ack"
            time.sleep(0.05)
        # an event: stored by the server, confirmed to the edge (its ACL lets it read its own confirmations)
        box = Outbox.open(d.tmp / "edge-outbox.db")
        publisher = EventPublisher(box, edge_link, cfg.device_id, delivery=cfg.delivery)
        publisher.start()
        try:
            sent = box.put_new(lambda seq: make_event(cfg.device_id, seq))
            publisher.notify()
            deadline = time.monotonic() + DELIVERY_S
            while box.depth():
                assert time.monotonic() < deadline, f"no confirmation reached the edge: {publisher.stats()}"
                time.sleep(0.05)
            assert [e.event.event_id for e in store.events(device_id="door-1")] == [sent.event_id]
            assert publisher.stats().confirmations_subscribed
        finally:
            publisher.stop(2.0)
            box.close()
    finally:
        ingest.stop(10.0)
        ingest_link.stop()
        store.close()
    capsys.readouterr()
    assert d.cli("devices", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["device"], r["site"], r["gallery"], r["lag"]) for r in rows] == [("door-1", SITE, 1, 0)]


def test_a_gallery_signed_with_another_key_is_refused_by_the_edge_although_the_broker_delivered_it(deployment):
    d = deployment
    assert d.provision("door-1") == 0
    d.broker.reload()
    cfg = edge_config.load_config(d.bundles / "door-1" / "edge.yaml")
    verifier = type(c.signer_for(d.cfg, create=False).verifier).from_pem_file(cfg.gallery.public_key)
    fp = "test_encoder-0123456789abcdef"
    store = Store.open(d.tmp / "publisher.db")
    enroll(store, fp, {"ann": 1, "ben": 1})
    server_link = d.links.connect(server_config(d.broker, "enrollment-server-gallery"))
    acks = Acks(server_link)

    holder = gallery_index.IndexHolder()
    applied: queue.Queue = queue.Queue()
    edge_link = d.links.connect(edge_mqtt(cfg))
    sync = gallery_sync.GallerySync(edge_link, SITE, "door-1", verifier, fp, holder, d.tmp / "edge", applied.put)
    sync.start()
    try:
        # the server's connection is allowed to publish galleries, so the broker delivers this one; the key is wrong
        attacker = Signer.generate()
        GalleryPublisher(store, server_link, attacker, fp, chunk_size=512).publish(SITE)
        ack = acks.next()
        assert (ack.device_id, ack.version, ack.status) == ("door-1", 1, "error")
        assert ack.error.startswith("SignatureError"), ack.error
        assert holder.current is None and applied.empty()
        assert sync.status().last_error is not None

        # the genuine key's next version is applied
        genuine = c.signer_for(d.cfg, create=False)
        GalleryPublisher(store, server_link, genuine, fp, chunk_size=512).publish(SITE)
        ack = acks.next()
        assert (ack.version, ack.status) == (2, "ok")
        assert applied.get(timeout=DELIVERY_S).version == 2 and holder.current.people == 2
    finally:
        sync.stop(timeout=10.0)
        store.close()


# --- idempotency, rotation, names ---------------------------------------------------------------------------------


def test_provisioning_again_keeps_everything_and_a_new_password_needs_rotate(deployment, capsys):
    d = deployment
    auth = d.broker.auth_dir
    assert d.provision("door-1") == 0
    files = {p: p.read_bytes() for p in (auth / "passwords", auth / "acl", d.bundles / "door-1" / "edge.yaml")}
    assert d.provision("door-1") == 0
    assert {p: p.read_bytes() for p in files} == files
    d.broker.reload()
    first = edge_config.load_config(d.bundles / "door-1" / "edge.yaml")
    d.links.connect(edge_mqtt(first))

    # the bundle's password gone: no silent new password, the operator must ask for one
    (d.bundles / "door-1" / "mqtt.password").unlink()
    capsys.readouterr()
    assert d.provision("door-1") == 2
    assert "--rotate-password" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in files if p.name != "edge.yaml"} == {
        p: b for p, b in files.items() if p.name != "edge.yaml"
    }
    assert d.provision("door-1", "--rotate-password", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["password"] == "rotated" and summary["device"] == "door-1"
    d.broker.reload()
    rotated = edge_config.load_config(d.bundles / "door-1" / "edge.yaml")
    d.links.connect(edge_mqtt(rotated))

    # moving the device to another site rewrites its ACL block: it now reads that site's gallery only
    with Store.open(d.cfg.database.url) as store:
        assert store.device_site("door-1") == SITE  # the registry the ingest checks each event's site against
    assert d.provision("door-1", site="annex") == 0
    assert BrokerAuth(auth).blocks() == [device_acl("door-1", "annex")]
    with Store.open(d.cfg.database.url) as store:
        assert store.device_site("door-1") == "annex"
    assert (d.bundles / "door-1" / "edge.yaml.bak").is_file()
    assert edge_config.load_config(d.bundles / "door-1" / "edge.yaml").site == "annex"


def test_a_revoked_device_provisioned_again_gets_a_new_password_and_the_old_one_stays_refused(deployment):
    """A stolen door is revoked, its replacement provisioned under the same id: the bundle left on the server
    still holds the old password, which must not come back to life."""
    d = deployment
    password_file = d.bundles / "door-1" / "mqtt.password"
    assert d.provision("door-1") == 0
    old_password = password_file.read_text().strip()
    d.broker.reload()
    old = edge_mqtt(edge_config.load_config(d.bundles / "door-1" / "edge.yaml"))
    d.links.connect(old).stop()

    assert d.cli("revoke-broker-user", "door-1", "--broker-auth", str(d.broker.auth_dir)) == 0
    assert d.provision("door-1") == 0
    new_password = password_file.read_text().strip()
    assert new_password != old_password
    d.broker.reload()
    assert d.links.refused(old)  # the stolen door's copy of the bundle
    d.links.connect(edge_mqtt(edge_config.load_config(d.bundles / "door-1" / "edge.yaml")))


def test_names_that_belong_to_someone_else_are_refused(deployment, capsys):
    d = deployment
    auth = d.broker.auth_dir
    assert d.provision("enrollment-server") == 2  # the server's certificate identity
    assert d.provision("door-1") == 0
    out = d.tmp / "reports.password"
    assert d.cli("broker-user", "--username", "door-1", "--password-out", str(out), "--broker-auth", str(auth)) == 2
    with (auth / "passwords").open("a") as fh:
        fh.write("handmade:$7$101$AAAAAAAAAAAAAAAA$AAAA\n")
    assert d.provision("handmade") == 2
    assert d.provision("bad/id") == 2
    plain = ("--broker-url", "mqtt://localhost:1883", "--broker-auth", str(auth), "--out", str(d.bundles))
    assert d.cli("provision-device", "--device", "door-2", *plain) == 2
    assert not (d.bundles / "door-2").exists()
    err = capsys.readouterr().err
    assert "not managed" in err and "already a device" in err and "by hand" in err and "mqtts://" in err


def test_concurrent_provisioning_loses_no_device(deployment):
    d = deployment
    names = [f"door-{i}" for i in range(8)]
    auth = BrokerAuth(d.broker.auth_dir)
    with ThreadPoolExecutor(8) as pool:
        creds = list(pool.map(lambda n: auth.upsert(device_acl(n, SITE)), names))
    hashes = dict(ln.split(":", 1) for ln in auth.passwords.read_text().splitlines())
    assert sorted(hashes) == sorted(names)
    assert all(check_password(cr.password, hashes[cr.username]) for cr in creds)
    assert sorted(b.name for b in auth.blocks()) == sorted(names)
    d.broker.reload()
    for cr in creds[:3]:
        link = d.links.connect(
            MqttConfig(
                host="127.0.0.1",
                port=d.broker.port,
                tls=True,
                username=cr.username,
                password=cr.password,
                ca_file=str(d.broker.pki.ca_file),
            )
        )
        assert link.is_connected()


def test_a_consumer_user_is_created_connects_read_only_and_is_revoked(deployment, capsys):
    d = deployment
    auth = str(d.broker.auth_dir)
    out = d.tmp / "secrets" / "reports.password"
    assert d.cli("broker-user", "--username", "reports", "--password-out", str(out), "--broker-auth", auth) == 0
    assert mode(out) == 0o600 and "publish nothing" in capsys.readouterr().out
    d.broker.reload()
    consumer = MqttConfig(
        host="127.0.0.1",
        port=d.broker.port,
        tls=True,
        username="reports",
        password=out.read_text().strip(),
        ca_file=str(d.broker.pki.ca_file),
        protocol="5",
        **FAST_RECONNECT,
    )
    link = d.links.connect(consumer)
    got: list[bytes] = []
    seen = threading.Event()
    link.subscribe(topics.ALL_EDGE_EVENTS, 1, lambda m: (got.append(m.payload), seen.set()))
    handle = link.publish(topics.edge_events("door-1"), b"consumer speaking", qos=1)
    assert handle.wait(DELIVERY_S) and handle.rejected
    link.stop()

    assert d.cli("revoke-broker-user", "reports", "--broker-auth", auth) == 0
    assert "reports" not in (d.broker.auth_dir / "passwords").read_text()
    assert "reports" not in (d.broker.auth_dir / "acl").read_text()
    d.broker.reload()
    assert d.links.refused(consumer)
    assert d.cli("revoke-broker-user", "reports", "--broker-auth", auth) == 2
    assert d.cli("revoke-broker-user", "enrollment-server", "--broker-auth", auth) == 2


def test_a_reload_keeps_everyone_connected_but_a_revoked_device(deployment):
    """What operators do after each provisioning change: SIGHUP. Mosquitto re-checks every connected client
    against the reloaded files; the server (certificate) and unchanged devices must stay on."""
    d = deployment
    assert d.provision("door-1") == 0 and d.provision("door-2") == 0
    d.broker.reload()
    drops: list[str] = []
    server = d.links.connect(server_config(d.broker, "enrollment-server-ingest", clean_session=False))
    server.add_connection_listener(lambda up: None if up else drops.append("server"))
    doors = {}
    for name in ("door-1", "door-2"):
        doors[name] = d.links.connect(edge_mqtt(edge_config.load_config(d.bundles / name / "edge.yaml")))
        doors[name].add_connection_listener(lambda up, n=name: None if up else drops.append(n))

    assert d.provision("door-3") == 0
    d.broker.reload()
    time.sleep(1.0)
    assert drops == [] and server.is_connected() and all(link.is_connected() for link in doors.values())

    assert d.cli("revoke-broker-user", "door-2", "--broker-auth", str(d.broker.auth_dir)) == 0
    d.broker.reload()
    deadline = time.monotonic() + DELIVERY_S
    while "door-2" not in drops:
        assert time.monotonic() < deadline, "the revoked door stayed connected"
        time.sleep(0.05)
    time.sleep(2.5)  # paho retries within FAST_RECONNECT's 2 s: the door stays out
    assert not doors["door-2"].is_connected()
    assert drops == ["door-2"] and server.is_connected() and doors["door-1"].is_connected()
