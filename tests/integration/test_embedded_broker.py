"""The demo's embedded MQTT broker (edge_agent/devtools/embedded_broker.py), driven by our own PahoMqttLink the way the
edge agent and the server use it, plus raw sockets for what paho cannot be made to do (silence, oversized packets)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import CONNECT_TIMEOUT_S, FAST_RECONNECT, LinkFactory

from edge_agent.devtools.embedded_broker import EmbeddedBroker, topic_matches
from models.contract.limits import DEFAULT_CHUNK_SIZE, KIB, MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES
from models.contract.mqtt_link import InboundMessage, MqttConfig, PahoMqttLink, Will
from models.errors import EmbeddedBrokerError

WAIT_S = 10.0


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


class Inbox:
    """A subscription handler that records what arrives and lets the test wait for it."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self._cv = threading.Condition()

    def __call__(self, message: InboundMessage) -> None:
        with self._cv:
            self.messages.append(message)
            self._cv.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT_S) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: len(self.messages) >= count, timeout)

    def clear(self) -> None:
        with self._cv:
            self.messages.clear()


def barrier(publisher: PahoMqttLink, inbox: Inbox, probe_topic: str) -> None:
    """A probe through the broker behind whatever it was sending this subscriber: once it arrives, anything the
    broker sent before it (a retained replay) has arrived too. Probes until one lands, then forgets them."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        publisher.publish(probe_topic, b"probe", qos=0)
        if inbox.wait_for(1, 0.05):
            time.sleep(0.1)  # let stragglers of the probe land before clearing
            inbox.clear()
            return
    raise AssertionError(f"subscription never matched {probe_topic}")


def started_link(
    links: LinkFactory, broker: EmbeddedBroker, subs: dict[str, Inbox], will: Will | None = None, **options: object
) -> PahoMqttLink:
    """Subscribed before start, so messages a broker delivers right after CONNACK (a persistent session's queue)
    find their handler; returns once every filter is granted (SUBACK)."""
    link = links.make(MqttConfig.from_url(broker.url, **{**FAST_RECONNECT, **options}), will=will)
    for topic_filter, inbox in subs.items():
        link.subscribe(topic_filter, 1, inbox)
    link.start()
    assert link.wait_connected(CONNECT_TIMEOUT_S)
    for topic_filter in subs:
        assert link.wait_subscribed(topic_filter, CONNECT_TIMEOUT_S)
    return link


# ---- raw MQTT 3.1.1 ----------------------------------------------------------------------------------------------


def frame(first_byte: int, body: bytes) -> bytes:
    header, remaining = bytearray([first_byte]), len(body)
    while True:
        remaining, digit = divmod(remaining, 128)
        header.append(digit | 0x80 if remaining else digit)
        if not remaining:
            return bytes(header) + body


def mqtt_str(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">H", len(raw)) + raw


def raw_connect(
    broker: EmbeddedBroker, client_id: str, keepalive: int, *, will: Will | None = None, level: int = 4
) -> tuple[socket.socket, bytes]:
    """A CONNECT by hand; returns the socket and the 4 bytes of CONNACK."""
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT_S)
    flags, payload = 0x02, mqtt_str(client_id)
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += mqtt_str(will.topic) + mqtt_str(will.payload)
    sock.sendall(frame(0x10, mqtt_str("MQTT") + bytes([level, flags]) + struct.pack(">H", keepalive) + payload))
    return sock, recv_exactly(sock, 4)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ---- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("faceattend/v1/edge/+/events", "faceattend/v1/edge/door-1/events", True),
        ("faceattend/v1/edge/+/events", "faceattend/v1/edge/door-1/status", False),
        ("faceattend/v1/edge/+/events", "faceattend/v1/edge/a/b/events", False),
        ("faceattend/v1/site/main/gallery/#", "faceattend/v1/site/main/gallery/blob/7", True),
        ("faceattend/v1/site/main/gallery/#", "faceattend/v1/site/main/gallery", True),
        ("faceattend/v1/site/main/gallery/#", "faceattend/v1/site/other/gallery/manifest", False),
        ("#", "$SYS/uptime", False),
        ("+/uptime", "$SYS/uptime", False),
        ("$SYS/#", "$SYS/uptime", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_qos1_publish_gets_its_puback(broker: EmbeddedBroker, mqtt_links: LinkFactory) -> None:
    link = mqtt_links(broker)
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    handles = [link.publish("faceattend/v1/edge/door-1/events", b"{}", qos=1) for _ in range(3)]
    assert all(h.wait(WAIT_S) for h in handles)


def test_wildcard_subscribers_receive_matching_topics_only(broker: EmbeddedBroker, mqtt_links: LinkFactory) -> None:
    events, gallery = Inbox(), Inbox()
    publisher = mqtt_links(broker)
    started_link(
        mqtt_links, broker, {"faceattend/v1/edge/+/events": events, "faceattend/v1/site/main/gallery/#": gallery}
    )

    sent = {
        "faceattend/v1/edge/door-1/events": b"e1",
        "faceattend/v1/edge/door-2/events": b"e2",
        "faceattend/v1/edge/door-1/status": b"not an event",
        "faceattend/v1/site/main/gallery/manifest": b"m",
        "faceattend/v1/site/main/gallery/blob/0": b"c0",
        "faceattend/v1/site/other/gallery/manifest": b"other site",
    }
    assert all(publisher.publish(topic, payload, qos=1).wait(WAIT_S) for topic, payload in sent.items())
    assert events.wait_for(2) and gallery.wait_for(2)
    time.sleep(0.2)  # nothing else may follow
    assert sorted((m.topic, m.payload) for m in events.messages) == [
        ("faceattend/v1/edge/door-1/events", b"e1"),
        ("faceattend/v1/edge/door-2/events", b"e2"),
    ]
    assert sorted((m.topic, m.payload) for m in gallery.messages) == [
        ("faceattend/v1/site/main/gallery/blob/0", b"c0"),
        ("faceattend/v1/site/main/gallery/manifest", b"m"),
    ]
    assert all(m.qos == 1 and not m.retain for m in events.messages + gallery.messages)


def test_retained_message_replayed_to_late_subscriber_and_cleared_by_empty_payload(
    broker: EmbeddedBroker, mqtt_links: LinkFactory
) -> None:
    topic = "faceattend/v1/site/main/gallery/manifest"
    publisher = mqtt_links(broker)
    assert publisher.publish(topic, b"v1", qos=1, retain=True).wait(WAIT_S)
    assert publisher.publish(topic, b"v2", qos=1, retain=True).wait(WAIT_S)

    late = Inbox()
    started_link(mqtt_links, broker, {"faceattend/v1/site/main/gallery/#": late})
    assert late.wait_for(1)
    [replayed] = late.messages
    assert (replayed.topic, replayed.payload, replayed.retain, replayed.qos) == (topic, b"v2", True, 1)

    # the clearing message itself reaches current subscribers (as a live, empty message), then nothing is stored
    assert publisher.publish(topic, b"", qos=1, retain=True).wait(WAIT_S)
    assert late.wait_for(2)
    assert (late.messages[1].payload, late.messages[1].retain) == (b"", False)

    later = Inbox()
    probe = "faceattend/v1/site/main/gallery/probe"
    started_link(mqtt_links, broker, {"faceattend/v1/site/main/gallery/#": later})
    barrier(publisher, later, probe)  # by now any replay would have come before the probe
    assert later.messages == []


def test_persistent_session_gets_qos1_messages_published_while_away(
    broker: EmbeddedBroker, mqtt_links: LinkFactory
) -> None:
    topic_filter, client_id = "faceattend/v1/edge/+/events", "consumer-1"
    publisher = mqtt_links(broker)
    inbox = Inbox()
    first = started_link(mqtt_links, broker, {topic_filter: inbox}, client_id=client_id, clean_session=False)
    first.stop()  # DISCONNECT: the broker keeps the session

    payloads = [f"event-{i}".encode() for i in range(10)]
    assert all(publisher.publish("faceattend/v1/edge/door-1/events", p, qos=1).wait(WAIT_S) for p in payloads)

    back = Inbox()
    started_link(mqtt_links, broker, {topic_filter: back}, client_id=client_id, clean_session=False)
    assert back.wait_for(len(payloads)), [m.payload for m in back.messages]
    assert [m.payload for m in back.messages[: len(payloads)]] == payloads  # in order
    assert all(m.qos == 1 and not m.retain for m in back.messages)  # live messages, not retained replays


def test_persistent_session_queue_is_bounded(mqtt_links: LinkFactory) -> None:
    with EmbeddedBroker(max_queued_messages=5) as broker:
        topic, client_id = "faceattend/v1/edge/door-1/events", "consumer-small"
        publisher = mqtt_links(broker)
        inbox = Inbox()
        first = started_link(mqtt_links, broker, {topic: inbox}, client_id=client_id, clean_session=False)
        first.stop()
        assert all(publisher.publish(topic, str(i).encode(), qos=1).wait(WAIT_S) for i in range(8))

        back = Inbox()
        second = started_link(mqtt_links, broker, {topic: back}, client_id=client_id, clean_session=False)
        assert back.wait_for(5)
        time.sleep(0.3)
        assert [m.payload for m in back.messages] == [b"0", b"1", b"2", b"3", b"4"]  # the newest were dropped
        for link in (publisher, second):
            link.stop()  # before the broker goes


def test_last_will_on_abrupt_drop_only(broker: EmbeddedBroker, mqtt_links: LinkFactory) -> None:
    status = Inbox()
    started_link(mqtt_links, broker, {"faceattend/v1/edge/+/status": status})

    # a clean stop sends DISCONNECT: the broker discards the will
    polite = mqtt_links(broker, will=Will("faceattend/v1/edge/polite/status", b"offline"))
    polite.stop()

    # an abrupt drop: paho's network thread stopped, then its socket closed under it, so no DISCONNECT goes out
    # (built outside the fixture, which would stop it again)
    will = Will("faceattend/v1/edge/door-1/status", b"offline", qos=1, retain=True)
    doomed = PahoMqttLink(MqttConfig.from_url(broker.url, **FAST_RECONNECT), will=will)
    doomed.start()
    assert doomed.wait_connected(CONNECT_TIMEOUT_S)
    client = doomed._client
    client.loop_stop()
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()

    assert status.wait_for(1)
    time.sleep(0.3)
    assert [(m.topic, m.payload, m.retain) for m in status.messages] == [
        ("faceattend/v1/edge/door-1/status", b"offline", False)
    ]
    late = Inbox()  # the will was retained
    started_link(mqtt_links, broker, {"faceattend/v1/edge/door-1/status": late})
    assert late.wait_for(1)
    assert (late.messages[0].payload, late.messages[0].retain) == (b"offline", True)


def test_pingreq_and_keepalive_timeout_sends_the_will(broker: EmbeddedBroker, mqtt_links: LinkFactory) -> None:
    status = Inbox()
    started_link(mqtt_links, broker, {"faceattend/v1/edge/+/status": status})

    will = Will("faceattend/v1/edge/silent/status", b"offline", qos=1, retain=False)
    sock, connack = raw_connect(broker, "silent", keepalive=1, will=will)
    with sock:
        assert connack == b"\x20\x02\x00\x00"
        sock.sendall(b"\xc0\x00")  # PINGREQ
        assert recv_exactly(sock, 2) == b"\xd0\x00"  # PINGRESP
        started = time.monotonic()
        assert closed_by_peer(sock, within=5.0)  # dropped after 1.5 x keep-alive of silence
        assert 1.0 <= time.monotonic() - started < 3.0
    assert status.wait_for(1)
    assert status.messages[0].topic == "faceattend/v1/edge/silent/status"


def test_protocol_checks(mqtt_links: LinkFactory) -> None:
    with EmbeddedBroker(max_packet_size=64 * KIB) as broker:
        sock, connack = raw_connect(broker, "mqtt5-client", keepalive=30, level=5)
        with sock:
            assert connack == b"\x20\x02\x00\x01"  # unacceptable protocol version
            assert closed_by_peer(sock, within=2.0)

        sock, connack = raw_connect(broker, "big-talker", keepalive=30)
        with sock:
            assert connack == b"\x20\x02\x00\x00"
            sock.sendall(frame(0x30, mqtt_str("t") + b"x" * (64 * KIB)))  # QoS 0 PUBLISH over the limit
            assert closed_by_peer(sock, within=2.0)

        # the broker is still fine
        link = mqtt_links(broker)
        assert link.publish("t", b"x" * (60 * KIB), qos=1).wait(WAIT_S)
        link.stop()


def test_gallery_sized_payloads(broker: EmbeddedBroker, mqtt_links: LinkFactory) -> None:
    publisher = mqtt_links(broker)
    sizes = {
        "faceattend/v1/site/main/gallery/manifest": MAX_MANIFEST_BYTES,
        "faceattend/v1/site/main/gallery/blob/0": DEFAULT_CHUNK_SIZE,
        "faceattend/v1/site/main/gallery/blob/1": MAX_CHUNK_SIZE,
    }
    payloads = {topic: bytes(range(256)) * (size // 256) for topic, size in sizes.items()}
    assert all(publisher.publish(t, p, qos=1, retain=True).wait(WAIT_S) for t, p in payloads.items())

    inbox = Inbox()
    started_link(mqtt_links, broker, {"faceattend/v1/site/main/gallery/#": inbox})
    assert inbox.wait_for(len(payloads))
    assert {m.topic: m.payload for m in inbox.messages} == payloads


def test_thousand_qos1_messages_from_five_publishers(broker: EmbeddedBroker, mqtt_links: LinkFactory) -> None:
    per_publisher, publishers = 200, 5
    inbox = Inbox()
    started_link(mqtt_links, broker, {"faceattend/v1/edge/+/events": inbox})
    links = [mqtt_links(broker) for _ in range(publishers)]
    failures: list[str] = []

    def publish_all(k: int, link: PahoMqttLink) -> None:
        handles = [link.publish(f"faceattend/v1/edge/door-{k}/events", f"{i}".encode()) for i in range(per_publisher)]
        if not all(h.wait(30) for h in handles):
            failures.append(f"publisher {k}: not every PUBACK came")

    started = time.monotonic()
    threads = [threading.Thread(target=publish_all, args=(k, link)) for k, link in enumerate(links)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inbox.wait_for(publishers * per_publisher, 30), len(inbox.messages)
    elapsed = time.monotonic() - started
    rate = len(inbox.messages) / elapsed
    print(f"\nembedded broker: {len(inbox.messages)} QoS 1 messages in {elapsed:.2f}s = {rate:.0f}/s")
    assert failures == []
    by_device: dict[str, list[int]] = {}
    for m in inbox.messages:
        by_device.setdefault(m.topic, []).append(int(m.payload))
    # no loss, no duplicate (nothing was resent) and each publisher's order kept
    assert by_device == {f"faceattend/v1/edge/door-{k}/events": list(range(per_publisher)) for k in range(publishers)}


def test_stop_is_prompt_and_frees_the_port(mqtt_links: LinkFactory) -> None:
    broker = EmbeddedBroker()
    broker.start()
    port = broker.port
    links = [mqtt_links(broker) for _ in range(3)]
    with pytest.raises(EmbeddedBrokerError):
        EmbeddedBroker(port=port).start()  # in use
    with pytest.raises(EmbeddedBrokerError):
        broker.start()  # started once

    started = time.monotonic()
    broker.stop()
    assert time.monotonic() - started < 1.0
    deadline = time.monotonic() + WAIT_S
    while any(link.is_connected() for link in links) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(link.is_connected() for link in links)
    broker.stop()  # idempotent

    with EmbeddedBroker(port=port) as again:  # the port is free again
        assert again.port == port
        for link in links:
            link.stop()  # before they reconnect to the new broker and outlive it
