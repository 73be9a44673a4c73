"""The offline style worker (edge_agent/style/worker.py) with a real style network (a tiny one trained and exported
here with the project's own tools), real snapshots of a real face photo written by SnapshotStore, and a real
Mosquitto: the stylised JPEG lands next to the snapshot, the follow-up message arrives with the right references,
nothing happens while the door is busy, the queue survives a restart, a broker outage and `kill -9`, and bad
snapshots or models are dropped while the worker carries on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import cv2
import facesets
import numpy as np
import pytest
from waiting import wait_until

from edge_agent.delivery.snapshots import SnapshotConfig, SnapshotStore
from edge_agent.style.worker import (
    MAX_ATTEMPTS,
    StyleConfig,
    StyleQueue,
    StyleSpec,
    StyleWorker,
    mqtt_publisher,
    stylized_ref,
)
from models.contract import topics
from models.contract.mqtt_link import InboundMessage
from models.contract.status import EdgeStatus
from models.contract.stylized import StylizedSnapshot
from models.imageio import load_image
from models.registry import sha256_bytes

REPO = Path(__file__).resolve().parents[2]
DEVICE, SITE = "door-3", "hq"
PROBE_DEVICE = "probe"
DAY = datetime(2026, 1, 2, 8, 30, tzinfo=timezone.utc)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def style_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real feed-forward style network for the procedural mosaic, trained for a few steps on the CPU and
    exported to ONNX by the project's tools (as tests/integration/test_style.py does); its metadata says it was
    never checked on held-out images."""
    import torch
    from skimage import data as skimage_data

    from models.style.export import export_checkpoint
    from models.style.images import load_style
    from models.style.train import TrainConfig, train_style
    from models.style.transformer import TransformerConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("style-model")
    style, label = load_style("procedural:mosaic", size=128)
    items = [(n, np.ascontiguousarray(getattr(skimage_data, n)()[:, :, :3])) for n in ("astronaut", "coffee")]
    config = TrainConfig(
        size=64,
        batch_size=2,
        iterations=8,
        lr=5e-3,
        style_size=128,
        checkpoint_every=8,
        transformer=TransformerConfig(width=8, residual_blocks=1),
    )
    train_style(config, style, label, items, root / "mosaic.ckpt")
    onnx_path = root / "mosaic.onnx"
    export_checkpoint(root / "mosaic.ckpt", onnx_path)
    return onnx_path


@pytest.fixture(scope="module")
def face_photo() -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A real face photo (RGB) and its face box from the project's detector."""
    from models.face.detector import RetinaFaceDetector

    photo = facesets.photos("Barack_Obama")[0]
    image = load_image(photo)
    detector = RetinaFaceDetector.create()
    try:
        faces = detector.detect(image)
    finally:
        detector.close()
    assert faces, f"no face found in {photo}"
    return image, max(faces, key=lambda d: d.width * d.height).bbox


@pytest.fixture
def snapshots(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(SnapshotConfig(dir=tmp_path / "snapshots", mode="face", jpeg_quality=90))


def save_snapshot(store: SnapshotStore, face) -> tuple[str, str]:
    image, box = face
    event_id = str(uuid.uuid4())
    ref = store.save(event_id, image, box, at=DAY)
    assert ref is not None
    return event_id, ref


class Consumer:
    """Every stylised-snapshot message received (duplicates included), by (event_id, style)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[StylizedSnapshot] = []
        self.ready = threading.Event()

    def __call__(self, msg: InboundMessage) -> None:
        if topics.parse_topic(msg.topic).device == PROBE_DEVICE:
            self.ready.set()
            return
        parsed = StylizedSnapshot.from_json(msg.payload)
        assert msg.topic == topics.edge_stylized(parsed.device_id) and not msg.retain
        with self.lock:
            self.messages.append(parsed)

    def received(self) -> set[tuple[str, str]]:
        with self.lock:
            return {(m.event_id, m.style) for m in self.messages}

    def by_event(self) -> dict[str, StylizedSnapshot]:
        with self.lock:
            return {m.event_id: m for m in self.messages}


@pytest.fixture
def consumer(mosquitto, mqtt_links) -> Consumer:
    received = Consumer()
    # a persistent session: what the broker accepts while the consumer is away (or the broker restarts) is kept
    link = mqtt_links(mosquitto, client_id=f"screen-{uuid.uuid4().hex[:8]}", clean_session=False)
    link.subscribe(topics.ALL_EDGE_STYLIZED, 1, received)
    assert link.publish(topics.edge_stylized(PROBE_DEVICE), b"probe").wait(5.0)
    assert received.ready.wait(5.0)
    return received


class Workers:
    def __init__(self) -> None:
        self.made: list[StyleWorker] = []

    def __call__(self, config: StyleConfig, store: SnapshotStore, is_idle, publish, **options) -> StyleWorker:
        worker = StyleWorker(
            config, store, is_idle, publish, device_id=DEVICE, site=SITE, poll_interval_s=0.05, **options
        )
        self.made.append(worker)
        worker.start()
        return worker


@pytest.fixture
def workers() -> Iterator[Workers]:
    factory = Workers()
    yield factory
    for worker in factory.made:
        worker.stop(30.0)


def config(tmp_path: Path, *styles: StyleSpec, **options) -> StyleConfig:
    return StyleConfig(enabled=True, styles=styles, queue=tmp_path / "style-queue.db", idle_after_s=0, **options)


@pytest.fixture(params=["process", "thread"])
def isolation(request: pytest.FixtureRequest) -> str:
    return request.param


class Switch:
    """An is_idle that the test flips."""

    def __init__(self, idle: bool) -> None:
        self.idle = idle
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.idle


def decode(path: Path) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, f"{path} is not a JPEG"
    return bgr


# ---------------------------------------------------------------- tests


def test_stylised_next_to_the_snapshot_and_announced(
    tmp_path, style_model, face_photo, snapshots, mosquitto, mqtt_links, consumer, workers, isolation
):
    spec = StyleSpec("mosaic", style_model)
    cfg = config(tmp_path, spec, isolation=isolation)
    worker = StyleWorker.for_agent(
        cfg, snapshots, mqtt_links(mosquitto), DEVICE, SITE, is_idle=Switch(True), queue_path=tmp_path / "style.db"
    )
    workers.made.append(worker)
    worker.start()
    events = [save_snapshot(snapshots, face_photo) for _ in range(3)]
    for event_id, ref in events:
        assert worker.enqueue(event_id, ref)

    want = {(e, "mosaic") for e, _ in events}
    assert wait_until(lambda: want <= consumer.received(), timeout=60), worker.stats()
    model_id = sha256_bytes(style_model.read_bytes())[:16]
    received = consumer.by_event()
    for event_id, ref in events:
        msg = received[event_id]
        assert (msg.device_id, msg.site, msg.style, msg.snapshot) == (DEVICE, SITE, "mosaic", ref)
        assert msg.stylized == stylized_ref(ref, "mosaic") == ref.replace(".jpg", ".mosaic.jpg")
        assert msg.model == model_id and msg.ms > 0
        original, painted = snapshots.config.dir / ref, snapshots.config.dir / msg.stylized
        assert painted.parent == original.parent and painted.name == f"{event_id}.mosaic.jpg"
        a, b = decode(original), decode(painted)
        assert a.shape == b.shape  # painted at the snapshot's size
        assert float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()) > 5  # and changed
    assert wait_until(lambda: worker.stats().unpublished == 0)
    stats = worker.stats()
    assert (stats.queue_depth, stats.done, stats.failed, stats.stylized) == (0, 3, 0, 3)
    assert stats.acked == 3 and stats.in_flight == 0 and stats.last_ms is not None and stats.running
    assert stats.priority in ("SCHED_IDLE", "nice 19") and stats.isolation == isolation
    assert (worker.painter_pid is not None) == (isolation == "process")
    assert stats.styles["mosaic"].ok and stats.styles["mosaic"].model == model_id
    assert stats.styles["mosaic"].undertrained is None  # exported without a held-out check: "never checked"
    assert (tmp_path / "style.db").is_file() and not cfg.queue.exists()  # the agent's queue_path wins
    health = worker.stats_dict()
    assert health["done"] == 3 and health["styles"] == {"mosaic": "ok, unchecked"}
    status = EdgeStatus(
        state="online",
        device_id=DEVICE,
        site=SITE,
        agent_version="test",
        gallery_version=None,
        fingerprint="fp",
        ts="2026-01-02T03:04:05Z",
        health={"style": health},
    )
    assert EdgeStatus.from_json(status.to_json()).health["style"]["done"] == 3  # fits the status contract
    # the originals are untouched and the store still lists exactly them
    assert sorted(s.ref for s in snapshots.iter_snapshots()) == sorted(ref for _, ref in events)


def test_nothing_happens_while_the_door_is_busy(tmp_path, style_model, face_photo, snapshots, workers):
    busy = Switch(False)
    sent: list[StylizedSnapshot] = []
    worker = workers(
        config(tmp_path, StyleSpec("mosaic", style_model)),
        snapshots,
        busy,
        lambda m: sent.append(m),  # None: taken over at once
    )
    event_id, ref = save_snapshot(snapshots, face_photo)
    assert worker.enqueue(event_id, ref) and not worker.enqueue(event_id, ref)  # idempotent while queued
    assert wait_until(lambda: busy.asked >= 10)  # asked, and asked again
    time.sleep(0.5)
    painted = snapshots.config.dir / stylized_ref(ref, "mosaic")
    assert not painted.exists() and sent == [] and worker.stats().queue_depth == 1
    busy.idle = True
    assert wait_until(lambda: len(sent) == 1, timeout=30)
    assert painted.is_file() and sent[0].event_id == event_id
    assert wait_until(lambda: worker.stats().unpublished == 0)  # a None from publish retires the message


def test_idleness_is_checked_between_images(tmp_path, style_model, face_photo, snapshots, workers):
    gate = Switch(True)
    painted: list[str] = []

    def publish(message: StylizedSnapshot) -> None:
        painted.append(message.style)
        if len(painted) == 1:
            gate.idle = False  # a face arrives right after the first image

    specs = (StyleSpec("mosaic", style_model), StyleSpec("mosaic2", style_model))
    worker = workers(config(tmp_path, *specs), snapshots, gate, publish)
    for _ in range(2):
        worker.enqueue(*save_snapshot(snapshots, face_photo))
    assert wait_until(lambda: painted == ["mosaic"])
    time.sleep(1.0)
    assert painted == ["mosaic"] and worker.stats().stylized == 1 and worker.stats().queue_depth == 2
    gate.idle = True  # the door idles again: the rest is done (the first job's second style first)
    assert wait_until(lambda: len(painted) >= 4, timeout=60)
    assert sorted(painted) == ["mosaic", "mosaic", "mosaic2", "mosaic2"]


def test_restart_and_broker_outage_lose_nothing(
    tmp_path, style_model, face_photo, snapshots, mosquitto, mqtt_links, consumer, workers
):
    cfg = config(tmp_path, StyleSpec("mosaic", style_model))
    link = mqtt_links(mosquitto)
    busy = Switch(False)
    first = workers(cfg, snapshots, busy, mqtt_publisher(link))
    events = [save_snapshot(snapshots, face_photo) for _ in range(4)]
    for event_id, ref in events:
        first.enqueue(event_id, ref)
    assert first.stop(30.0)
    with StyleQueue.open(cfg.queue) as q:
        assert q.depth() == 4

    # the broker goes away; a new worker paints everything but cannot announce it
    mosquitto.stop()
    assert wait_until(lambda: not link.is_connected())
    second = workers(cfg, snapshots, Switch(True), mqtt_publisher(link))
    assert wait_until(lambda: second.stats().stylized == 4, timeout=60)
    assert second.stats().unpublished == 4 and consumer.received() == set()
    assert second.stop(30.0)
    with StyleQueue.open(cfg.queue) as q:
        assert q.depth() == 0 and q.backlog() == 4

    # the broker is back: a third worker (another restart) announces the backlog, nothing painted again
    mosquitto.start()
    assert link.wait_connected(15.0)
    third = workers(cfg, snapshots, Switch(True), mqtt_publisher(link))
    want = {(e, "mosaic") for e, _ in events}
    assert wait_until(lambda: want <= consumer.received(), timeout=30)
    assert wait_until(lambda: third.stats().unpublished == 0)
    assert third.stats().stylized == 0 and third.stats().done == 4


def test_outage_while_running_is_retried_after_reconnect(
    tmp_path, style_model, face_photo, snapshots, mosquitto, mqtt_links, consumer, workers
):
    link = mqtt_links(mosquitto)
    gate = Switch(True)
    worker = workers(config(tmp_path, StyleSpec("mosaic", style_model)), snapshots, gate, mqtt_publisher(link))
    first = save_snapshot(snapshots, face_photo)
    worker.enqueue(*first)
    assert wait_until(lambda: (first[0], "mosaic") in consumer.received(), timeout=30)
    mosquitto.stop()
    assert wait_until(lambda: not link.is_connected())
    second = save_snapshot(snapshots, face_photo)
    worker.enqueue(*second)
    assert wait_until(lambda: worker.stats().stylized == 2, timeout=30)
    time.sleep(0.5)
    assert worker.stats().unpublished == 1
    mosquitto.start()
    assert wait_until(lambda: (second[0], "mosaic") in consumer.received(), timeout=30)
    assert wait_until(lambda: worker.stats().unpublished == 0)


def test_missing_and_corrupt_snapshots_are_dropped(
    tmp_path, style_model, face_photo, snapshots, workers, caplog, isolation
):
    sent: list[StylizedSnapshot] = []
    cfg = config(tmp_path, StyleSpec("mosaic", style_model), isolation=isolation)
    worker = workers(cfg, snapshots, Switch(True), sent.append)
    gone_id, gone_ref = save_snapshot(snapshots, face_photo)
    (snapshots.config.dir / gone_ref).unlink()  # retention got there first
    bad_id, bad_ref = save_snapshot(snapshots, face_photo)
    (snapshots.config.dir / bad_ref).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good_id, good_ref = save_snapshot(snapshots, face_photo)
    for event_id, ref in ((gone_id, gone_ref), (bad_id, bad_ref), (good_id, good_ref)):
        worker.enqueue(event_id, ref)
    assert wait_until(lambda: [m.event_id for m in sent] == [good_id], timeout=30)
    stats = worker.stats()
    assert (stats.done, stats.failed, stats.queue_depth, stats.running) == (1, 2, 0, True)
    assert "snapshot is gone" in caplog.text and "corrupt or truncated" in caplog.text
    assert not (snapshots.config.dir / stylized_ref(gone_ref, "mosaic")).exists()


def test_a_model_that_cannot_load_disables_only_its_style(
    tmp_path, style_model, face_photo, snapshots, workers, isolation
):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    specs = (
        StyleSpec("junk", junk),
        StyleSpec("missing", tmp_path / "nowhere.onnx"),
        StyleSpec("mosaic", style_model),
    )
    sent: list[StylizedSnapshot] = []
    worker = workers(config(tmp_path, *specs, isolation=isolation), snapshots, Switch(True), sent.append)
    event_id, ref = save_snapshot(snapshots, face_photo)
    worker.enqueue(event_id, ref)
    assert wait_until(lambda: len(sent) == 1, timeout=30)
    assert sent[0].style == "mosaic"
    assert wait_until(lambda: worker.stats().done == 1)
    styles = worker.stats().styles
    assert styles["mosaic"].ok and not styles["junk"].ok and not styles["missing"].ok
    assert "not an ONNX model" in (styles["junk"].error or "") and "nowhere.onnx" in (styles["missing"].error or "")
    assert worker.stats().health()["styles"] == {"junk": "disabled", "missing": "disabled", "mosaic": "ok, unchecked"}


def test_no_usable_model_keeps_the_queue(tmp_path, face_photo, snapshots, workers, caplog):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"nope")
    worker = workers(config(tmp_path, StyleSpec("junk", junk)), snapshots, Switch(True), lambda m: None)
    worker.enqueue(*save_snapshot(snapshots, face_photo))
    assert wait_until(lambda: "no usable style model" in caplog.text)
    time.sleep(0.3)
    stats = worker.stats()
    assert stats.running and stats.queue_depth == 1 and stats.stylized == 0


def test_a_job_that_keeps_killing_the_process_is_dropped(tmp_path, style_model, face_photo, snapshots, workers):
    cfg = config(tmp_path, StyleSpec("mosaic", style_model))
    event_id, ref = save_snapshot(snapshots, face_photo)
    with StyleQueue.open(cfg.queue) as q:
        q.enqueue(event_id, ref)
        for _ in range(MAX_ATTEMPTS):  # started MAX_ATTEMPTS times, never finished
            q.begin(q.next().job_id)
    sent: list[StylizedSnapshot] = []
    worker = workers(cfg, snapshots, Switch(True), sent.append)
    assert wait_until(lambda: worker.stats().failed == 1)
    assert sent == [] and worker.stats().queue_depth == 0


def test_disabled_by_default(tmp_path, snapshots, face_photo):
    worker = StyleWorker(StyleConfig(), snapshots, lambda: True, lambda m: None, device_id=DEVICE, site=SITE)
    worker.start()
    assert not worker.enabled and not worker.enqueue(*save_snapshot(snapshots, face_photo))
    assert not worker.stats().enabled and not worker.stats().running
    assert worker.stop() and not (snapshots.config.dir / "style-queue.db").exists()


CHILD = """
import os, signal, sys, time
from pathlib import Path
from edge_agent.delivery.snapshots import SnapshotConfig, SnapshotStore
from edge_agent.style.worker import PublishLater, StyleConfig, StyleSpec, StyleWorker
root, model, queue = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
store = SnapshotStore(SnapshotConfig(dir=root, mode="face"))
cfg = StyleConfig(enabled=True, styles=(StyleSpec("mosaic", model),), queue=queue, idle_after_s=0)
def publish(message):
    raise PublishLater("the broker is unreachable from this run")
worker = StyleWorker(cfg, store, lambda: True, publish, device_id="door-3", site="hq", poll_interval_s=0.05)
for line in sys.argv[4:]:
    event_id, ref = line.split("=")
    worker.enqueue(event_id, ref)
worker.start()
while worker.stats().stylized < 1:
    time.sleep(0.001)
print(worker.painter_pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # mid-queue: no stop(), no close()
"""


def test_kill_9_mid_queue_resumes(tmp_path, style_model, face_photo, snapshots, mosquitto, mqtt_links, consumer):
    cfg = config(tmp_path, StyleSpec("mosaic", style_model))
    events = [save_snapshot(snapshots, face_photo) for _ in range(4)]
    # the child cannot publish: what it painted before the kill must survive as queued messages
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(snapshots.config.dir), str(style_model), str(cfg.queue)]
        + [f"{e}={r}" for e, r in events],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-3000:]
    painter = int(child.stdout.split()[-1])  # the killed agent's painter process sees its stdin close and ends
    assert wait_until(lambda: not Path(f"/proc/{painter}").exists() or _zombie(painter), timeout=30)
    with StyleQueue.open(cfg.queue) as q:
        left, backlog = q.depth(), q.backlog()
    # killed at any point after its first image: that image's message is queued, every job is done or waiting
    assert backlog >= 1 and left + backlog >= 4
    worker = StyleWorker(
        cfg,
        snapshots,
        lambda: True,
        mqtt_publisher(mqtt_links(mosquitto)),
        device_id=DEVICE,
        site=SITE,
        poll_interval_s=0.05,
    )
    worker.start()
    try:
        want = {(e, "mosaic") for e, _ in events}
        assert wait_until(lambda: want <= consumer.received(), timeout=60), worker.stats()
        assert wait_until(lambda: worker.stats().queue_depth == 0 and worker.stats().unpublished == 0)
        for _, ref in events:
            assert decode(snapshots.config.dir / stylized_ref(ref, "mosaic")).size > 0
        assert worker.stats().done == 4  # the persistent counter spans both runs
        assert worker.stats().stylized == 4 - backlog  # what the killed run painted is not painted again
    finally:
        worker.stop(30.0)


def test_a_painter_process_that_dies_is_replaced(
    tmp_path, style_model, face_photo, snapshots, workers, monkeypatch, caplog
):
    import edge_agent.style.worker as style_worker

    monkeypatch.setattr(style_worker, "PAINTER_RESTART_S", (0.2, 1.0))
    sent: list[StylizedSnapshot] = []
    gate = Switch(True)
    worker = workers(config(tmp_path, StyleSpec("mosaic", style_model)), snapshots, gate, sent.append)
    worker.enqueue(*save_snapshot(snapshots, face_photo))
    assert wait_until(lambda: len(sent) == 1, timeout=30)
    gate.idle = False
    first = worker.painter_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)  # a model that crashes its process, or the OOM killer
    event_id, ref = save_snapshot(snapshots, face_photo)
    worker.enqueue(event_id, ref)
    gate.idle = True
    assert wait_until(lambda: len(sent) == 2, timeout=60), worker.stats()
    assert sent[1].event_id == event_id and worker.painter_pid not in (None, first)
    stats = worker.stats()
    assert stats.painter_restarts == 1 and stats.failed == 0 and stats.running
    assert "a new painter in" in caplog.text


def test_the_painter_process_ends_with_the_worker(tmp_path, style_model, face_photo, snapshots):
    worker = StyleWorker(
        config(tmp_path, StyleSpec("mosaic", style_model)),
        snapshots,
        lambda: True,
        lambda m: None,
        device_id=DEVICE,
        site=SITE,
        poll_interval_s=0.05,
    )
    worker.start()
    worker.enqueue(*save_snapshot(snapshots, face_photo))
    assert wait_until(lambda: worker.stats().stylized == 1, timeout=30)
    pid = worker.painter_pid
    assert pid is not None and Path(f"/proc/{pid}").exists()
    assert worker.stop(10.0)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True
