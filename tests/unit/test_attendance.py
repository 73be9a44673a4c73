"""AttendanceGate: one event per person per camera per window, unknowns only when enabled (one per track), bounded
memory, thread safety; and decisions the recognizer made from real embeddings going through it."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import cv2
import facesets
import numpy as np
import pytest

from edge_agent.recognition.attendance import AttendanceConfig, AttendanceGate
from edge_agent.recognition.recognizer import DecisionReason, RecognitionConfig, Recognizer, TrackDecision, Trigger
from models.config import load_dataclass
from models.errors import ConfigError

WALL = datetime(2025, 1, 6, 8, 30, tzinfo=timezone.utc)
FRAME = np.zeros((4, 4, 3), np.uint8)


def decision(person: str | None, ts: float, *, camera: str = "front", track: int = 1) -> TrackDecision:
    return TrackDecision(
        camera=camera,
        track_id=track,
        person_id=person,
        name=None if person is None else person.title(),
        distance=0.4,
        margin=0.3,
        threshold=0.55,
        rule="distance",
        gallery_version=1,
        fingerprint="fp",
        first_seen_ts=ts - 1.0,
        decided_ts=ts,
        first_seen_wall=WALL,
        decided_wall=WALL,
        samples=3,
        vote_share=1.0,
        candidate=person,
        reason=DecisionReason.ACCEPTED if person else DecisionReason.REJECTED,
        trigger=Trigger.EVIDENCE,
        frame=FRAME,
        bbox=(0.0, 0.0, 2.0, 2.0),
        frame_ts=ts - 0.5,
        embedding=np.zeros(128, np.float32),
        quality=0.9,
    )


def test_one_event_per_person_per_camera_per_window() -> None:
    gate = AttendanceGate(AttendanceConfig(window_s=300.0))
    assert gate.admit(decision("ann", 1000.0, track=1))
    assert not gate.admit(decision("ann", 1010.0, track=2))  # back ten seconds later: same window
    assert not gate.admit(decision("ann", 1299.0, track=3))
    assert gate.admit(decision("bob", 1010.0, track=4))  # somebody else
    assert gate.admit(decision("ann", 1010.0, camera="back", track=1))  # another door
    # the window runs from the admitted event, not from the last sighting
    assert gate.admit(decision("ann", 1300.0, track=5))
    assert not gate.admit(decision("ann", 1301.0, track=6))
    stats = gate.stats()
    assert (stats.admitted_known, stats.suppressed_repeat, stats.admitted_unknown) == (4, 3, 0)


def test_unknowns_are_refused_unless_enabled_then_one_per_track() -> None:
    off = AttendanceGate()
    assert not off.admit(decision(None, 10.0, track=7))
    assert off.stats().suppressed_unknown == 1 and off.stats().entries == 0
    on = AttendanceGate(AttendanceConfig(unknown_events=True))
    assert on.admit(decision(None, 10.0, track=7))
    assert not on.admit(decision(None, 11.0, track=7))  # the same track replayed
    assert on.admit(decision(None, 11.0, track=8))  # each stranger's track once
    assert on.admit(decision(None, 11.0, track=7, camera="back"))
    assert on.stats().admitted_unknown == 3 and on.stats().suppressed_repeat == 1


def test_a_zero_window_admits_every_decision() -> None:
    gate = AttendanceGate(AttendanceConfig(window_s=0.0))
    assert all(gate.admit(decision("ann", 5.0, track=t)) for t in range(3))


def test_old_entries_expire_and_memory_stays_bounded() -> None:
    gate = AttendanceGate(AttendanceConfig(window_s=60.0, unknown_events=True))
    for i in range(1000):
        assert gate.admit(decision(f"p{i}", float(i), track=i))
    # only the last minute's people are remembered
    assert gate.stats().entries == 60
    assert gate.admit(decision("p999", 1059.0, track=2000)) is True  # p999 was admitted at 999: window over
    small = AttendanceGate(AttendanceConfig(window_s=1e6, max_entries=10))
    for i in range(25):
        assert small.admit(decision(f"p{i}", float(i), track=i))
    assert small.stats().entries == 10 and small.stats().evicted_early == 15
    assert not small.admit(decision("p24", 30.0, track=99))  # the newest are kept
    assert small.admit(decision("p0", 30.0, track=98))  # the oldest were forgotten early (a possible duplicate)


def test_concurrent_admissions_let_exactly_one_through() -> None:
    gate = AttendanceGate()
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(k: int) -> None:
        barrier.wait()
        for j in range(200):
            ok = gate.admit(decision("ann", 100.0 + j * 0.001, track=k * 1000 + j))
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1 and len(results) == 1600
    assert gate.stats().suppressed_repeat == 1599


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"window_s": -1.0}, r"attendance\.window_s: must be a finite number >= 0, got -1\.0"),
        ({"window_s": float("inf")}, r"attendance\.window_s"),
        ({"unknown_events": 1}, r"attendance\.unknown_events: expected true or false"),
        ({"max_entries": 0}, r"attendance\.max_entries: must be an integer >= 1"),
    ],
)
def test_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AttendanceConfig(**values)


def test_config_loads_strictly() -> None:
    assert load_dataclass(AttendanceConfig, {"window_s": 600, "unknown_events": True}, "attendance") == (
        AttendanceConfig(window_s=600.0, unknown_events=True)
    )
    with pytest.raises(ConfigError, match=r"attendance\.window: unknown key"):
        load_dataclass(AttendanceConfig, {"window": 600}, "attendance")


def test_real_embeddings_two_tracks_of_one_person_make_one_event() -> None:
    """A person's track is decided from real photo embeddings, the person leaves and comes back (a second track a
    minute later): two decisions for the same person, one event; a stranger's track is refused."""
    from edge_agent.gallery.index import GalleryIndex
    from edge_agent.recognition.tracker import Tracker
    from models.contract.gallery import Gallery, GalleryPerson
    from models.face.pipeline import FacePipeline
    from models.types import Detection

    pipe = FacePipeline.create()
    try:

        def embed(path: Path) -> tuple[np.ndarray, Detection, np.ndarray]:
            rgb = np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])
            face = max(pipe.detect(rgb), key=lambda d: d.width)
            chip = pipe.aligner.align(rgb, [face])
            return pipe.encoder.encode(chip)[0], face, chip[0]

        ann = facesets.photos("Angelina_Jolie")
        matt = facesets.photos("Matt_Damon")
        gallery = Gallery(
            "hq",
            1,
            pipe.fingerprint,
            "euclidean",
            "float32",
            np.stack([embed(ann[0])[0], embed(matt[0])[0]]),
            np.array([0, 1], dtype=np.int32),
            (GalleryPerson("ann", "Angelina Jolie"), GalleryPerson("matt", "Matt Damon")),
        )
        index = GalleryIndex.build(gallery)
        recognizer = Recognizer("front", RecognitionConfig(min_samples=2, max_encodes=2), fingerprint=pipe.fingerprint)
        tracker = Tracker(camera="front")
        decisions: list[TrackDecision] = []
        box = Detection(
            (100.0, 100.0, 200.0, 200.0), 0.99, ((130, 140), (170, 140), (150, 160), (135, 180), (165, 180))
        )
        for start, photos in ((0.0, ann[1:3]), (60.0, ann[3:5]), (120.0, facesets.photos("Paul_Rudd")[:1] * 2)):
            ts = start
            tracker.update([box], ts)  # the visit's track: tentative, then one real photo per frame
            for path in photos:
                ts += 0.2
                wanted = recognizer.observe(tracker.update([box], ts), FRAME, WALL)
                emb, face, chip = embed(path)
                quality = recognizer.assess(face, chip)
                assert wanted and quality.accepted
                recognizer.add_samples(wanted, [quality], emb[None], index.search(emb, k=3), 1, ts, FRAME)
                decisions += recognizer.decide((), index, ts, WALL)
            decisions += recognizer.decide(tracker.flush(), index, ts + 0.2, WALL)
    finally:
        pipe.close()
    assert [(d.person_id, d.track_id, d.samples) for d in decisions] == [("ann", 1, 2), ("ann", 2, 2), (None, 3, 2)]
    gate = AttendanceGate(AttendanceConfig(window_s=300.0))
    admitted = [d for d in decisions if gate.admit(d)]
    assert [d.person_id for d in admitted] == ["ann"]
    # the same decisions a window later: counted again
    later = [replace(d, decided_ts=d.decided_ts + 400.0) for d in decisions if d.person_id == "ann"]
    assert sum(gate.admit(d) for d in later) == 1
