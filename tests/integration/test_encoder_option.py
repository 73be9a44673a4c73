"""The non-commercial encoder option (mobilefacenet-192) end to end on the test faces: detect -> align -> encode into
192-d unit vectors, the same person nearer than different people, enrollment under its own distances, and a door
refusing a gallery built by the other encoder (real server publisher, real broker, real edge sync)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from pathlib import Path

import facesets
import numpy as np
import pytest

from edge_agent.gallery.index import IndexHolder
from edge_agent.gallery.sync import GallerySync
from enrollment_server.components import fingerprint
from enrollment_server.config import config_from_dict
from enrollment_server.enrollment import Enroller
from enrollment_server.gallery_publisher import GalleryPublisher
from enrollment_server.store import Store
from models.contract import topics
from models.contract.mqtt_link import InboundMessage
from models.contract.signing import Signer
from models.contract.status import GalleryAck
from models.face import quality as q
from models.face.encoders import DLIB_RESNET, MOBILEFACENET_192
from models.face.fingerprint import encoder_fingerprint
from models.face.pipeline import FacePipeline, PipelineConfig
from models.imageio import encode_jpeg, load_image

SITE = "hq"
PEOPLE = ("Barack_Obama", "Jennifer_Aniston", "Katy_Perry", "Mark_Zuckerberg")


@pytest.fixture(scope="module")
def mobile(mobilefacenet_pipeline_config: PipelineConfig) -> Iterator[FacePipeline]:
    pipe = FacePipeline.create(mobilefacenet_pipeline_config)
    yield pipe
    pipe.close()


def largest(pipe: FacePipeline, photo: Path) -> np.ndarray:
    faces = pipe.embed(load_image(photo))
    assert faces, photo
    return max(faces, key=lambda f: f.detection.width * f.detection.height).embedding


def test_the_pipeline_detects_aligns_and_encodes_into_unit_192_d_vectors(
    mobilefacenet_pipeline_config: PipelineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="models.face.encoders"):
        pipe = FacePipeline.create(mobilefacenet_pipeline_config)
    try:
        # the licence is said at every start, with the acknowledgement that allowed it
        assert "mobilefacenet-192 (acknowledged: accept_licence non-commercial-research)" in caplog.text
        assert "MS1M-V2" in caplog.text
        assert (pipe.aligner.method, pipe.aligner.size, pipe.encoder.spec) == ("arcface112", 112, MOBILEFACENET_192)
        assert pipe.fingerprint == encoder_fingerprint(MOBILEFACENET_192).value != encoder_fingerprint().value
        image = load_image(facesets.photos("Barack_Obama")[0])
        (face,) = pipe.embed(image)
        assert face.embedding.shape == (192,) and face.embedding.dtype == np.float32
        assert abs(float(np.linalg.norm(face.embedding)) - 1.0) < 1e-5
        chips = pipe.aligner.align(image, [face.detection])
        assert chips.shape == (1, 112, 112, 3)
        again = pipe.encoder.encode(np.concatenate([chips, chips[:, :, ::-1], np.zeros_like(chips)]))
        assert np.allclose(again[0], face.embedding, atol=1e-6)  # encoding is the pipeline's last step
        assert np.linalg.norm(again[1] - again[0]) < 0.6  # the mirrored face is still the same face
        assert np.isfinite(again).all() and np.allclose(np.linalg.norm(again, axis=1), 1.0, atol=1e-5)  # even black
        with pytest.raises(Exception, match=r"expects N x 112 x 112 x 3 chips"):
            pipe.encoder.encode(np.zeros((1, 150, 150, 3), np.uint8))
    finally:
        pipe.close()


def test_the_same_person_is_nearer_than_anyone_else_on_the_test_faces(mobile: FacePipeline) -> None:
    embeddings, owners = [], []
    for person in facesets.people():
        for photo in facesets.photos(person):
            embeddings.append(largest(mobile, photo))
            owners.append(person)
    e, who = np.stack(embeddings), np.array(owners)
    d = np.linalg.norm(e[:, None] - e[None], axis=2)
    np.fill_diagonal(d, np.inf)
    several = np.array([np.sum(who == p) >= 2 for p in who])
    same = (who[:, None] == who[None]) & np.isfinite(d)
    genuine, impostor = d[same], d[who[:, None] != who[None]]
    threshold = MOBILEFACENET_192.default_decision.threshold
    print(
        f"\n{len(e)} photos, {several.sum()} with another photo of the same person: genuine median "
        f"{np.median(genuine):.3f}, impostor min {impostor.min():.3f}, p1 {np.quantile(impostor, 0.01):.3f} "
        f"(default distance threshold {threshold})"
    )
    assert (who[d.argmin(axis=1)] == who)[several].all()  # every photo's nearest other photo is the same person
    assert np.median(genuine) < threshold < np.quantile(impostor, 0.01)


@pytest.fixture
def server(tmp_path: Path, mobile: FacePipeline) -> Iterator[tuple[Store, Enroller, object]]:
    cfg = config_from_dict(
        {
            "site": SITE,
            "gallery": {"signing_key": str(tmp_path / "key.pem")},
            "enrollment": {"encoder": "mobilefacenet-192", "accept_licence": "non-commercial-research"},
        }
    )
    store = Store.open(str(tmp_path / "server.db"))
    try:
        yield store, Enroller(store, mobile, cfg.enrollment), cfg
    finally:
        store.close()


def test_enrollment_uses_the_encoders_own_distances(server) -> None:
    store, enroller, cfg = server
    e = cfg.enrollment
    assert (e.alignment, e.same_person_distance, e.duplicate_identity_distance) == ("arcface112", 1.12, 1.01)
    assert e.quality.duplicate_template_distance == MOBILEFACENET_192.duplicate_template_distance
    assert enroller.fingerprint == fingerprint(cfg) and enroller.fingerprint.startswith("mobilefacenet_192-")
    obama = facesets.photos("Barack_Obama")
    report = enroller.enroll("obama", "Barack Obama", SITE, [(p.name, p.read_bytes()) for p in obama[:2]])
    assert report.added == 2, report.to_json()
    stored = store.list_templates(person_id="obama", fingerprint=enroller.fingerprint)
    assert len(stored) == 2 and all(t.embedding.shape == (192,) for t in stored)
    # another photo of him joins; someone else's photo under his id does not; the same photo saved again adds nothing
    more = enroller.enroll("obama", "Barack Obama", SITE, [(obama[2].name, obama[2].read_bytes())])
    assert more.added == 1, more.to_json()
    other = facesets.photos("Katy_Perry")[0]
    refused = enroller.enroll("obama", "Barack Obama", SITE, [(other.name, other.read_bytes())])
    assert [r.reason for r in refused.results] == [q.NOT_THIS_PERSON]
    resaved = encode_jpeg(load_image(obama[0]), 90)
    dup = enroller.enroll("obama", "Barack Obama", SITE, [("resaved.jpg", resaved)])
    assert [r.reason for r in dup.results] == [q.DUPLICATE_TEMPLATE], dup.to_json()


class Acks:
    def __init__(self, link, device: str) -> None:
        self._got: queue.Queue[GalleryAck] = queue.Queue()
        link.subscribe(topics.gallery_ack(device), 1, self._on)
        assert link.wait_subscribed(topics.gallery_ack(device), 5.0)

    def _on(self, msg: InboundMessage) -> None:
        self._got.put(GalleryAck.from_json(msg.payload))

    def next(self) -> GalleryAck:
        return self._got.get(timeout=15.0)


def test_a_door_of_the_other_encoder_refuses_the_gallery_and_one_of_the_same_encoder_serves_it(
    tmp_path: Path, server, mosquitto, mqtt_links, mobile: FacePipeline
) -> None:
    store, enroller, cfg = server
    for person in PEOPLE:
        photo = facesets.photos(person)[0]
        assert enroller.enroll(person, person.replace("_", " "), SITE, [(photo.name, photo.read_bytes())]).added == 1
    signer = Signer.generate()
    publisher = GalleryPublisher(store, mqtt_links(mosquitto), signer, fingerprint(cfg), dim=MOBILEFACENET_192.dim)
    doors: dict[str, tuple[GallerySync, Acks, IndexHolder]] = {}
    for device, spec in (("door-dlib", DLIB_RESNET), ("door-mobile", MOBILEFACENET_192)):
        acks, holder = Acks(mqtt_links(mosquitto), device), IndexHolder()
        own = encoder_fingerprint(spec).value  # what FacePipeline.fingerprint gives a door running that encoder
        sync = GallerySync(mqtt_links(mosquitto), SITE, device, signer.verifier, own, holder, tmp_path / device)
        sync.start()
        doors[device] = (sync, acks, holder)
    try:
        assert publisher.publish(SITE).version == 1
        sync, acks, holder = doors["door-dlib"]
        ack = acks.next()
        assert (ack.version, ack.status) == (1, "error") and ack.error.startswith("FingerprintMismatchError")
        assert fingerprint(cfg) in ack.error and holder.current is None and sync.status().version is None
        sync, acks, holder = doors["door-mobile"]
        ack = acks.next()
        assert (ack.version, ack.status) == (1, "ok") and sync.status().version == 1
        index = holder.current
        assert index is not None and (index.dim, index.people) == (192, len(PEOPLE))
        # the door recognises the photos it never saw (at least 90 %, nobody as someone else) and no stranger, with
        # its encoder's default rule
        probes = [(person, photo) for person in PEOPLE for photo in facesets.photos(person)[1:]]
        strangers = [
            photo for person in ("Elon_Musk", "Jack_Dorsey", "Sundar_Pichai") for photo in facesets.photos(person)
        ]
        embeddings = np.stack([largest(mobile, photo) for photo in [p for _, p in probes] + strangers])
        matches = index.search(embeddings, k=3)
        decisions = MOBILEFACENET_192.default_decision.decide(matches.neighbours)
        truth = [person for person, _ in probes] + [None] * len(strangers)
        assert [row[0] for row in matches.person_ids[: len(probes)]] == truth[: len(probes)]  # rank-1 right
        named = [d.person_id if d.accepted else None for d in decisions]
        assert all(n in (None, t) for n, t in zip(named, truth, strict=True))  # nobody credited as someone else
        assert sum(n is not None for n in named[: len(probes)]) >= 0.9 * len(probes)
        assert named[len(probes) :] == [None] * len(strangers)
    finally:
        for sync, _, _ in doors.values():
            sync.stop(timeout=30.0)
