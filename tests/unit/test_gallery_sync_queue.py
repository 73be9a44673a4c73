"""GallerySync against a scripted MqttLink: bounded queue, drops healed by a resubscribe, error acks sent once."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from edge_agent.gallery.index import GalleryIndex, IndexHolder
from edge_agent.gallery.sync import GallerySync
from models.contract import limits, topics
from models.contract.gallery import Gallery, GalleryPerson, build_publication, signed_bytes
from models.contract.mqtt_link import Handler, InboundMessage, MqttLink, PublishHandle
from models.contract.signing import Signer
from models.contract.status import GalleryAck
from models.errors import ConfigError

SITE = "hq"
DEVICE = "door-1"
FP = "dlib_resnet_v1-unit000000000000"


class ScriptedLink(MqttLink):
    """Retained messages held here; every subscribe replays them from a thread of its own, like a broker."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, bytes]] = []
        self.subscribes = 0
        self.handler: Handler | None = None

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def unsubscribe(self, topic_filter: str) -> None: ...
    def is_connected(self) -> bool:
        return True

    def wait_connected(self, timeout: float | None = None) -> bool:
        return True

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None: ...
    def ack(self, message: InboundMessage) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        self.published.append((topic, payload))
        return PublishHandle(len(self.published), qos)

    def subscribe(self, topic_filter: str, qos: int, handler: Handler) -> None:
        self.handler = handler
        self.subscribes += 1
        replay = sorted(self.retained.items())

        def run() -> None:
            for topic, payload in replay:
                handler(InboundMessage(topic, payload, 1, True))
                time.sleep(0.05)  # paced like a network: the worker keeps up

        threading.Thread(target=run, daemon=True).start()

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        return self.handler is not None

    def deliver(self, topic: str, payload: bytes) -> None:
        assert self.handler is not None
        self.handler(InboundMessage(topic, payload, 1, False))

    def acks(self) -> list[GalleryAck]:
        return [GalleryAck.from_json(p) for t, p in self.published if t == topics.gallery_ack(DEVICE)]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def gallery(version: int, people: int, per_person: int = 5) -> Gallery:
    rng = np.random.default_rng(version)
    emb = rng.standard_normal((people * per_person, 128)).astype(np.float32)
    persons = tuple(GalleryPerson(f"p{i}", f"P {i}") for i in range(people))
    return Gallery(SITE, version, FP, "euclidean", "float32", emb, np.repeat(np.arange(people), per_person), persons)


def messages(g: Gallery, signer: Signer, chunk_size: int) -> list[tuple[str, bytes]]:
    """Chunks first, then the manifest: the publisher's order."""
    manifest, chunks = build_publication(g, signer, chunk_size)
    return [(topics.gallery_blob(SITE, i), c) for i, c in enumerate(chunks)] + [
        (topics.gallery_manifest(SITE), manifest.to_json())
    ]


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


def test_messages_dropped_by_a_full_queue_come_back_through_a_resubscribe(tmp_path, signer):
    link = ScriptedLink()
    entered, release = threading.Event(), threading.Event()
    applied: list[int] = []

    def on_applied(index: GalleryIndex) -> None:
        applied.append(index.version)
        if index.version == 1:  # hold the worker, as a long index build would
            entered.set()
            release.wait(10.0)

    smallest = max(limits.MAX_CHUNK_SIZE, limits.MAX_MANIFEST_BYTES) + 256
    holder = IndexHolder()
    sync = GallerySync(
        link,
        SITE,
        DEVICE,
        signer.verifier,
        FP,
        holder,
        tmp_path,
        on_applied,
        queue_bytes=smallest,
        resync_interval_s=0.2,
    )
    sync.start()
    try:
        for topic, payload in messages(gallery(1, 3), signer, 1024):
            link.deliver(topic, payload)
        assert entered.wait(10.0)

        # while the worker is busy: v2 in three 400 KiB chunks, of which the queue holds two
        v2 = messages(gallery(2, 470), signer, 400 * 1024)
        assert len(v2) == 4
        link.retained = dict(v2)
        for topic, payload in v2:
            link.deliver(topic, payload)
        assert sync.status().dropped_messages == 1
        release.set()

        assert wait_until(lambda: applied == [1, 2])
        assert link.subscribes == 2  # start() and one resubscribe, whose replay completed v2
        assert [(a.version, a.status) for a in link.acks()] == [(1, "ok"), (2, "ok")]
        status = sync.status()
        assert (status.version, status.templates, status.dropped_messages) == (2, 2350, 1)
    finally:
        release.set()
        sync.stop(timeout=10.0)


def test_oversized_messages_are_dropped_and_error_acks_are_not_repeated(tmp_path, signer):
    link = ScriptedLink()
    holder = IndexHolder()
    sync = GallerySync(link, SITE, DEVICE, signer.verifier, FP, holder, tmp_path, resync_interval_s=0.2)
    sync.start()
    try:
        link.deliver(topics.gallery_blob(SITE, 0), bytes(limits.MAX_CHUNK_SIZE + 1))
        assert sync.status().dropped_messages == 1

        attacker = Signer.generate()
        manifest, _ = build_publication(gallery(7, 1), attacker)
        draft = dataclasses.replace(manifest, key_id=signer.key_id, signature="")
        forged = dataclasses.replace(draft, signature=attacker.sign_b64(signed_bytes(draft.to_object())))
        for _ in range(3):  # a retained forgery replayed at every reconnect
            link.deliver(topics.gallery_manifest(SITE), forged.to_json())
        link.deliver(topics.gallery_manifest(SITE), b"{not json")
        assert wait_until(lambda: (sync.status().last_error or "").startswith("PayloadError"))
        acks = link.acks()
        assert [(a.version, a.status) for a in acks] == [(7, "error")]  # once; the unreadable one names no version
        assert acks[0].error.startswith("SignatureError")
        assert holder.current is None and link.subscribes == 1  # an oversized message is no reason to resync
    finally:
        sync.stop(timeout=10.0)


def test_queue_must_hold_the_largest_message(tmp_path, signer):
    with pytest.raises(ConfigError, match="queue_bytes"):
        GallerySync(ScriptedLink(), SITE, DEVICE, signer.verifier, FP, IndexHolder(), tmp_path, queue_bytes=1024)
