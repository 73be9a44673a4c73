"""GalleryPublisher end to end: store -> signed, chunked, retained publication -> real Mosquitto -> an edge-side
GalleryAssembler; forgeries and tampering injected at the broker; device statuses and acks back through the ingest.

Every test runs on SQLite and on PostgreSQL (the `store` fixture of tests/integration/conftest.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import facesets
import numpy as np
import pytest
from waiting import wait_until

from enrollment_server.gallery_publisher import GalleryPublisher, PublishedGallery
from enrollment_server.ingest import Ingest
from enrollment_server.store import SiteRule, Store
from models.contract import topics
from models.contract.assembler import GalleryAssembler
from models.contract.gallery import Gallery, GalleryPerson, SiteDecision, build_publication, signed_bytes
from models.contract.mqtt_link import InboundMessage, MqttConfig, MqttLink
from models.contract.signing import Signer
from models.contract.status import EdgeStatus, GalleryAck
from models.contract.timestamps import utc_now
from models.decision.rules import DecisionRule
from models.errors import (
    ContractError,
    FingerprintMismatchError,
    IntegrityError,
    PublishTimeoutError,
    SignatureError,
)
from models.imageio import load_image

REPO = Path(__file__).resolve().parents[2]
SITE = "hq"
SYNTHETIC_FP = "dlib_resnet_v1-synthetic0000000"
PEOPLE = {"obama": "Barack_Obama", "jolie": "Angelina_Jolie", "musk": "Elon_Musk"}
SMALL_CHUNK = 512  # several chunks even for a handful of templates


# --- helpers ----------------------------------------------------------------------------------------------------


class Edge:
    """The gallery side of an edge: an assembler fed by its own subscriber link; results and errors queued."""

    def __init__(self, link: MqttLink, verifier_of: Signer, fingerprint: str, site: str = SITE) -> None:
        self.link = link
        self.assembler = GalleryAssembler(verifier_of.verifier, fingerprint, site)
        self.site = site
        self.galleries: queue.Queue[Gallery] = queue.Queue()
        self.errors: queue.Queue[ContractError] = queue.Queue()

    def feed(self, msg: InboundMessage) -> None:
        try:
            gallery = self.assembler.feed(msg.topic, msg.payload)
        except ContractError as exc:  # what a real edge logs (and acks as an error) while keeping its gallery
            self.errors.put(exc)
            return
        if gallery is not None:
            self.galleries.put(gallery)

    def subscribe(self, topic_filter: str | None = None) -> Edge:
        self.link.subscribe(topic_filter or topics.site_gallery_filter(self.site), 1, self.feed)
        return self

    def gallery(self, timeout: float = 10.0) -> Gallery:
        return self.galleries.get(timeout=timeout)

    def error(self, timeout: float = 10.0) -> ContractError:
        return self.errors.get(timeout=timeout)

    def no_gallery(self, quiet_s: float = 0.5) -> bool:
        try:
            self.galleries.get(timeout=quiet_s)
        except queue.Empty:
            return True
        return False


def _sha(tag: object) -> str:
    return hashlib.sha256(str(tag).encode()).hexdigest()


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def _emb(seed: int, dim: int = 128) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(dim) * 0.1).astype(np.float32)


def enroll_synthetic(store: Store, site: str, people: dict[str, int], fp: str = SYNTHETIC_FP) -> None:
    """people: person_id -> number of templates (synthetic embeddings, where realism does not matter)."""
    store.ensure_site(site)
    for person_id, n in people.items():
        store.add_person(person_id, site, person_id.title())
        for i in range(n):
            store.add_template(
                person_id, _emb(_seed(person_id, i)), encoder_fingerprint=fp, image_sha256=_sha((person_id, i))
            )


def assert_matches_store(gallery: Gallery, store: Store, site: str, fp: str) -> None:
    embeddings, labels, names = store.site_embeddings(site, fp)
    np.testing.assert_array_equal(gallery.embeddings, embeddings.astype(gallery.dtype))
    assert tuple(gallery.people[i].person_id for i in gallery.labels) == labels
    assert {p.person_id: p.name for p in gallery.people} == dict(names)


# --- fixtures ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Faces:
    fingerprint: str
    templates: dict[str, list[tuple[str, np.ndarray]]]  # person_id -> (photo sha256, embedding)


@pytest.fixture(scope="module")
def faces() -> Faces:
    """Real embeddings: two photos each of three people of the test face set, through the real pipeline."""
    from models.face.pipeline import FacePipeline

    pipeline = FacePipeline.create()
    templates: dict[str, list[tuple[str, np.ndarray]]] = {}
    for person_id, folder in PEOPLE.items():
        for path in facesets.photos(folder)[:2]:
            found = pipeline.embed(load_image(path))
            assert found, f"no face in {path}"
            best = max(found, key=lambda f: f.detection.width * f.detection.height)
            templates.setdefault(person_id, []).append((hashlib.sha256(path.read_bytes()).hexdigest(), best.embedding))
    return Faces(pipeline.fingerprint, templates)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def enrolled(store: Store, faces: Faces) -> Store:
    store.ensure_site(SITE, "Head office")
    for person_id, photos in faces.templates.items():
        store.add_person(person_id, SITE, PEOPLE[person_id].replace("_", " "))
        for digest, embedding in photos:
            store.add_template(person_id, embedding, encoder_fingerprint=faces.fingerprint, image_sha256=digest)
    return store


@pytest.fixture
def server_link(mosquitto, mqtt_links) -> MqttLink:
    return mqtt_links(mosquitto)


def edge(mosquitto, mqtt_links, signer: Signer, fingerprint: str, site: str = SITE) -> Edge:
    return Edge(mqtt_links(mosquitto), signer, fingerprint, site)


# --- publication ------------------------------------------------------------------------------------------------


def test_published_gallery_reaches_an_edge_verified_and_identical(
    enrolled: Store, faces: Faces, signer, server_link, mosquitto, mqtt_links
):
    watcher = edge(mosquitto, mqtt_links, signer, faces.fingerprint).subscribe()
    publisher = GalleryPublisher(enrolled, server_link, signer, faces.fingerprint, chunk_size=SMALL_CHUNK)
    published = publisher.publish(SITE)

    assert isinstance(published, PublishedGallery)
    assert (published.version, published.count, published.people) == (1, 6, 3)
    assert published.chunk_count > 5 and not published.republished
    got = watcher.gallery()
    assert got.version == 1 and got.fingerprint == faces.fingerprint and got.dtype == "float32"
    assert_matches_store(got, enrolled, SITE, faces.fingerprint)
    assert {p.name for p in got.people} == {"Barack Obama", "Angelina Jolie", "Elon Musk"}
    assert watcher.errors.empty()

    recorded = enrolled.latest_gallery_version(SITE)
    assert recorded is not None and recorded.version == 1 and recorded.blob_sha256 == published.sha256
    assert (recorded.count, recorded.people, recorded.fingerprint) == (6, 3, faces.fingerprint)
    # an edge that connects later gets the same gallery from the retained messages alone
    late = edge(mosquitto, mqtt_links, signer, faces.fingerprint).subscribe()
    assert_matches_store(late.gallery(), enrolled, SITE, faces.fingerprint)


def test_float16_gallery(store: Store, signer, server_link, mosquitto, mqtt_links):
    enroll_synthetic(store, SITE, {"ann": 3, "ben": 2})
    watcher = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe()
    published = GalleryPublisher(store, server_link, signer, SYNTHETIC_FP, dtype="float16").publish(SITE)
    got = watcher.gallery()
    assert got.dtype == "float16" and got.embeddings.dtype == np.float16 and published.count == 5
    assert_matches_store(got, store, SITE, SYNTHETIC_FP)


def test_templates_of_another_encoder_are_left_out_and_the_admin_is_told(
    store: Store, signer, server_link, mosquitto, mqtt_links, caplog
):
    """An upgrade that changes the encoder's space (issue 13: flip averaging) leaves the old templates unusable: the
    gallery holds only the current encoder's, and each publication says how many were left out."""
    enroll_synthetic(store, SITE, {"ann": 2})
    enroll_synthetic(store, SITE, {"ben": 3}, fp="dlib_resnet_v1-bb9335380c8482a6")
    watcher = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe()
    with caplog.at_level(logging.WARNING, logger="enrollment_server.gallery_publisher"):
        published = GalleryPublisher(store, server_link, signer, SYNTHETIC_FP).publish(SITE)
    assert (published.count, published.people) == (2, 1)
    assert [p.person_id for p in watcher.gallery().people] == ["ann"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"3 templates were made by another encoder than {SYNTHETIC_FP}" in warning and "reencode" in warning


def test_empty_site_publishes_an_empty_gallery(store: Store, signer, server_link, mosquitto, mqtt_links):
    store.ensure_site("annex")
    watcher = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP, site="annex").subscribe()
    published = GalleryPublisher(store, server_link, signer, SYNTHETIC_FP).publish("annex")
    assert (published.version, published.count, published.people, published.chunk_count) == (1, 0, 0, 1)
    got = watcher.gallery()
    assert got.count == 0 and got.dim == 128 and got.people == ()


def test_removing_a_person_publishes_a_version_without_them_and_clears_leftover_chunks(
    enrolled: Store, faces: Faces, signer, server_link, mosquitto, mqtt_links
):
    watcher = edge(mosquitto, mqtt_links, signer, faces.fingerprint).subscribe()
    publisher = GalleryPublisher(enrolled, server_link, signer, faces.fingerprint, chunk_size=SMALL_CHUNK)
    first = publisher.publish(SITE)
    assert watcher.gallery().version == 1

    enrolled.remove_person("jolie")
    second = publisher.publish(SITE)
    assert (second.version, second.count, second.people) == (2, 4, 2)
    assert second.chunk_count < first.chunk_count and second.cleared == first.chunk_count - second.chunk_count
    got = watcher.gallery()
    assert got.version == 2 and "jolie" not in {p.person_id for p in got.people}
    assert_matches_store(got, enrolled, SITE, faces.fingerprint)

    # what the broker still retains for the site: the v2 manifest and exactly its chunks, no leftovers of v1
    retained: queue.Queue[InboundMessage] = queue.Queue()
    mqtt_links(mosquitto).subscribe(topics.site_gallery_filter(SITE), 1, retained.put)
    seen = {}
    while True:
        try:
            msg = retained.get(timeout=1.0)
        except queue.Empty:
            break
        assert msg.retain
        seen[msg.topic] = msg.payload
    expected = {topics.gallery_manifest(SITE)} | {topics.gallery_blob(SITE, i) for i in range(second.chunk_count)}
    assert set(seen) == expected
    assert [v.version for v in enrolled.list_gallery_versions(SITE)] == [2, 1]


def test_republish_latest_resends_the_recorded_version_or_publishes_a_changed_one(
    enrolled: Store, faces: Faces, signer, server_link, mosquitto, mqtt_links
):
    publisher = GalleryPublisher(enrolled, server_link, signer, faces.fingerprint, chunk_size=SMALL_CHUNK)
    first = publisher.republish_latest(SITE)  # nothing recorded yet: the first version
    assert first.version == 1 and not first.republished

    # the broker lost its retained messages (a crash between autosaves): clear them to simulate it
    handles = [server_link.publish(topics.gallery_manifest(SITE), b"", retain=True)]
    handles += [server_link.publish(topics.gallery_blob(SITE, i), b"", retain=True) for i in range(first.chunk_count)]
    assert all(h.wait(5.0) for h in handles)
    late = edge(mosquitto, mqtt_links, signer, faces.fingerprint).subscribe()
    assert late.no_gallery(quiet_s=0.5)

    again = publisher.republish_latest(SITE)
    assert again.republished and again.version == 1 and again.sha256 == first.sha256
    assert_matches_store(late.gallery(), enrolled, SITE, faces.fingerprint)
    assert [v.version for v in enrolled.list_gallery_versions(SITE)] == [1]  # nothing new recorded
    manifest_now = queue.Queue()
    mqtt_links(mosquitto).subscribe(topics.gallery_manifest(SITE), 1, manifest_now.put)
    # byte for byte the manifest recorded (and signed) when v1 was first published
    assert manifest_now.get(timeout=5.0).payload == enrolled.latest_gallery_version(SITE).manifest_json.encode()

    enrolled.set_active("musk", False)  # changed while the server was away
    changed = publisher.republish_latest(SITE)
    assert changed.version == 2 and not changed.republished and changed.people == 2
    assert late.gallery().version == 2


def test_a_changed_site_rule_is_a_new_publication_and_reaches_the_edge(
    enrolled: Store, faces: Faces, signer, server_link, mosquitto, mqtt_links
):
    publisher = GalleryPublisher(enrolled, server_link, signer, faces.fingerprint, chunk_size=SMALL_CHUNK)
    first = publisher.republish_latest(SITE)
    assert publisher.republish_latest(SITE).republished  # nothing changed: the recorded version re-sent
    decision = SiteDecision(DecisionRule.ratio(0.8, 0.55), 0.01, 3, 25, 400, "2026-12-06T10:00:00Z")
    enrolled.set_site_rule(SiteRule(SITE, faces.fingerprint, decision, fpir=0.0075, dir=0.96))
    changed = publisher.republish_latest(SITE)
    # the same people, the same blob: only the rule changed, and that is a new release
    assert not changed.republished and changed.version == first.version + 1 and changed.sha256 == first.sha256
    got = edge(mosquitto, mqtt_links, signer, faces.fingerprint).subscribe().gallery()
    assert got.version == changed.version and got.decision == decision
    assert publisher.republish_latest(SITE).republished  # and then it is the recorded version again
    assert enrolled.clear_site_rule(SITE)
    cleared = publisher.republish_latest(SITE)
    assert not cleared.republished and cleared.version == changed.version + 1


def test_a_broker_that_lost_its_retained_messages_gets_the_gallery_again_on_reconnect(
    store: Store, signer, mosquitto, mqtt_links
):
    enroll_synthetic(store, SITE, {"ann": 2, "ben": 1})
    link = mqtt_links.make(MqttConfig.from_url(mosquitto.url, reconnect_min_delay=1, reconnect_max_delay=2))
    publisher = GalleryPublisher(store, link, signer, SYNTHETIC_FP)
    publisher.republish_on_connect([SITE])
    link.start()  # server start: nothing recorded yet, so the first connect publishes v1
    first = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe()
    assert first.gallery().version == 1

    mosquitto.kill()  # a crash: retained messages since the last autosave are gone
    mosquitto.start()
    late = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe()
    got = late.gallery(timeout=15.0)  # re-sent by the publisher's connect listener
    assert got.version == 1
    assert_matches_store(got, store, SITE, SYNTHETIC_FP)
    assert [v.version for v in store.list_gallery_versions(SITE)] == [1]


def test_publish_times_out_when_the_broker_is_down_and_records_nothing(store: Store, signer, server_link, mosquitto):
    enroll_synthetic(store, SITE, {"ann": 1})
    publisher = GalleryPublisher(store, server_link, signer, SYNTHETIC_FP, ack_timeout_s=1.0)
    mosquitto.stop()
    assert wait_until(lambda: not server_link.is_connected())
    started = time.monotonic()
    with pytest.raises(PublishTimeoutError, match="acknowledged"):
        publisher.publish(SITE)
    assert time.monotonic() - started < 3.0
    assert store.latest_gallery_version(SITE) is None


# --- attacks through the broker ---------------------------------------------------------------------------------


def test_forged_manifest_is_refused_and_republish_restores_the_genuine_one(
    store: Store, signer, server_link, mosquitto, mqtt_links
):
    enroll_synthetic(store, SITE, {"ann": 2, "ben": 2})
    watcher = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe()
    publisher = GalleryPublisher(store, server_link, signer, SYNTHETIC_FP)
    publisher.publish(SITE)
    assert watcher.gallery().version == 1

    # an attacker with broker access but not our key: a v2 adding "mallory", its manifest claiming our key id
    attacker = Signer.generate()
    people = (GalleryPerson("mallory", "Mallory"),)
    fake = Gallery(SITE, 2, SYNTHETIC_FP, "euclidean", "float32", _emb(666)[None, :], np.zeros(1, np.int32), people)
    manifest, chunks = build_publication(fake, attacker)
    draft = dataclasses.replace(manifest, key_id=signer.key_id, signature="")
    forged = dataclasses.replace(draft, signature=attacker.sign_b64(signed_bytes(draft.to_object())))
    rogue = mqtt_links(mosquitto)
    handles = [rogue.publish(topics.gallery_blob(SITE, i), c, retain=True) for i, c in enumerate(chunks)]
    handles.append(rogue.publish(topics.gallery_manifest(SITE), forged.to_json(), retain=True))
    assert all(h.wait(5.0) for h in handles)

    assert isinstance(watcher.error(), SignatureError)
    assert watcher.no_gallery() and watcher.assembler.completed_version == 1  # v1 stays in service
    # signed by the attacker's own key: refused for the key id before any signature check
    own = mqtt_links(mosquitto)
    assert own.publish(topics.gallery_manifest(SITE), manifest.to_json(), retain=True).wait(5.0)
    assert "trusts key" in str(watcher.error())

    # a new edge sees only the forged retained manifest, refuses it, and gets v1 once the server re-publishes
    late = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe()
    assert isinstance(late.error(), SignatureError)
    assert publisher.republish_latest(SITE).republished
    got = late.gallery()
    assert got.version == 1 and "mallory" not in {p.person_id for p in got.people}


def test_tampered_chunk_is_detected_and_republish_heals_it(store: Store, signer, server_link, mosquitto, mqtt_links):
    enroll_synthetic(store, SITE, {"ann": 3, "ben": 3})
    publisher = GalleryPublisher(store, server_link, signer, SYNTHETIC_FP, chunk_size=SMALL_CHUNK)
    published = publisher.publish(SITE)
    assert published.chunk_count >= 3

    # flip one byte of retained chunk 1 at the broker
    original: queue.Queue[InboundMessage] = queue.Queue()
    spy = mqtt_links(mosquitto)
    spy.subscribe(topics.gallery_blob(SITE, 1), 1, original.put)
    chunk = bytearray(original.get(timeout=5.0).payload)
    chunk[len(chunk) // 2] ^= 0x01
    assert spy.publish(topics.gallery_blob(SITE, 1), bytes(chunk), retain=True).wait(5.0)

    # an edge subscribing now: the verified manifest first, then the chunks, one of which does not match it
    victim = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe(topics.gallery_manifest(SITE))
    assert wait_until(lambda: victim.assembler.pending_version == 1)
    victim.subscribe(f"{topics.ROOT}/site/{SITE}/gallery/blob/+")
    error = victim.error()
    assert isinstance(error, IntegrityError) and "chunk 1" in str(error)
    assert victim.no_gallery()

    assert publisher.republish_latest(SITE).republished
    got = victim.gallery()
    assert got.version == 1
    assert_matches_store(got, store, SITE, SYNTHETIC_FP)


def test_gallery_of_another_encoder_is_refused(store: Store, signer, server_link, mosquitto, mqtt_links):
    enroll_synthetic(store, SITE, {"ann": 2})
    enroll_synthetic(store, SITE, {"zed": 1}, fp="another_encoder-0123456789abcdef")
    watcher = edge(mosquitto, mqtt_links, signer, SYNTHETIC_FP).subscribe()
    GalleryPublisher(store, server_link, signer, SYNTHETIC_FP).publish(SITE)
    assert watcher.gallery().version == 1

    # correctly signed by the server, but built under another fingerprint (e.g. a misconfigured second server)
    other = GalleryPublisher(store, server_link, signer, "another_encoder-0123456789abcdef").publish(SITE)
    assert other.version == 2 and other.count == 1
    error = watcher.error()
    assert isinstance(error, FingerprintMismatchError) and "another_encoder" in str(error)
    assert watcher.no_gallery() and watcher.assembler.completed_version == 1


# --- devices: statuses and acks back through the ingest ---------------------------------------------------------

_EDGE = textwrap.dedent(
    """
    import sys, time
    from models.contract.mqtt_link import MqttConfig, PahoMqttLink, Will
    url, device = sys.argv[1], sys.argv[2]
    will, ack, online = (bytes.fromhex(a) for a in sys.argv[3:6])
    status = f"faceattend/v1/edge/{device}/status"
    link = PahoMqttLink(MqttConfig.from_url(url, client_id=device, keepalive=5), will=Will(status, will))
    link.start()
    assert link.wait_connected(10)
    assert link.publish(f"faceattend/v1/edge/{device}/gallery/ack", ack, qos=1).wait(10)
    assert link.publish(status, online, qos=1, retain=True).wait(10)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def _status(device: str, state: str, gallery_version: int | None) -> bytes:
    return EdgeStatus(
        state=state,
        device_id=device,
        site=SITE,
        agent_version="0.1.0",
        gallery_version=gallery_version,
        fingerprint=SYNTHETIC_FP,
        ts=utc_now(),
        health={"fps": 14.5, "queue": {"events": 0}},
    ).to_json()


def _ack(device: str, version: int, error: str | None = None) -> bytes:
    return GalleryAck(
        device_id=device, site=SITE, version=version, status="error" if error else "ok", error=error, ts=utc_now()
    ).to_json()


@pytest.fixture
def dying_edge() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", _EDGE, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_device_statuses_and_acks_show_in_list_devices_with_lag(
    store: Store, signer, server_link, mosquitto, mqtt_links, dying_edge
):
    enroll_synthetic(store, SITE, {"ann": 2})
    ingest = Ingest(store, mqtt_links(mosquitto))
    ingest.start()
    assert ingest.wait_subscribed()
    publisher = GalleryPublisher(store, server_link, signer, SYNTHETIC_FP)
    assert publisher.publish(SITE).version == 1

    # door-1 (its own process, so it can die without a DISCONNECT): applies v1, acks, says online
    will, ack, online = _status("door-1", "offline", None), _ack("door-1", 1), _status("door-1", "online", 1)
    door1 = dying_edge(mosquitto.url, "door-1", will.hex(), ack.hex(), online.hex())
    # door-2 fails to apply v1 (an error ack records the failure; it does not register the device)
    door2 = mqtt_links(mosquitto)
    assert door2.publish(topics.gallery_ack("door-2"), _ack("door-2", 1, error="fingerprint mismatch")).wait(5.0)

    def devices() -> dict:
        return {d.device_id: d for d in store.list_devices(SITE)}

    assert wait_until(lambda: "door-1" in devices() and devices()["door-1"].state == "online")
    assert wait_until(lambda: len(store.list_acks(site_id=SITE)) == 2)
    d1 = devices()["door-1"]
    assert (d1.gallery_version, d1.latest_site_version, d1.lag, d1.agent_version) == (1, 1, 0, "0.1.0")
    assert d1.health() == {"fps": 14.5, "queue": {"events": 0}}
    assert [(a.status, a.version, a.error) for a in store.list_acks(device_id="door-2")] == [
        ("error", 1, "fingerprint mismatch")
    ]

    store.add_person("cid", SITE, "Cid")
    assert publisher.publish(SITE).version == 2
    assert devices()["door-1"].lag == 1  # v2 not applied yet

    door1.kill()  # no DISCONNECT: the broker publishes the last will
    door1.wait(10)
    assert wait_until(lambda: devices()["door-1"].state == "offline", timeout=15.0)
    d1 = devices()["door-1"]
    # the will was registered before v1 was applied; what the server learnt since is kept
    assert (d1.gallery_version, d1.lag) == (1, 1)
    assert ingest.wait_idle(5.0)
    stats = ingest.stats()
    assert stats.rejected_total == 0 and stats.acks == 2 and stats.statuses >= 2
    assert stats.received == stats.accounted
    ingest.stop()
