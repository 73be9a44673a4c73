"""The inference worker end to end: a rendered door video (enrolled people shown on photos the gallery never saw,
strangers the gallery never saw at all), real models, a real gallery index, a real CameraSet reading the file.

Every decision is traced back to the ground truth through its best frame and box, so "the stranger is never
recognised" is checked on the stranger's own tracks, not inferred from counts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.capture import CameraConfig, CameraSet
from edge_agent.devtools.videogen import GroundTruth, VideoSpec, generate_video, plan_appearances
from edge_agent.gallery.index import GalleryIndex, IndexHolder
from edge_agent.recognition.attendance import AttendanceConfig, AttendanceGate
from edge_agent.recognition.recognizer import DecisionReason, TrackDecision
from edge_agent.recognition.tracker import iou_matrix
from edge_agent.recognition.worker import InferenceWorker, VideoRun, WorkerConfig, run_video
from models.contract.gallery import Gallery, GalleryPerson
from models.errors import BackendError
from models.face.pipeline import FacePipeline

log = logging.getLogger(__name__)

ENROLLED = ("Angelina_Jolie", "Barack_Obama", "Matt_Damon", "Jennifer_Aniston")
STRANGERS = ("Paul_Rudd", "Kate_Siegel")
# enrolled but never shown: Leonardo DiCaprio is the test set's nearest look-alike of Matt Damon
DISTRACTORS = (
    "Leonardo_DiCaprio",
    "Scarlett_Johansson",
    "Katy_Perry",
    "George_Clooney",
    "Mark_Zuckerberg",
    "Elon_Musk",
)
SEED = 11


@pytest.fixture(scope="module")
def enrollment(people: dict[str, tuple[Path, ...]]) -> dict[str, list[Path]]:
    """Up to three photos per enrolled person and distractor; the video shows an enrolled person on another one."""
    out = {p: list(people[p][:-1][:3]) for p in ENROLLED}
    out.update({p: list(people[p][:3]) for p in DISTRACTORS})
    return out


@pytest.fixture(scope="module")
def index(pipeline: FacePipeline, enrollment: dict[str, list[Path]]) -> GalleryIndex:
    vectors, labels, persons = [], [], []
    for label, person in enumerate(enrollment):
        persons.append(GalleryPerson(person.lower(), person.replace("_", " ")))
        for photo in enrollment[person]:
            faces = pipeline.embed(np.ascontiguousarray(cv2.imread(str(photo))[:, :, ::-1]))
            vectors.append(max(faces, key=lambda f: f.detection.width).embedding)
            labels.append(label)
    gallery = Gallery(
        "hq",
        7,
        pipeline.fingerprint,
        "euclidean",
        "float32",
        np.stack(vectors).astype(np.float32),
        np.array(labels, dtype=np.int32),
        tuple(persons),
    )
    return GalleryIndex.build(gallery)


@pytest.fixture(scope="module")
def video(
    pipeline: FacePipeline,
    people: dict[str, tuple[Path, ...]],
    enrollment: dict[str, list[Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, GroundTruth]:
    appearances = plan_appearances(
        people,
        enrolled=ENROLLED,
        strangers=STRANGERS,
        enrollment_photos=enrollment,
        seed=SEED,
        appearance_s=2.0,
        gap_s=1.0,
    )
    spec = VideoSpec(appearances, seed=SEED)  # 640 x 480 at 15 fps
    assert max(a.lanes for a in appearances) >= 2  # faces side by side at some point
    out = tmp_path_factory.mktemp("worker") / "door.avi"
    return out, generate_video(spec, out, detector=pipeline.detector)


@pytest.fixture(scope="module")
def result(video: tuple[Path, GroundTruth], pipeline: FacePipeline, index: GalleryIndex) -> VideoRun:
    run = run_video(video[0], pipeline, index, camera="front")
    log.info("run_video figures: %s", run.figures())
    return run


def owner(decision: TrackDecision, truth: GroundTruth) -> str:
    """The person whose ground-truth box the decision's best box overlaps, on the decision's best frame."""
    frame = round(decision.frame_ts * truth.fps)
    best, who = 0.0, "?"
    for index in (frame - 1, frame, frame + 1):
        for appearance, box in truth.faces_at(index):
            overlap = iou_matrix(np.array([decision.bbox]), np.array([box.box]))[0, 0]
            if overlap > best:
                best, who = overlap, appearance.person
    assert best > 0.3, (decision, frame)
    return who


def test_enrolled_people_are_recognised_and_strangers_never_are(
    result: VideoRun, video: tuple[Path, GroundTruth]
) -> None:
    truth = video[1]
    assert result.frames == truth.frame_count  # realtime=False: every frame processed
    by_person: dict[str, list[TrackDecision]] = {}
    for d in result.decisions:
        by_person.setdefault(owner(d, truth), []).append(d)
        assert d.camera == "front" and d.fingerprint and d.gallery_version == 7
        assert d.frame.shape == (truth.height, truth.width, 3) and d.samples >= 1
    assert set(by_person) <= {*ENROLLED, *STRANGERS}
    for person in ENROLLED:
        got = [d.person_id for d in by_person.get(person, [])]
        assert person.lower() in got, (person, got)
        assert set(got) <= {person.lower(), None}, (person, got)  # never somebody else
        known = next(d for d in by_person[person] if d.person_id)
        assert known.name == person.replace("_", " ") and known.distance is not None
        assert known.distance <= known.threshold and known.margin is not None and known.margin > 0
        assert known.reason is DecisionReason.ACCEPTED
        assert known.decided_ts - known.first_seen_ts < 2.0  # decided while the person walks up, not after
    for person in STRANGERS:
        decisions = by_person.get(person, [])
        assert decisions, f"{person} was never decided"
        assert all(d.person_id is None and d.name is None for d in decisions), decisions
        assert all(d.distance is not None and d.distance > d.threshold for d in decisions)
    # a person standing in front of the camera is decided once (tracks may split on a long occlusion)
    assert len(result.decisions) <= len(truth.appearances) + 2


def test_the_attendance_gate_admits_exactly_one_event_per_enrolled_person(result: VideoRun) -> None:
    assert sorted(d.person_id for d in result.admitted) == sorted(p.lower() for p in ENROLLED)
    # the same decisions, replayed within the window at another moment of the day: nothing new
    gate = AttendanceGate(AttendanceConfig(window_s=300.0, unknown_events=True))
    first = [d for d in result.decisions if gate.admit(d)]
    assert sum(d.person_id is not None for d in first) == len(ENROLLED)
    assert (
        sum(d.person_id is None for d in first) == sum(d.person_id is None for d in result.decisions) >= len(STRANGERS)
    )
    assert not any(gate.admit(d) for d in result.decisions)


def test_figures_are_measured_and_published_as_numbers(result: VideoRun) -> None:
    stats = result.stats
    assert stats.warmed_up and not stats.running and stats.frames == result.frames
    assert stats.frames_failed == 0 and stats.callback_errors == 0
    assert stats.detect_ms > 0 and stats.align_ms > 0 and stats.encode_ms > 0 and stats.frame_ms > 0
    assert stats.frame_ms >= stats.detect_ms
    assert 1 <= stats.encode_batch <= 4
    # encode only when needed: far fewer chips than faces seen
    assert 0 < stats.encodes < stats.faces / 2
    assert stats.decisions_known + stats.decisions_unknown == len(result.decisions)
    flat = stats.to_dict()
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat.values()), flat
    assert flat["frames_total"] == result.frames and flat["encodes_total"] == stats.encodes
    assert flat["camera.front.frames_total"] == result.frames and "camera.front.fps" in flat
    assert flat["detect_ms"] == stats.detect_ms and flat["warmed_up"] == 1.0
    assert flat["seconds_since_face"] >= 0
    figures = result.figures()
    assert figures["fps"] > 0 and figures["frames"] == result.frames
    assert result.fps == pytest.approx(result.frames / result.wall_s)


def test_without_a_gallery_every_face_is_unknown(video: tuple[Path, GroundTruth], pipeline: FacePipeline) -> None:
    run = run_video(video[0], pipeline, None, camera="front")
    assert run.decisions
    for d in run.decisions:
        assert d.person_id is None and d.distance is None and d.margin is None
        assert d.gallery_version == 0 and d.reason is DecisionReason.NO_GALLERY
    assert run.admitted == ()  # unknown events are off by default


class FlakyPipeline(FacePipeline):
    """The real pipeline, but its detector fails on every 10th frame (a backend hiccup)."""

    def __init__(self, inner: FacePipeline) -> None:
        super().__init__(inner.detector, inner.encoder, inner.aligner)
        self.calls = 0

    def detect(self, image: np.ndarray) -> list:
        self.calls += 1
        if self.calls % 10 == 0:
            raise BackendError("detector: simulated failure")
        return super().detect(image)


def test_the_worker_survives_model_and_callback_failures(
    video: tuple[Path, GroundTruth], pipeline: FacePipeline, index: GalleryIndex, caplog: pytest.LogCaptureFixture
) -> None:
    cameras = CameraSet([CameraConfig("front", str(video[0]), realtime=False)])
    decisions: list[TrackDecision] = []
    failed_once = threading.Event()

    def on_decision(decision: TrackDecision) -> None:
        decisions.append(decision)
        if not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("outbox unavailable")

    worker = InferenceWorker(
        FlakyPipeline(pipeline), cameras, IndexHolder(index), on_decision, config=WorkerConfig(clock="media")
    )
    worker.start()
    assert worker.wait_ready(30)
    cameras.start()
    try:
        assert worker.wait_sources_ended(120)
    finally:
        worker.stop()
        cameras.stop()
    stats = worker.stats()
    assert stats.frames_failed == (stats.frames + stats.frames_failed + 1) // 10 > 0
    assert stats.callback_errors == 1
    assert "simulated failure" in caplog.text and "outbox unavailable" in caplog.text
    assert {d.person_id for d in decisions} >= {p.lower() for p in ENROLLED} - {None}


def test_stop_is_clean_and_decides_the_tracks_in_progress(
    video: tuple[Path, GroundTruth], pipeline: FacePipeline, index: GalleryIndex
) -> None:
    """A looping file (a camera that never ends) in real time: stop() mid-video ends the thread promptly, and the
    tracks alive at that moment are decided rather than lost."""
    cameras = CameraSet([CameraConfig("front", str(video[0]), loop=True)])
    decisions: list[TrackDecision] = []
    worker = InferenceWorker(pipeline, cameras, IndexHolder(index), decisions.append)
    worker.start()
    assert worker.wait_ready(30)
    cameras.start()
    try:
        # stop shortly after the first face is tracked, while that person is in front of the camera
        deadline = time.monotonic() + 30
        while not worker.idle().faces_present and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        idle = worker.idle()
        started = time.monotonic()
        worker.stop(timeout=5)
        stopped_in = time.monotonic() - started
    finally:
        cameras.stop()
    assert not worker.running and stopped_in < 2.0
    assert idle.faces_present and not idle.quiet_for(1.0)
    assert idle.seconds_since_face is not None and idle.seconds_since_face < 1.0
    assert 0.0 < idle.load <= 1.0
    assert decisions, "the track in progress was not decided at stop"
    assert worker.idle().faces_present is False
    assert math.isfinite(worker.stats().fps)
