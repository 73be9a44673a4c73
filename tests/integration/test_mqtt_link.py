"""PahoMqttLink against a real Mosquitto (tests/integration/conftest.py): PUBACK waits, retained gallery
publication assembled end to end, last will on an ungraceful death, subscriptions and publishes across a broker
restart, manual acknowledgement (what stays unacknowledged comes again), the MQTT 5 receive maximum, shared
subscriptions."""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from waiting import wait_until

from models.contract import topics
from models.contract.assembler import GalleryAssembler
from models.contract.gallery import Gallery, GalleryPerson, build_publication
from models.contract.mqtt_link import InboundMessage, MqttConfig, PahoMqttLink, Will, shared_filter
from models.contract.signing import Signer
from models.contract.status import EdgeStatus
from models.contract.timestamps import utc_now
from models.errors import MqttError

FP = "dlib_resnet_v1-0123456789abcdef"
CONNECT_TIMEOUT_S = 10.0
# paho retries every 1, 2, 2, ... s with these settings: a restarted broker is found again within ~2 s
FAST_RECONNECT = {"reconnect_min_delay": 1, "reconnect_max_delay": 2, "keepalive": 5}


class Inbox:
    """A handler that queues what it receives, with a blocking `get`."""

    def __init__(self) -> None:
        self.q: queue.Queue[InboundMessage] = queue.Queue()

    def __call__(self, msg: InboundMessage) -> None:
        self.q.put(msg)

    def get(self, timeout: float = 10.0) -> InboundMessage:
        return self.q.get(timeout=timeout)

    def drain(self, quiet_s: float = 0.3) -> list[InboundMessage]:
        out = []
        while True:
            try:
                out.append(self.q.get(timeout=quiet_s))
            except queue.Empty:
                return out


@pytest.fixture
def links() -> Iterator[list[PahoMqttLink]]:
    """Links started by a test, all stopped at its end."""
    made: list[PahoMqttLink] = []
    yield made
    for link in made:
        link.stop()


def start_link(made: list[PahoMqttLink], broker: Any, *, will: Will | None = None, **options):
    link = PahoMqttLink(MqttConfig.from_url(broker.url, **{**FAST_RECONNECT, **options}), will=will)
    made.append(link)
    link.start()
    return link


def subscribed_link(made: list[PahoMqttLink], broker: Any, inbox: Inbox, **options) -> PahoMqttLink:
    """A link subscribed to every edge's events before it connects (what its session holds arrives at once)."""
    link = PahoMqttLink(MqttConfig.from_url(broker.url, **{**FAST_RECONNECT, **options}))
    made.append(link)
    link.subscribe(topics.ALL_EDGE_EVENTS, 1, inbox)
    link.start()
    return link


def connected(link: PahoMqttLink) -> PahoMqttLink:
    assert link.wait_connected(CONNECT_TIMEOUT_S), "link did not connect"
    return link


def test_qos1_publish_waits_for_puback_and_is_received(mosquitto, links):
    sub = connected(start_link(links, mosquitto))
    inbox = Inbox()
    sub.subscribe(topics.ALL_EDGE_EVENTS, 1, inbox)
    assert sub.wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    pub = connected(start_link(links, mosquitto))
    handle = pub.publish(topics.edge_events("door-1"), b"hello", qos=1)
    assert handle.wait(5.0) and handle.acknowledged and not handle.rejected
    msg = inbox.get()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == (topics.edge_events("door-1"), b"hello", 1, False)


def test_wait_subscribed_follows_the_suback(mosquitto, links):
    link = start_link(links, mosquitto)
    with pytest.raises(MqttError, match="never subscribed"):
        link.wait_subscribed(topics.ALL_EDGE_EVENTS, 0.0)
    mosquitto.stop()
    link.subscribe(topics.ALL_EDGE_EVENTS, 1, Inbox())
    assert not link.wait_subscribed(topics.ALL_EDGE_EVENTS, 0.5)  # no broker, no SUBACK
    mosquitto.start()
    assert link.wait_subscribed(topics.ALL_EDGE_EVENTS, CONNECT_TIMEOUT_S)  # made by on_connect
    link.subscribe(topics.ALL_EDGE_STATUS, 1, Inbox())  # made at once on the live connection
    assert link.wait_subscribed(topics.ALL_EDGE_STATUS, 5.0)
    link.unsubscribe(topics.ALL_EDGE_STATUS)
    with pytest.raises(MqttError, match="never subscribed"):
        link.wait_subscribed(topics.ALL_EDGE_STATUS, 0.0)


def test_many_publishes_beyond_the_inflight_window(mosquitto, links):
    pub = connected(start_link(links, mosquitto, max_inflight=4))
    handles = [pub.publish(topics.edge_events("door-1"), str(i).encode()) for i in range(200)]
    assert all(h.wait(10.0) for h in handles)


def test_retained_gallery_assembled_by_another_link(mosquitto, links):
    signer = Signer.generate()
    rng = np.random.default_rng(1)
    people = tuple(GalleryPerson(f"p-{i:04d}", f"Person {i}") for i in range(50))
    gallery = Gallery("hq", 1, FP, "euclidean", "float32", rng.normal(size=(200, 128)), np.arange(200) % 50, people)
    manifest, chunks = build_publication(gallery, signer, chunk_size=8 * 1024)
    assert manifest.chunk_count > 10

    server = connected(start_link(links, mosquitto))
    handles = [server.publish(topics.gallery_blob("hq", i), c, qos=1, retain=True) for i, c in enumerate(chunks)]
    handles.append(server.publish(topics.gallery_manifest("hq"), manifest.to_json(), qos=1, retain=True))
    assert all(h.wait(10.0) for h in handles)

    # an edge subscribing afterwards gets everything from the retained store
    done: queue.Queue[Gallery] = queue.Queue()
    errors: list[Exception] = []
    assembler = GalleryAssembler(signer.verifier, FP, "hq")

    def on_gallery_message(msg: InboundMessage) -> None:
        assert msg.retain
        try:
            result = assembler.feed(msg.topic, msg.payload)
        except Exception as exc:  # the test wants to see it, not the link's log
            errors.append(exc)
            return
        if result is not None:
            done.put(result)

    edge = connected(start_link(links, mosquitto))
    edge.subscribe(topics.site_gallery_filter("hq"), 1, on_gallery_message)
    got = done.get(timeout=10.0)
    assert not errors
    np.testing.assert_array_equal(got.embeddings, gallery.embeddings)
    assert got.people == people and got.version == 1


def test_one_mib_chunks_pass_the_broker(mosquitto, links):
    chunk = bytes(range(256)) * 4096  # the largest chunk the contract allows
    sub = connected(start_link(links, mosquitto))
    inbox = Inbox()
    sub.subscribe(topics.site_gallery_filter("big"), 1, inbox)
    assert sub.wait_subscribed(topics.site_gallery_filter("big"), 5.0)
    pub = connected(start_link(links, mosquitto))
    assert pub.publish(topics.gallery_blob("big", 0), chunk, qos=1, retain=True).wait(10.0)
    assert inbox.get().payload == chunk


_DYING_EDGE = textwrap.dedent(
    """
    import sys, time
    from models.contract.mqtt_link import MqttConfig, PahoMqttLink, Will
    url, topic, will_payload, online = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])
    link = PahoMqttLink(MqttConfig.from_url(url, client_id="dying-edge", keepalive=5), will=Will(topic, will_payload))
    link.start()
    assert link.wait_connected(10)
    assert link.publish(topic, online, qos=1, retain=True).wait(10)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def edge_status(state: str) -> EdgeStatus:
    return EdgeStatus(
        state=state,
        device_id="door-1",
        site="hq",
        agent_version="0.1.0",
        gallery_version=None,
        fingerprint=FP,
        ts=utc_now(),
    )


def test_last_will_fires_offline_when_the_edge_is_killed(mosquitto, links):
    topic = topics.edge_status("door-1")
    watcher = connected(start_link(links, mosquitto))
    inbox = Inbox()
    watcher.subscribe(topics.ALL_EDGE_STATUS, 1, inbox)
    assert watcher.wait_subscribed(topics.ALL_EDGE_STATUS, 5.0)
    args = [topic, edge_status("offline").to_json().hex(), edge_status("online").to_json().hex()]
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING_EDGE, mosquitto.url, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert EdgeStatus.from_json(inbox.get().payload).state == "online"
        proc.kill()  # SIGKILL: no DISCONNECT, the socket just closes
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    msg = inbox.get(timeout=10.0)
    assert EdgeStatus.from_json(msg.payload).state == "offline"
    # and it was retained: a late subscriber sees the edge offline
    late = connected(start_link(links, mosquitto))
    late_inbox = Inbox()
    late.subscribe(topic, 1, late_inbox)
    retained = late_inbox.get()
    assert retained.retain and EdgeStatus.from_json(retained.payload).state == "offline"


def test_clean_stop_discards_the_will(mosquitto, links):
    topic = topics.edge_status("door-2")
    watcher = connected(start_link(links, mosquitto))
    inbox = Inbox()
    watcher.subscribe(topic, 1, inbox)
    assert watcher.wait_subscribed(topic, 5.0)
    edge = connected(start_link(links, mosquitto, will=Will(topic, edge_status("offline").to_json())))
    assert edge.publish(topic, edge_status("stopped").to_json(), retain=True).wait(5.0)
    edge.stop()
    states = [EdgeStatus.from_json(m.payload).state for m in inbox.drain(quiet_s=1.0)]
    assert states == ["stopped"]
    with pytest.raises(MqttError, match="stopped"):
        edge.publish(topic, b"x")


def test_subscriptions_survive_a_broker_restart(mosquitto, links):
    # clean session: the broker forgets the subscription when it goes; only our on_connect re-subscribes
    sub = connected(start_link(links, mosquitto))
    changes: queue.Queue[bool] = queue.Queue()
    sub.add_connection_listener(changes.put)
    inbox = Inbox()
    sub.subscribe(topics.ALL_EDGE_EVENTS, 1, inbox)
    pub = connected(start_link(links, mosquitto))
    assert sub.wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    assert pub.publish(topics.edge_events("door-1"), b"before").wait(5.0)
    assert inbox.get().payload == b"before"

    mosquitto.stop()
    assert wait_until(lambda: not sub.is_connected() and not pub.is_connected())
    assert changes.get(timeout=5.0) is False
    assert not sub.wait_subscribed(topics.ALL_EDGE_EVENTS, 0.0)  # a lost connection loses the grant
    mosquitto.start()
    assert connected(sub) and connected(pub)
    assert changes.get(timeout=5.0) is True
    assert sub.wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)  # the re-SUBSCRIBE made by on_connect was granted
    assert pub.publish(topics.edge_events("door-1"), b"after").wait(5.0)
    assert inbox.get().payload == b"after"


def test_publish_while_the_broker_is_down_is_delivered_after_it_returns(mosquitto, links):
    sub_id = f"consumer-{uuid.uuid4().hex[:8]}"
    sub = connected(start_link(links, mosquitto, client_id=sub_id, clean_session=False))
    inbox = Inbox()
    sub.subscribe(topics.ALL_EDGE_EVENTS, 1, inbox)
    pub = connected(start_link(links, mosquitto))
    assert sub.wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)

    mosquitto.stop()
    assert wait_until(lambda: not pub.is_connected())
    handles = [pub.publish(topics.edge_events("door-1"), f"offline-{i}".encode()) for i in range(5)]
    # queued in paho's memory, not acknowledged: the outbox must keep these until the handles say so
    assert not any(h.wait(0.5) for h in handles)
    mosquitto.start()
    assert all(h.wait(15.0) for h in handles)
    received = [inbox.get().payload for _ in range(5)]
    assert sorted(received) == sorted(f"offline-{i}".encode() for i in range(5))


def test_persistent_session_gets_what_was_published_while_it_was_away(mosquitto, links):
    client_id = f"server-{uuid.uuid4().hex[:8]}"
    first = connected(start_link(links, mosquitto, client_id=client_id, clean_session=False))
    first.subscribe(topics.ALL_EDGE_EVENTS, 1, Inbox())
    assert first.wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    first.stop()
    pub = connected(start_link(links, mosquitto))
    assert pub.publish(topics.edge_events("door-3"), b"while away").wait(5.0)
    inbox = Inbox()
    again = PahoMqttLink(MqttConfig.from_url(mosquitto.url, client_id=client_id, clean_session=False, **FAST_RECONNECT))
    links.append(again)
    again.subscribe(topics.ALL_EDGE_EVENTS, 1, inbox)  # before start: made in on_connect
    again.start()
    assert inbox.get().payload == b"while away"


def test_mqtt5_publish_and_subscribe(mosquitto, links):
    sub = connected(start_link(links, mosquitto, protocol="5"))
    inbox = Inbox()
    sub.subscribe(topics.ALL_GALLERY_ACKS, 1, inbox)
    assert sub.wait_subscribed(topics.ALL_GALLERY_ACKS, 5.0)
    pub = connected(start_link(links, mosquitto, protocol="5"))
    handle = pub.publish(topics.gallery_ack("door-1"), b"ack", qos=1)
    assert handle.wait(5.0) and handle.reason_code == 0
    assert inbox.get().payload == b"ack"


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_manual_ack_keeps_a_message_with_the_broker_until_it_is_acknowledged(mosquitto, links, protocol):
    """`manual_ack`: unacknowledged messages stay in the session and come again after a reconnect; acknowledged
    ones do not; an ack that belongs to an earlier connection is not sent on the new one."""
    client_id = f"manual-{uuid.uuid4().hex[:8]}"
    options = {"client_id": client_id, "clean_session": False, "manual_ack": True, "protocol": protocol}
    inbox = Inbox()
    first = subscribed_link(links, mosquitto, inbox, **options)
    assert connected(first).wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    pub = connected(start_link(links, mosquitto))
    for i in range(6):
        assert pub.publish(topics.edge_events("door-1"), f"m{i}".encode()).wait(5.0)
    got = [inbox.get() for _ in range(6)]
    for msg in got[:3]:
        first.ack(msg)  # acknowledged: stored, say
    assert wait_until(lambda: "Received PUBACK from " + client_id in mosquitto.log_text())
    first.stop()  # the other three were never acknowledged
    again_inbox = Inbox()
    again = subscribed_link(links, mosquitto, again_inbox, **options)
    redelivered = [again_inbox.get() for _ in range(3)]
    assert sorted(m.payload for m in redelivered) == [b"m3", b"m4", b"m5"]
    assert again_inbox.drain() == []
    again.ack(got[3])  # from the first link's connection: not sent (the broker counts m3 as its own on this one)
    for msg in redelivered:
        again.ack(msg)
    again.stop()
    final = Inbox()
    last = subscribed_link(links, mosquitto, final, **options)
    assert connected(last).wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    assert final.drain(0.5) == []  # everything acknowledged: nothing comes again


def test_manual_ack_on_mqtt5_bounds_what_the_broker_has_out_by_the_receive_maximum(mosquitto, links):
    inbox = Inbox()
    sub = subscribed_link(links, mosquitto, inbox, manual_ack=True, protocol="5", receive_maximum=5)
    assert connected(sub).wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    pub = connected(start_link(links, mosquitto))
    for i in range(12):
        assert pub.publish(topics.edge_events("door-1"), f"m{i}".encode()).wait(5.0)
    window = inbox.drain(0.5)
    assert len(window) == 5  # no more until some are acknowledged
    for msg in window:
        sub.ack(msg)
    got = len(window)
    while more := inbox.drain(0.5):
        got += len(more)
        for msg in more:
            sub.ack(msg)
    assert got == 12


def test_a_shared_subscription_hands_each_message_to_one_member(mosquitto, links):
    shared = shared_filter("ingest", topics.ALL_EDGE_EVENTS)
    inboxes = [Inbox(), Inbox()]
    for inbox in inboxes:
        member = connected(start_link(links, mosquitto, protocol="5"))
        member.subscribe(shared, 1, inbox)
        assert member.wait_subscribed(shared, 5.0)
    pub = connected(start_link(links, mosquitto))
    for i in range(10):
        assert pub.publish(topics.edge_events(f"door-{i}"), f"m{i}".encode()).wait(5.0)
    got = [inbox.drain() for inbox in inboxes]
    assert sorted(m.payload for g in got for m in g) == sorted(f"m{i}".encode() for i in range(10))
    assert all(got)  # both members take a share; the handler sees the real topic
    assert all(m.topic.startswith(f"{topics.ROOT}/edge/door-") for g in got for m in g)


def test_a_failing_handler_does_not_stop_the_link(mosquitto, links, caplog):
    sub = connected(start_link(links, mosquitto))
    inbox = Inbox()
    calls = threading.Event()

    def broken(msg: InboundMessage) -> None:
        calls.set()
        raise RuntimeError("handler bug")

    sub.subscribe(topics.ALL_EDGE_STATUS, 1, broken)
    sub.subscribe(topics.ALL_EDGE_EVENTS, 1, inbox)
    assert sub.wait_subscribed(topics.ALL_EDGE_STATUS, 5.0)
    assert sub.wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    pub = connected(start_link(links, mosquitto))
    assert pub.publish(topics.edge_status("door-1"), b"boom").wait(5.0)
    assert calls.wait(5.0)
    assert pub.publish(topics.edge_events("door-1"), b"still alive").wait(5.0)
    assert inbox.get().payload == b"still alive"
    assert sub.is_connected()
    assert "handler bug" in caplog.text or "failed" in caplog.text


def test_start_before_the_broker_exists(mosquitto, links):
    mosquitto.stop()
    link = start_link(links, mosquitto)
    early = link.publish(topics.edge_events("door-1"), b"early")
    assert not link.wait_connected(1.5)
    mosquitto.start()
    assert connected(link)
    assert early.wait(10.0)


def test_qos0_while_disconnected_fails_at_once(mosquitto, links):
    link = connected(start_link(links, mosquitto))
    mosquitto.stop()
    assert wait_until(lambda: not link.is_connected())
    handle = link.publish(topics.edge_events("door-1"), b"lost", qos=0)
    assert handle.wait(0.1) is False and handle._done.is_set()


def test_publishes_racing_a_broker_crash_are_resent(mosquitto, links):
    # SIGKILL: the publisher learns of the loss only when its socket fails, so some of these are written into a
    # dead connection; paho keeps each until a PUBACK and resends it (dup flag) after reconnecting
    pub = connected(start_link(links, mosquitto))
    mosquitto.kill()
    handles = [pub.publish(topics.edge_events("door-1"), f"racing-{i}".encode()) for i in range(20)]
    mosquitto.start()
    assert all(h.wait(15.0) for h in handles)
    sub = connected(start_link(links, mosquitto))
    inbox = Inbox()
    sub.subscribe(topics.ALL_EDGE_EVENTS, 1, inbox)
    assert sub.wait_subscribed(topics.ALL_EDGE_EVENTS, 5.0)
    assert pub.publish(topics.edge_events("door-1"), b"after").wait(5.0)
    assert inbox.get().payload == b"after"


def test_paho_stop_race_line_is_dropped_but_other_paho_errors_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    paho_log = logging.getLogger("models.contract.mqtt_link.paho")
    with caplog.at_level(logging.ERROR, logger=paho_log.name):
        paho_log.error("Client is not connected. Socket: None). Last known Connection State: MQTT_CS_DISCONNECTED")
        paho_log.error("failed to receive on socket: [Errno 104] Connection reset by peer")
    assert [r.getMessage()[:25] for r in caplog.records] == ["failed to receive on sock"]
