"""The shipped Mosquitto deployment (deploy/mosquitto/mosquitto.conf + acl) on a real broker: TLS with a CA made
here, passwords and ACL blocks made by the real provisioning code (enrollment_server/provisioning.py).

A denied publish is shown not to arrive: an observer that may read the whole contract tree is subscribed, the
denied message's PUBACK is awaited (Mosquitto routes a message before acknowledging it), and then a permitted
marker is published and received: had the denied message been routed, it would have reached the observer before
the marker.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import mosquitto_binary
from deploy_broker import (
    REPO,
    DeployBroker,
    Links,
    Pki,
    device_config,
    make_pki,
    new_auth_dir,
    pki_from_make_certs,
    server_config,
)

from enrollment_server.provisioning import (
    HOME_ASSISTANT_PREFIX,
    AclBlock,
    BrokerAuth,
    consumer_acl,
    device_acl,
    hash_password,
)
from models.contract import topics
from models.contract.mqtt_link import InboundMessage, MqttConfig, MqttLink, Will, shared_filter

DEVICES = {"door-1": "hq", "door-2": "hq", "gate-7": "annex"}
CONSUMER = "reports"
HOME_ASSISTANT = "home-assistant"  # a consumer made with broker-user --home-assistant
OBSERVER = "observer"  # test-only user that reads the whole contract tree
DELIVERY_S = 5.0
MAKE_CERTS = REPO / "deploy" / "mosquitto" / "make-certs.sh"


@dataclass
class Site:
    broker: DeployBroker
    pki: Pki
    auth: BrokerAuth
    passwords: dict[str, str]
    links: Links

    def device(self, name: str, **options: object) -> MqttConfig:
        return device_config(self.broker, name, self.passwords[name], **options)

    def connect(self, name: str, *, will: Will | None = None, **options: object) -> MqttLink:
        return self.links.connect(self.device(name, **options), will=will)

    def server(self, client_id: str = "enrollment-server-test", **options: object) -> MqttLink:
        return self.links.connect(server_config(self.broker, client_id, **options))


class Inbox:
    """What one link receives on the filters given."""

    def __init__(self, link: MqttLink, *filters: str) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        for f in filters:
            link.subscribe(f, 1, self._on)
        for f in filters:
            assert link.wait_subscribed(f, 5.0)

    def _on(self, msg: InboundMessage) -> None:
        with self._cond:
            self.got.append((msg.topic, msg.payload, msg.retain))
            self._cond.notify_all()

    def wait_for(self, topic: str, payload: bytes, timeout: float = DELIVERY_S) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(t == topic and p == payload for t, p, _ in self.got), timeout)
        assert ok, f"{topic} {payload!r} did not arrive; got {self.topics()}"

    def topics(self) -> list[str]:
        with self._cond:
            return [t for t, _, _ in self.got]

    def payloads(self) -> list[bytes]:
        with self._cond:
            return [p for _, p, _ in self.got]


@pytest.fixture
def deploy_broker(tmp_path: Path) -> Iterator[DeployBroker]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary (apt install mosquitto, or set FACEATTEND_MOSQUITTO)")
    pki = make_pki(tmp_path / "pki")
    auth_dir = new_auth_dir(tmp_path / "auth")
    broker = DeployBroker(tmp_path / "broker", binary, pki, auth_dir)
    yield broker
    broker.stop()


@pytest.fixture
def site(deploy_broker: DeployBroker) -> Iterator[Site]:
    auth = BrokerAuth(deploy_broker.auth_dir)
    passwords = {name: auth.upsert(device_acl(name, s)).password for name, s in DEVICES.items()}
    passwords[CONSUMER] = auth.upsert(consumer_acl(CONSUMER)).password
    ha_block = consumer_acl(HOME_ASSISTANT, home_assistant_prefix=HOME_ASSISTANT_PREFIX)
    passwords[HOME_ASSISTANT] = auth.upsert(ha_block).password
    passwords[OBSERVER] = "observer-secret"
    with auth.acl.open("a") as fh:
        fh.write(f"\nuser {OBSERVER}\ntopic read {topics.ROOT}/#\n")
    with auth.passwords.open("a") as fh:
        fh.write(f"{OBSERVER}:{hash_password(passwords[OBSERVER])}\n")
    deploy_broker.start()
    links = Links()
    yield Site(deploy_broker, deploy_broker.pki, auth, passwords, links)
    links.stop_all()


def marker(site: Site, inbox: Inbox, tag: str) -> None:
    """door-1 publishes on its own events topic and the inbox receives it."""
    link = site.connect("door-1", client_id="marker")
    payload = f"marker {tag}".encode()
    assert link.publish(topics.edge_events("door-1"), payload, qos=1).wait(DELIVERY_S)
    inbox.wait_for(topics.edge_events("door-1"), payload)


# --- TLS and authentication ---------------------------------------------------------------------------------------


def test_over_tls_an_edge_and_the_server_connect_and_exchange_contract_traffic(site):
    server = site.server("enrollment-server-ingest", clean_session=False)
    server_inbox = Inbox(server, *topics.SERVER_FILTERS)
    will = Will(topics.edge_status("door-1"), b"offline")
    edge = site.connect("door-1", will=will)
    edge_inbox = Inbox(edge, topics.site_gallery_filter("hq"))
    consumer = site.connect(CONSUMER)
    consumer_inbox = Inbox(consumer, topics.ALL_EDGE_EVENTS, topics.ALL_EDGE_STATUS)

    for topic, payload in (
        (topics.edge_events("door-1"), b"event"),
        (topics.edge_status("door-1"), b"online"),
        (topics.gallery_ack("door-1"), b"ack"),
    ):
        handle = edge.publish(topic, payload, qos=1, retain=topic.endswith("/status"))
        assert handle.wait(DELIVERY_S)
        server_inbox.wait_for(topic, payload)
    consumer_inbox.wait_for(topics.edge_events("door-1"), b"event")
    consumer_inbox.wait_for(topics.edge_status("door-1"), b"online")

    for topic, payload in ((topics.gallery_blob("hq", 0), b"chunk"), (topics.gallery_manifest("hq"), b"manifest")):
        assert server.publish(topic, payload, qos=1, retain=True).wait(DELIVERY_S)
        edge_inbox.wait_for(topic, payload)
    # the server confirms stored events to the edge that sent them
    confirmations = Inbox(edge, topics.events_stored("door-1"))
    assert server.publish(topics.events_stored("door-1"), b"stored", qos=1).wait(DELIVERY_S)
    confirmations.wait_for(topics.events_stored("door-1"), b"stored")

    # MQTT 5 works the same way (the server and consumers may use either protocol)
    v5 = site.connect("door-2", protocol="5")
    assert v5.publish(topics.edge_events("door-2"), b"v5", qos=1).wait(DELIVERY_S)
    server_inbox.wait_for(topics.edge_events("door-2"), b"v5")


def test_the_servers_of_one_site_share_the_edges_events_through_a_shared_subscription(site):
    first = site.server("enrollment-server-ingest-a", protocol="5")
    second = site.server("enrollment-server-ingest-b", protocol="5")
    shared = shared_filter("ingest", topics.ALL_EDGE_EVENTS)
    inboxes = [Inbox(first, shared), Inbox(second, shared)]
    edge = site.connect("door-1")
    sent = [f"event {i}".encode() for i in range(20)]
    for payload in sent:
        assert edge.publish(topics.edge_events("door-1"), payload, qos=1).wait(DELIVERY_S)
    deadline = time.monotonic() + DELIVERY_S
    while sum(len(i.got) for i in inboxes) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = [p for inbox in inboxes for p in inbox.payloads()]
    assert sorted(got) == sorted(sent)  # each event to one server: the shipped ACL grants the shared filter
    assert all(inbox.got for inbox in inboxes)  # and both take a share


def test_clients_without_valid_credentials_are_refused(site, tmp_path):
    links, broker = site.links, site.broker
    assert links.refused(site.device("door-1", password="not-the-password"))
    assert links.refused(device_config(broker, "nobody", "whatever"))
    assert links.refused(MqttConfig(host="127.0.0.1", port=broker.port, tls=True, ca_file=str(site.pki.ca_file)))
    # the server's listener wants a client certificate from the site CA: a device password is not enough ...
    no_cert = site.device("door-1", port=broker.internal_port)
    assert links.refused(no_cert)
    # ... and neither is a certificate from another CA
    rogue = make_pki(tmp_path / "rogue")
    assert links.refused(
        server_config(broker, "rogue", cert_file=str(rogue.server_cert), key_file=str(rogue.server_key))
    )
    # a client certificate alone does not open the edges' listener (passwords authenticate there)
    assert links.refused(
        MqttConfig(
            host="127.0.0.1",
            port=broker.port,
            tls=True,
            ca_file=str(site.pki.ca_file),
            cert_file=str(site.pki.server_cert),
            key_file=str(site.pki.server_key),
        )
    )
    # and an edge that trusts another CA does not talk to this broker (server authentication)
    assert links.refused(site.device("door-1", ca_file=str(rogue.ca_file)))
    # the genuine ones do connect
    site.connect("door-1")
    site.server()


def _plain_connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def test_plain_tcp_is_refused_on_both_listeners(site):
    for port in (site.broker.port, site.broker.internal_port):
        cfg = MqttConfig(host="127.0.0.1", port=port, username="door-1", password=site.passwords["door-1"])
        assert site.links.refused(cfg)
        # at the byte level: an MQTT CONNECT in clear never gets a CONNACK (0x20)
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
            sock.sendall(_plain_connect_packet("plain"))
            try:
                reply = sock.recv(4)
            except (ConnectionResetError, TimeoutError):
                reply = b""
            assert not reply.startswith(b"\x20"), reply
    # whereas TLS 1.2+ with the site CA completes a handshake
    ctx = ssl.create_default_context(cafile=str(site.pki.ca_file))
    raw = socket.create_connection(("127.0.0.1", site.broker.port), timeout=5.0)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


# --- ACLs -------------------------------------------------------------------------------------------------------


def test_a_device_cannot_publish_as_another_device_nor_publish_a_gallery(site):
    observer = site.connect(OBSERVER)
    inbox = Inbox(observer, f"{topics.ROOT}/#")
    forged = [
        (topics.edge_events("door-2"), b"forged event", False),
        (topics.edge_status("door-2"), b"forged status", True),
        (topics.gallery_ack("door-2"), b"forged ack", False),
        (topics.gallery_manifest("hq"), b"forged manifest", True),
        (topics.gallery_blob("hq", 0), b"forged chunk", True),
        (topics.edge_unknown("door-2"), b"forged face", False),
        (f"{topics.ROOT}/edge/door-1-extra/events", b"prefix is not the device", False),
        # confirmations are the server's word: not even for its own events may a device write one
        (topics.events_stored("door-2"), b"forged confirmation", False),
        (topics.events_stored("door-1"), b"forged own confirmation", False),
    ]
    door1 = site.connect("door-1")
    for topic, payload, retain in forged:
        # MQTT 3.1.1 has no way to say "not authorised": the broker acknowledges and drops the message
        assert door1.publish(topic, payload, qos=1, retain=retain).wait(DELIVERY_S)
    door1_v5 = site.connect("door-1", protocol="5", client_id="v5")
    for topic, payload, retain in forged:
        handle = door1_v5.publish(topic, payload + b" v5", qos=1, retain=retain)
        assert handle.wait(DELIVERY_S) and handle.rejected and handle.reason_code == 0x87  # not authorised
    marker(site, inbox, "after forgeries")
    time.sleep(0.3)
    assert not [p for p in inbox.payloads() if p.startswith((b"forged", b"prefix"))], inbox.topics()

    # nothing forged was retained either: a fresh subscriber gets no replay
    late = Inbox(site.connect(OBSERVER, client_id="late-observer"), f"{topics.ROOT}/#")
    time.sleep(0.5)
    assert late.got == []


def test_a_device_reads_only_its_own_sites_gallery_and_no_other_devices_traffic(site):
    server = site.server()
    assert server.publish(topics.gallery_manifest("annex"), b"annex gallery", qos=1, retain=True).wait(DELIVERY_S)
    assert server.publish(topics.gallery_manifest("hq"), b"hq gallery", qos=1, retain=True).wait(DELIVERY_S)

    door1 = site.connect("door-1")
    inbox = Inbox(
        door1,
        topics.site_gallery_filter("annex"),
        f"{topics.ROOT}/site/+/gallery/#",
        topics.ALL_EDGE_EVENTS,
        topics.ALL_EDGE_STATUS,
        topics.ALL_EVENTS_STORED,
    )
    inbox.wait_for(topics.gallery_manifest("hq"), b"hq gallery")  # retained, replayed on subscribe
    # live traffic too: another site's gallery chunk, another device's event and confirmation, then door-1's own
    assert server.publish(topics.gallery_blob("annex", 0), b"annex chunk", qos=1).wait(DELIVERY_S)
    gate = site.connect("gate-7")
    assert gate.publish(topics.edge_events("gate-7"), b"gate event", qos=1).wait(DELIVERY_S)
    assert server.publish(topics.events_stored("gate-7"), b"gate stored", qos=1).wait(DELIVERY_S)
    assert server.publish(topics.events_stored("door-1"), b"door-1 stored", qos=1).wait(DELIVERY_S)
    assert server.publish(topics.gallery_blob("hq", 0), b"hq chunk", qos=1).wait(DELIVERY_S)
    inbox.wait_for(topics.gallery_blob("hq", 0), b"hq chunk")
    time.sleep(0.3)
    assert sorted(inbox.payloads()) == [b"door-1 stored", b"hq chunk", b"hq gallery"], inbox.topics()

    # the device at the other site gets its own gallery only
    gate_inbox = Inbox(gate, f"{topics.ROOT}/site/+/gallery/#")
    gate_inbox.wait_for(topics.gallery_manifest("annex"), b"annex gallery")
    time.sleep(0.3)
    assert gate_inbox.payloads() == [b"annex gallery"]


def test_a_consumer_reads_events_and_statuses_and_cannot_publish(site):
    observer = site.connect(OBSERVER)
    inbox = Inbox(observer, f"{topics.ROOT}/#")
    consumer = site.connect(CONSUMER, protocol="5")
    consumer_inbox = Inbox(
        consumer, topics.ALL_EDGE_EVENTS, topics.ALL_EDGE_STATUS, f"{topics.ROOT}/site/#", topics.ALL_EVENTS_STORED
    )
    for topic, retain in (
        (topics.edge_events("door-1"), False),
        (topics.edge_status("door-1"), True),
        (topics.gallery_manifest("hq"), True),
        (topics.gallery_ack("door-1"), False),
        (topics.events_stored("door-1"), False),
        (f"{topics.ROOT}/consumer/{CONSUMER}/anything", False),
    ):
        handle = consumer.publish(topic, b"from the consumer", qos=1, retain=retain)
        assert handle.wait(DELIVERY_S) and handle.rejected, topic
    marker(site, inbox, "after consumer")
    consumer_inbox.wait_for(topics.edge_events("door-1"), b"marker after consumer")
    server = site.server()
    assert server.publish(topics.gallery_manifest("hq"), b"gallery", qos=1, retain=True).wait(DELIVERY_S)
    inbox.wait_for(topics.gallery_manifest("hq"), b"gallery")
    time.sleep(0.3)
    assert server.publish(topics.events_stored("door-1"), b"stored", qos=1).wait(DELIVERY_S)
    inbox.wait_for(topics.events_stored("door-1"), b"stored")
    time.sleep(0.3)
    assert b"from the consumer" not in inbox.payloads()
    assert b"gallery" not in consumer_inbox.payloads()  # galleries are for edges only
    assert b"stored" not in consumer_inbox.payloads()  # confirmations too


def test_unknown_visitors_faces_reach_the_server_alone(site):
    """A device sends its own unknown faces to the server; no consumer (Home Assistant included) and no other
    device reads them."""
    server = site.server()
    server_inbox = Inbox(server, topics.ALL_EDGE_UNKNOWN)
    consumer_inbox = Inbox(site.connect(CONSUMER), topics.ALL_EDGE_UNKNOWN, f"{topics.ROOT}/#")
    ha_inbox = Inbox(site.connect(HOME_ASSISTANT), topics.ALL_EDGE_UNKNOWN, f"{topics.ROOT}/#")
    door2_inbox = Inbox(site.connect("door-2"), topics.ALL_EDGE_UNKNOWN, f"{topics.ROOT}/edge/#")
    door1 = site.connect("door-1", protocol="5")
    handle = door1.publish(topics.edge_unknown("door-1"), b"a face", qos=1)
    assert handle.wait(DELIVERY_S) and not handle.rejected
    server_inbox.wait_for(topics.edge_unknown("door-1"), b"a face")
    # after a marker every consumer received, the face has certainly been routed (or not) to them too
    assert door1.publish(topics.edge_events("door-1"), b"marker", qos=1).wait(DELIVERY_S)
    consumer_inbox.wait_for(topics.edge_events("door-1"), b"marker")
    ha_inbox.wait_for(topics.edge_events("door-1"), b"marker")
    time.sleep(0.3)
    for inbox in (consumer_inbox, ha_inbox, door2_inbox):
        assert b"a face" not in inbox.payloads(), inbox.topics()


def test_home_assistant_discovery_rights(site):
    """The server publishes discovery under homeassistant/# and reads Home Assistant's birth message; a Home
    Assistant user reads the discovery and publishes its birth message, nothing else; a plain consumer does neither."""
    server = site.server()
    birth_inbox = Inbox(server, f"{HOME_ASSISTANT_PREFIX}/status")
    ha = site.connect(HOME_ASSISTANT, protocol="5")
    ha_inbox = Inbox(ha, f"{HOME_ASSISTANT_PREFIX}/#")
    config_topic = f"{HOME_ASSISTANT_PREFIX}/sensor/faceattend/door-1_last_person/config"
    assert server.publish(config_topic, b"{}", qos=1).wait(DELIVERY_S)
    ha_inbox.wait_for(config_topic, b"{}")
    birth = ha.publish(f"{HOME_ASSISTANT_PREFIX}/status", b"online", qos=1)
    assert birth.wait(DELIVERY_S) and not birth.rejected
    birth_inbox.wait_for(f"{HOME_ASSISTANT_PREFIX}/status", b"online")
    # Home Assistant may not announce entities itself, nor publish as a door
    for topic in (config_topic, topics.edge_events("door-1"), topics.gallery_manifest("hq")):
        handle = ha.publish(topic, b"from home assistant", qos=1)
        assert handle.wait(DELIVERY_S) and handle.rejected and handle.reason_code == 0x87, topic
    # a plain consumer reads no discovery and cannot fake the birth message
    consumer = site.connect(CONSUMER, protocol="5")
    consumer_inbox = Inbox(consumer, f"{HOME_ASSISTANT_PREFIX}/#")
    refused = consumer.publish(f"{HOME_ASSISTANT_PREFIX}/status", b"online from a consumer", qos=1)
    assert refused.wait(DELIVERY_S) and refused.rejected
    assert server.publish(config_topic, b"{ }", qos=1).wait(DELIVERY_S)
    ha_inbox.wait_for(config_topic, b"{ }")
    time.sleep(0.3)
    assert consumer_inbox.got == []
    assert b"from home assistant" not in ha_inbox.payloads()
    assert b"online from a consumer" not in birth_inbox.payloads()


def _raw_client_with_will(site: Site, device: str, will_topic: str, will_payload: bytes) -> mqtt.Client:
    """A plain paho client (its socket is ours to cut) connected as `device` with a last will."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device)
    client.username_pw_set(device, site.passwords[device])
    client.tls_set(ca_certs=str(site.pki.ca_file))
    client.will_set(will_topic, will_payload, qos=1, retain=False)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set() if not a[3].is_failure else None
    client.connect("127.0.0.1", site.broker.port, keepalive=30)
    client.loop_start()
    assert connected.wait(DELIVERY_S), f"{device} did not connect"
    return client


def _cut(client: mqtt.Client) -> None:
    """An unclean loss (no DISCONNECT): the broker sends the will."""
    client.reconnect_delay_set(60, 60)
    sock = client.socket()
    sock.shutdown(socket.SHUT_RDWR)
    time.sleep(0.2)
    client.loop_stop()


def test_a_last_will_on_another_devices_topic_is_never_delivered(site):
    observer = site.connect(OBSERVER)
    inbox = Inbox(observer, topics.ALL_EDGE_STATUS)
    forger = _raw_client_with_will(site, "door-1", topics.edge_status("gate-7"), b"forged will")
    honest = _raw_client_with_will(site, "door-2", topics.edge_status("door-2"), b"door-2 offline")
    _cut(forger)
    time.sleep(0.3)
    _cut(honest)
    inbox.wait_for(topics.edge_status("door-2"), b"door-2 offline")  # wills are delivered at all
    time.sleep(0.3)
    assert b"forged will" not in inbox.payloads()


def test_the_broker_forces_the_client_id_to_the_username_so_no_session_can_be_taken_over(site):
    drops: list[str] = []
    server = site.links.make(server_config(site.broker, "enrollment-server-ingest", clean_session=False))
    server.add_connection_listener(lambda up: None if up else drops.append("server"))
    server.start()
    assert server.wait_connected(5.0)
    door1 = site.connect("door-1", client_id="door-1")
    door1.add_connection_listener(lambda up: None if up else drops.append("door-1"))
    # door-2 asks for the server's and door-1's client ids: on the edges' listener it gets its own username
    site.connect("door-2", client_id="enrollment-server-ingest")
    site.connect("door-2", client_id="door-1")
    time.sleep(1.0)
    assert drops == []
    assert server.is_connected() and door1.is_connected()
    log = site.broker.log_text()
    assert re.search(r"as enrollment-server-ingest \(.*u'enrollment-server'\)", log)  # the certificate's CN
    # both got door-2 (the two then take the id from each other, each reconnect one more line: at least two)
    assert len(re.findall(r"as door-2 \(.*u'door-2'\)", log)) >= 2
    assert not re.search(r"as (door-1|enrollment-server-ingest) \(.*u'door-2'\)", log)


# --- the operator's certificate script ---------------------------------------------------------------------------


def test_certificates_from_make_certs_serve_the_shipped_config(tmp_path):
    binary, openssl = mosquitto_binary(), shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("needs mosquitto and openssl")
    site_dir = tmp_path / "site"
    done = subprocess.run(
        ["bash", str(MAKE_CERTS), str(site_dir), "broker.example.org"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    pki = pki_from_make_certs(site_dir)
    assert not (site_dir / "broker-certs" / "ca.key").exists() and not (site_dir / "server-certs" / "ca.key").exists()
    auth = BrokerAuth(new_auth_dir(tmp_path / "auth"))
    password = auth.upsert(device_acl("door-1", "hq")).password
    broker = DeployBroker(tmp_path / "broker", binary, pki, auth.dir)
    broker.start()
    links = Links()
    try:
        server = links.connect(server_config(broker, "enrollment-server-ingest"))
        inbox = Inbox(server, topics.ALL_EDGE_EVENTS)
        edge = links.connect(device_config(broker, "door-1", password))
        assert edge.publish(topics.edge_events("door-1"), b"hello", qos=1).wait(DELIVERY_S)
        inbox.wait_for(topics.edge_events("door-1"), b"hello")
        # re-running keeps the CA and the certificates; --renew re-issues the leaves under the same CA
        again = subprocess.run(["bash", str(MAKE_CERTS), str(site_dir), "x"], capture_output=True, text=True)
        assert again.returncode == 0 and again.stdout.count("keeping") == 2
    finally:
        links.stop_all()
        broker.stop()


def test_a_device_provisioned_before_1_1_gets_its_confirmations_once_provisioned_again(site):
    """The read rule for confirmations is new in 1.1: an old block withholds them (Mosquitto still grants the
    subscription); provisioning the device again (its password kept) and a HUP let them through."""
    old_rules = tuple(r for r in device_acl("door-1", "hq").rules if "/device/" not in r)
    password = site.passwords["door-1"]
    assert site.auth.upsert(AclBlock("device", "door-1", "hq", old_rules), known_password=password).status == "kept"
    site.broker.reload()
    server = site.server()
    door1 = site.connect("door-1")
    confirmations = Inbox(door1, topics.events_stored("door-1"))
    # routed before the PUBACK (see the module docstring): had it been delivered, it would be here by now
    assert server.publish(topics.events_stored("door-1"), b"withheld", qos=1).wait(DELIVERY_S)
    time.sleep(0.3)
    assert confirmations.got == []

    assert site.auth.upsert(device_acl("door-1", "hq"), known_password=password).status == "kept"
    site.broker.reload()
    door1 = site.connect("door-1", client_id="again")
    confirmations = Inbox(door1, topics.events_stored("door-1"))
    assert server.publish(topics.events_stored("door-1"), b"delivered", qos=1).wait(DELIVERY_S)
    confirmations.wait_for(topics.events_stored("door-1"), b"delivered")
