"""GallerySync against a scripted MqttLink: bounded queue, drops healed by a resubscribe, error acks sent once."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np
import paho.mqtt.client as mqtt
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
    """Retained messages held here; a subscribe replays the retained messages its filter matches from a thread of
    its own, like a broker (`pace_s` apart: a network the worker keeps up with, or 0 for a burst)."""

    def __init__(self, pace_s: float = 0.05) -> None:
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, bytes]] = []
        self.subscribes: list[str] = []
        self.handlers: dict[str, Handler] = {}
        self.pace_s = pace_s
        self._lock = threading.Lock()

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self.handlers.pop(topic_filter, None)

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
        with self._lock:
            self.handlers[topic_filter] = handler
            self.subscribes.append(topic_filter)
        replay = sorted((t, p) for t, p in self.retained.items() if mqtt.topic_matches_sub(topic_filter, t))

        def run() -> None:
            for topic, payload in replay:
                handler(InboundMessage(topic, payload, 1, True))
                if self.pace_s:
                    time.sleep(self.pace_s)

        threading.Thread(target=run, daemon=True).start()

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        return topic_filter in self.handlers

    def subscribed(self) -> set[str]:
        with self._lock:
            return set(self.handlers)

    def deliver(self, topic: str, payload: bytes) -> None:
        """A live message: to every subscription it matches, as a broker does."""
        with self._lock:
            handlers = [h for f, h in self.handlers.items() if mqtt.topic_matches_sub(f, topic)]
        for handler in handlers:
            handler(InboundMessage(topic, payload, 1, False))

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


SMALLEST_QUEUE = max(limits.MAX_CHUNK_SIZE, limits.MAX_MANIFEST_BYTES) + 256


def small_queue_sync(
    link: MqttLink, signer: Signer, store_dir, on_applied: Callable[[GalleryIndex], None], **options: float
) -> GallerySync:
    """An edge whose queue holds the largest message and little more."""
    return GallerySync(
        link,
        SITE,
        DEVICE,
        signer.verifier,
        FP,
        IndexHolder(),
        store_dir,
        on_applied,
        queue_bytes=SMALLEST_QUEUE,
        **options,
    )


def test_chunks_a_full_queue_dropped_are_asked_for_again_until_the_gallery_completes(tmp_path, signer):
    """The broker bursts a 13-chunk publication at an edge whose queue holds two chunks: most are dropped on the
    way in, and the edge asks for exactly the missing ones again until the gallery is complete."""
    link = ScriptedLink(pace_s=0.0)
    applied: list[int] = []
    sync = small_queue_sync(link, signer, tmp_path, lambda index: applied.append(index.version), chunk_retry_s=0.2)
    v1 = messages(gallery(1, 1900), signer, 400 * 1024)
    assert len(v1) == 14  # 13 chunks and the manifest
    link.retained = dict(v1)
    sync.start()
    try:
        assert wait_until(lambda: applied == [1], timeout=30.0)
        status = sync.status()
        assert status.dropped_messages > 0 and status.chunk_requests >= 1, status
        assert (status.version, status.templates, status.pending_version, status.missing_chunks) == (1, 9500, None, 0)
        assert [(a.version, a.status) for a in link.acks()] == [(1, "ok")]
        # in step: only the manifest is subscribed to, the chunks are not downloaded at every reconnect
        assert wait_until(lambda: link.subscribed() == {topics.gallery_manifest(SITE)})
        # all chunks once, then the missing ones one by one, never the whole publication again
        asked = [f for f in link.subscribes if f != topics.gallery_manifest(SITE)]
        assert asked[0] == topics.site_gallery_chunks(SITE) and len(asked) > 1
        assert topics.site_gallery_chunks(SITE) not in asked[1:]
    finally:
        sync.stop(timeout=10.0)


def test_a_manifest_dropped_while_the_worker_was_busy_comes_back_through_a_resubscribe(tmp_path, signer):
    link = ScriptedLink()
    entered, release = threading.Event(), threading.Event()
    applied: list[int] = []

    def on_applied(index: GalleryIndex) -> None:
        applied.append(index.version)
        if index.version == 1:  # hold the worker, as a long save would
            entered.set()
            release.wait(10.0)

    sync = small_queue_sync(link, signer, tmp_path, on_applied, resync_interval_s=0.2)
    sync.start()
    try:
        v1 = messages(gallery(1, 3), signer, 1024)
        link.retained = dict(v1)
        link.deliver(*v1[-1])
        assert entered.wait(10.0)

        # while the worker is busy (the chunk subscription still held): v2's three 400 KiB chunks, live; the queue
        # holds two, and a stale chunk of another publication fills it up, so the third and the manifest after
        # it are dropped
        v2 = messages(gallery(2, 470), signer, 400 * 1024)
        assert len(v2) == 4
        link.retained = dict(v2)
        queued = sum(len(t) + len(p) + 256 for t, p in v2[:2])
        stale = topics.gallery_blob(SITE, 9)
        for topic, payload in [*v2[:2], (stale, bytes(SMALLEST_QUEUE - queued - len(stale) - 256 - 100)), *v2[2:]]:
            link.deliver(topic, payload)
        assert sync.status().dropped_messages == 2
        release.set()

        assert wait_until(lambda: applied == [1, 2])
        assert link.subscribes.count(topics.gallery_manifest(SITE)) == 2  # start() and the resubscribe
        assert [(a.version, a.status) for a in link.acks()] == [(1, "ok"), (2, "ok")]
        status = sync.status()
        assert (status.version, status.templates, status.dropped_messages) == (2, 2350, 2)
    finally:
        release.set()
        sync.stop(timeout=10.0)


def test_an_older_release_is_refused_out_loud_once(tmp_path, signer):
    link = ScriptedLink()
    sync = GallerySync(link, SITE, DEVICE, signer.verifier, FP, IndexHolder(), tmp_path)
    newer = messages(dataclasses.replace(gallery(3, 2), epoch=2_000), signer, 4096)
    older = messages(dataclasses.replace(gallery(9, 2), epoch=1_000), signer, 4096)  # higher version, older epoch
    link.retained = dict(newer)
    sync.start()
    try:
        link.deliver(*newer[-1])
        assert wait_until(lambda: sync.status().version == 3)
        for _ in range(3):  # a retained replay at every reconnect
            link.deliver(*older[-1])
        assert wait_until(lambda: (sync.status().last_error or "").startswith("StaleGalleryError"))
        acks = [(a.version, a.epoch, a.status) for a in link.acks()]
        assert acks == [(3, 2_000, "ok"), (9, 1_000, "error")]
        assert "older than v3 (epoch 2000)" in link.acks()[-1].error
        assert sync.status().version == 3 and sync.status().epoch == 2_000
    finally:
        sync.stop(timeout=10.0)


def test_oversized_messages_are_dropped_and_error_acks_are_not_repeated(tmp_path, signer):
    link = ScriptedLink()
    holder = IndexHolder()
    sync = GallerySync(link, SITE, DEVICE, signer.verifier, FP, holder, tmp_path, resync_interval_s=0.2)
    sync.start()
    try:
        link.deliver(topics.gallery_manifest(SITE), bytes(limits.MAX_CHUNK_SIZE + 1))
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
        assert holder.current is None and link.subscribes == [topics.gallery_manifest(SITE)]  # no resync for those
    finally:
        sync.stop(timeout=10.0)


def test_queue_must_hold_the_largest_message(tmp_path, signer):
    with pytest.raises(ConfigError, match="queue_bytes"):
        GallerySync(ScriptedLink(), SITE, DEVICE, signer.verifier, FP, IndexHolder(), tmp_path, queue_bytes=1024)
