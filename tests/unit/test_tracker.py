"""IoU tracker: association, ids, confirmation, ending by misses / age / flush, prediction; and real detections of a
rendered door video (one track per appearance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from detections import det as face_box

from edge_agent.recognition.tracker import EndReason, Tracker, TrackerConfig, greedy_match, iou_matrix
from models.config import load_dataclass
from models.errors import ConfigError
from models.types import Detection


def det(x: float, y: float, size: float = 80.0, score: float = 0.99) -> Detection:
    return face_box(x, y, size, score)


def test_iou_matrix_and_greedy_match() -> None:
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]], float)
    iou = iou_matrix(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == pytest.approx(50 / 150)
    assert iou[1].max() == 0.0
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 3)
    # the best pair is taken first, and each row / column is used once
    assert greedy_match(np.array([[0.9, 0.8], [0.85, 0.1]]), 0.3) == [(0, 0)]
    assert sorted(greedy_match(np.array([[0.9, 0.8], [0.85, 0.1]]).T, 0.05)) == [(0, 0), (1, 1)]
    assert greedy_match(np.array([[0.2]]), 0.3) == []
    # degenerate (zero-area) boxes overlap nothing
    assert iou_matrix(np.array([[5, 5, 5, 5]], float), np.array([[5, 5, 5, 5]], float))[0, 0] == 0.0


def test_a_moving_face_keeps_its_id_and_is_confirmed_after_min_hits() -> None:
    tracker = Tracker(TrackerConfig(min_hits=3), camera="door")
    ids, confirmed = [], []
    for i in range(10):
        update = tracker.update([det(100 + 6 * i, 100 + 2 * i, 80 + 3 * i)], ts=i / 15)
        assert len(update.matched) == 1 and not update.ended
        ids.append(update.matched[0].track_id)
        confirmed.append(update.matched[0].confirmed)
        assert update.matched[0].first_seen == 0.0
        assert update.matched[0].hits == i + 1
    assert set(ids) == {1}
    assert confirmed == [False, False] + [True] * 8
    assert tracker.live == 1


def test_two_faces_side_by_side_keep_their_ids_and_a_newcomer_gets_the_next_id() -> None:
    tracker = Tracker()
    first = tracker.update([det(50, 100), det(400, 100)], ts=0.0)
    left, right = (t.track_id for t in sorted(first.matched, key=lambda t: t.detection.bbox[0]))
    for i in range(1, 6):
        # detections arrive in either order
        dets = [det(400 - 3 * i, 100), det(50 + 3 * i, 100)]
        update = tracker.update(dets if i % 2 else dets[::-1], ts=i / 15)
        by_x = {t.detection.bbox[0] < 300: t.track_id for t in update.matched}
        assert by_x == {True: left, False: right}
    update = tracker.update([det(50 + 18, 100), det(400 - 18, 100), det(250, 300)], ts=6 / 15)
    assert sorted(t.track_id for t in update.matched) == [1, 2, 3]
    assert update.live == 3


def test_a_one_frame_false_detection_ends_tentative() -> None:
    tracker = Tracker(TrackerConfig(min_hits=2))
    assert not tracker.update([det(10, 10)], ts=0.0).matched[0].confirmed
    update = tracker.update([], ts=0.1)
    assert [(e.track_id, e.confirmed, e.reason) for e in update.ended] == [(1, False, EndReason.TENTATIVE)]
    assert tracker.live == 0
    # ids are never reused
    assert tracker.update([det(10, 10)], ts=0.2).matched[0].track_id == 2


def test_a_confirmed_track_survives_short_misses_and_ends_after_max_missed_frames() -> None:
    tracker = Tracker(TrackerConfig(max_missed_frames=3, max_age_s=100.0))
    for i in range(3):
        tracker.update([det(100, 100)], ts=i * 0.05)
    # a two-frame miss (a hand over the face) keeps the track
    assert not tracker.update([], ts=0.15).ended
    assert not tracker.update([], ts=0.20).ended
    update = tracker.update([det(100, 100)], ts=0.25)
    assert update.matched[0].track_id == 1 and update.matched[0].hits == 4
    ended = []
    for i in range(3):
        ended += tracker.update([], ts=0.3 + i * 0.05).ended
    assert [(e.track_id, e.reason, e.hits, e.last_seen) for e in ended] == [(1, EndReason.LOST, 4, 0.25)]
    assert ended[0].confirmed and ended[0].first_seen == 0.0


def test_a_track_ends_by_age_when_frames_are_sparse_and_expire_ages_a_silent_camera() -> None:
    tracker = Tracker(TrackerConfig(max_missed_frames=100, max_age_s=1.0))
    tracker.update([det(100, 100)], ts=0.0)
    tracker.update([det(100, 100)], ts=0.1)
    assert not tracker.update([], ts=0.9).ended
    update = tracker.update([], ts=1.2)
    assert [(e.track_id, e.reason) for e in update.ended] == [(1, EndReason.EXPIRED)]
    # a camera that stops delivering frames: expire() with the clock alone
    tracker.update([det(300, 100)], ts=2.0)
    tracker.update([det(300, 100)], ts=2.1)
    assert tracker.expire(2.5) == ()
    assert [e.track_id for e in tracker.expire(3.2)] == [2]
    assert tracker.live == 0


def test_flush_ends_every_track_and_time_going_back_is_tolerated() -> None:
    tracker = Tracker()
    tracker.update([det(10, 10), det(300, 10)], ts=5.0)
    update = tracker.update([det(10, 10), det(300, 10)], ts=4.0)  # clock went back: treated as "now"
    assert len(update.matched) == 2 and all(t.confirmed for t in update.matched)
    ended = tracker.flush()
    assert sorted(e.track_id for e in ended) == [1, 2]
    assert {e.reason for e in ended} == {EndReason.FLUSHED}
    assert tracker.live == 0 and tracker.flush() == ()


def test_velocity_prediction_bridges_frames_the_worker_skipped() -> None:
    """A face walking fast: 30 px per frame at 15 fps; the worker takes every third frame (90 px jumps on an 80 px
    box: no overlap at all between consecutive observations). The predicted box still overlaps."""
    tracker = Tracker(TrackerConfig(iou_threshold=0.3))
    for i in range(4):  # every frame at first: the velocity is learned
        update = tracker.update([det(30 * i, 100)], ts=i / 15)
    for i in range(6, 18, 3):
        update = tracker.update([det(30 * i, 100)], ts=i / 15)
        assert [t.track_id for t in update.matched] == [1], i
    # without the prediction the same jumps would open a new track each time
    assert iou_matrix(np.array([det(30 * 6, 100).bbox]), np.array([det(30 * 9, 100).bbox]))[0, 0] == 0.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"iou_threshold": 0.0}, r"tracker\.iou_threshold: must be in \(0, 1\)"),
        ({"iou_threshold": 1.0}, r"tracker\.iou_threshold"),
        ({"max_missed_frames": 0}, r"tracker\.max_missed_frames: must be an integer >= 1, got 0"),
        ({"min_hits": 0}, r"tracker\.min_hits"),
        ({"max_age_s": 0.0}, r"tracker\.max_age_s: must be a finite number > 0"),
        ({"max_age_s": float("inf")}, r"tracker\.max_age_s"),
    ],
)
def test_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrackerConfig(**values)


def test_config_loads_strictly() -> None:
    cfg = load_dataclass(TrackerConfig, {"iou_threshold": 0.4, "min_hits": 3}, "tracker")
    assert cfg == TrackerConfig(iou_threshold=0.4, min_hits=3)
    with pytest.raises(ConfigError, match=r"tracker\.max_hits: unknown key"):
        load_dataclass(TrackerConfig, {"max_hits": 3}, "tracker")


def test_real_detections_of_a_rendered_video_give_one_track_per_appearance(test_faces: Path) -> None:
    """The real detector on a rendered door video (three people, two of them side by side, occluders and motion
    blur): each appearance is one confirmed track, and tracks never mix people."""
    from edge_agent.devtools.videogen import Appearance, VideoRenderer, VideoSpec, load_people
    from models.face.detector import RetinaFaceDetector

    people = load_people(test_faces)
    spec = VideoSpec(
        (
            Appearance("Matt_Damon", people["Matt_Damon"][1], 0.3, 2.3, True, 0, 2),
            Appearance("Barack_Obama", people["Barack_Obama"][1], 0.6, 2.6, True, 1, 2),
            Appearance("Paul_Rudd", people["Paul_Rudd"][0], 3.6, 5.3, False),
        ),
        seed=5,
        fps=15.0,
    )
    detector = RetinaFaceDetector.create()
    try:
        renderer = VideoRenderer(spec, detector)
        tracker = Tracker(TrackerConfig(), camera="door")
        owner: dict[int, set[str]] = {}
        ended = []
        for index in range(spec.frame_count):
            update = tracker.update(
                detector.detect(np.ascontiguousarray(renderer.frame(index)[:, :, ::-1])), index / 15
            )
            ended += update.ended
            truth = renderer.truth.faces_at(index)
            for face in update.matched:
                for appearance, box in truth:
                    if iou_matrix(np.array([face.detection.bbox]), np.array([box.box]))[0, 0] > 0.4:
                        owner.setdefault(face.track_id, set()).add(appearance.person)
        ended += tracker.flush()
    finally:
        detector.close()
    confirmed = [e for e in ended if e.confirmed]
    assert len(confirmed) == 3, confirmed
    assert all(len(owner.get(e.track_id, ())) == 1 for e in confirmed), owner
    assert sorted(next(iter(owner[e.track_id])) for e in confirmed) == ["Barack_Obama", "Matt_Damon", "Paul_Rudd"]
    assert [e.track_id for e in confirmed] == sorted(e.track_id for e in confirmed)
