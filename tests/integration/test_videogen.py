"""Video generator: the file reads back, the ground truth follows the schedule, our detector and encoder can use the
faces (that is what makes the videos worth anything), and the same seed gives the same video."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.devtools.videogen import (
    OCCLUSION_RANGE,
    Appearance,
    GroundTruth,
    VideoRenderer,
    VideoSpec,
    generate_video,
    load_people,
    plan_appearances,
    truth_path,
)
from models.errors import VideoGenError
from models.face.pipeline import FacePipeline

# their photos agree with each other (< 0.45 between any two): the test measures the generator, not the data set
ENROLLED = ("Angelina_Jolie", "Barack_Obama", "Matt_Damon")
STRANGER = "Paul_Rudd"  # one photo only: never enrolled in the test set
SEED = 3


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def read_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def rgb(bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bgr[:, :, ::-1])


@pytest.fixture(scope="module")
def enrollment(people: dict[str, tuple[Path, ...]]) -> dict[str, list[Path]]:
    return {p: [people[p][0]] for p in ENROLLED}


@pytest.fixture(scope="module")
def spec(people: dict[str, tuple[Path, ...]], enrollment: dict[str, list[Path]]) -> VideoSpec:
    appearances = plan_appearances(
        people,
        enrolled=ENROLLED,
        strangers=[STRANGER],
        enrollment_photos=enrollment,
        seed=SEED,
        appearance_s=2.0,
        gap_s=1.0,
    )
    return VideoSpec(appearances, seed=SEED)


@pytest.fixture(scope="module")
def video(
    spec: VideoSpec, pipeline: FacePipeline, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, GroundTruth]:
    out = tmp_path_factory.mktemp("video") / "door.avi"
    written: list[int] = []
    truth = generate_video(spec, out, written.append, detector=pipeline.detector)
    assert sum(written) == spec.frame_count
    return out, truth


def test_schedule_is_short_with_a_multi_face_group(spec: VideoSpec) -> None:
    assert len(spec.appearances) == 4
    assert {a.person for a in spec.appearances} == {*ENROLLED, STRANGER}
    assert any(a.lanes > 1 for a in spec.appearances)  # this seed puts two or three faces in the frame at once
    assert spec.frame_count / spec.fps <= 10.0


def test_video_reads_back(video: tuple[Path, GroundTruth], spec: VideoSpec) -> None:
    path, truth = video
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(spec.fps)
    cap.release()
    frames = read_frames(path)
    assert len(frames) == spec.frame_count == truth.frame_count
    assert {f.shape for f in frames} == {(spec.height, spec.width, 3)}
    assert not list(path.parent.glob(".*partial*"))
    assert GroundTruth.load(truth_path(path)) == truth
    assert truth.video == path.name


def test_truth_follows_the_schedule(
    video: tuple[Path, GroundTruth], spec: VideoSpec, enrollment: dict[str, list[Path]]
) -> None:
    _, truth = video
    assert len(truth.appearances) == len(spec.appearances)
    for planned, shown in zip(spec.appearances, truth.appearances, strict=True):
        assert (shown.person, shown.photo, shown.enrolled) == (planned.person, str(planned.photo), planned.enrolled)
        assert shown.start_frame == math.ceil(planned.start_s * spec.fps - 1e-9)
        assert shown.end_frame == math.ceil(planned.end_s * spec.fps - 1e-9)
        assert [b.frame for b in shown.boxes] == list(range(shown.start_frame, shown.end_frame))
        heights = [b.box[3] - b.box[1] for b in shown.boxes]
        assert spec.min_face_px * 0.99 <= heights[0] < heights[-1] <= spec.max_face_px * 1.01  # approaching
        assert all(
            0 <= b.box[0] < b.box[2] <= spec.width and 0 <= b.box[1] < b.box[3] <= spec.height for b in shown.boxes
        )
        occluded = [b.occluded for b in shown.boxes if b.occluded]
        assert 0.15 * len(heights) <= len(occluded) <= 0.35 * len(heights)
        assert all(OCCLUSION_RANGE[0] <= f <= OCCLUSION_RANGE[1] for f in occluded)
        if planned.enrolled:  # shown with a photo the gallery never saw
            assert planned.photo not in enrollment[planned.person]
    faces_per_frame = [len(truth.faces_at(i)) for i in range(truth.frame_count)]
    assert max(faces_per_frame) >= 2
    assert faces_per_frame.count(0) >= 2 * spec.fps  # the lead-in, the gaps and the tail


def test_detector_finds_the_scheduled_faces_and_nothing_else(
    video: tuple[Path, GroundTruth], pipeline: FacePipeline
) -> None:
    path, truth = video
    found = scheduled = found_occluded = occluded = gap_frames = gap_hits = 0
    for index, frame in enumerate(read_frames(path)):
        detections = pipeline.detect(rgb(frame))
        faces = truth.faces_at(index)
        if not faces:
            gap_frames += 1
            gap_hits += bool(detections)
            continue
        for _, face in faces:
            hit = any(iou(d.bbox, face.box) > 0.4 for d in detections)
            scheduled += 1
            found += hit
            if face.occluded:
                occluded += 1
                found_occluded += hit
    assert found / scheduled >= 0.8, f"{found}/{scheduled} faces found"
    assert found_occluded / occluded >= 0.6, f"{found_occluded}/{occluded} occluded faces found"
    assert gap_hits <= 0.02 * gap_frames, f"detections in {gap_hits}/{gap_frames} faceless frames"


def test_encoder_recognises_the_people_in_the_video(
    video: tuple[Path, GroundTruth], pipeline: FacePipeline, enrollment: dict[str, list[Path]]
) -> None:
    """Unoccluded frames against each enrolled person's enrollment photo (a different photo from the one shown).

    Small (far) faces lose identity detail as they would on a real camera; near ones must stay within 0.1 of the
    distance between the two photos themselves: the generator must not be what makes recognition fail.
    """
    path, truth = video

    def embed_photo(photo: Path | str) -> np.ndarray:
        faces = pipeline.embed(rgb(cv2.imread(str(photo))))
        return max(faces, key=lambda f: f.detection.width).embedding

    gallery = {person: embed_photo(photos[0]) for person, photos in enrollment.items()}
    frames = read_frames(path)
    same, same_near, other = [], [], []
    for shown in truth.appearances:
        near = []
        for box in shown.boxes[::3]:
            if box.occluded:
                continue
            for face in pipeline.embed(rgb(frames[box.frame])):
                if iou(face.detection.bbox, box.box) <= 0.4:
                    continue
                for person, reference in gallery.items():
                    d = float(np.linalg.norm(face.embedding - reference))
                    if person != shown.person:
                        other.append(d)
                        continue
                    same.append(d)
                    if box.box[3] - box.box[1] >= 100:
                        near.append(d)
        if shown.enrolled:
            photos_apart = float(np.linalg.norm(embed_photo(shown.photo) - gallery[shown.person]))
            assert np.median(near) <= photos_apart + 0.1, (shown.person, photos_apart, near)
            same_near += near
    assert np.median(same) < 0.5 and np.mean(np.array(same) < 0.5) >= 0.7, sorted(same)
    assert np.mean(np.array(same_near) < 0.5) >= 0.9, sorted(same_near)
    assert np.mean(np.array(other) > 0.6) >= 0.95, sorted(other)[:10]


def test_same_seed_same_video(spec: VideoSpec, pipeline: FacePipeline, tmp_path: Path) -> None:
    def digest(s: VideoSpec) -> str:
        h = hashlib.sha256()
        for frame in VideoRenderer(s, pipeline.detector).frames():
            h.update(frame.tobytes())
        return h.hexdigest()

    short = VideoSpec(spec.appearances[:1], seed=SEED)
    assert digest(short) == digest(short)
    assert digest(short) != digest(VideoSpec(spec.appearances[:1], seed=SEED + 1))
    a, b = tmp_path / "a.avi", tmp_path / "b.avi"
    generate_video(short, a, detector=pipeline.detector)
    generate_video(short, b, detector=pipeline.detector)
    assert a.read_bytes() == b.read_bytes()


def test_mp4_output_reads_back(spec: VideoSpec, pipeline: FacePipeline, tmp_path: Path) -> None:
    short = VideoSpec(spec.appearances[:1], seed=SEED, width=320, height=240, max_face_px=120)
    truth = generate_video(short, tmp_path / "door.mp4", detector=pipeline.detector)
    frames = read_frames(tmp_path / "door.mp4")
    assert len(frames) == truth.frame_count and frames[0].shape == (240, 320, 3)


# --- planning and errors --------------------------------------------------------------------------------------------
def test_plan_shows_unseen_photos_and_is_deterministic(people: dict[str, tuple[Path, ...]]) -> None:
    enrolled = sorted(p for p, photos in people.items() if len(photos) >= 2)
    enrollment = {p: list(people[p][:-1]) for p in enrolled}  # leaves exactly one photo each to show
    plan = plan_appearances(people, enrolled=enrolled, enrollment_photos=enrollment, seed=1)
    assert plan == plan_appearances(people, enrolled=enrolled, enrollment_photos=enrollment, seed=1)
    assert plan != plan_appearances(people, enrolled=enrolled, enrollment_photos=enrollment, seed=2)
    assert {a.person: a.photo for a in plan} == {p: people[p][-1] for p in enrolled}
    assert all(1 <= a.lanes <= 3 for a in plan)
    VideoSpec(plan)  # lanes never collide


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enrolled": [], "strangers": []}, "no people"),
        ({"enrolled": ["Paul_Rudd"]}, "every photo of 'Paul_Rudd' was used"),
        ({"enrolled": ["Nobody"]}, "no photos for 'Nobody'"),
        ({"enrolled": ["Joe_Biden"], "strangers": ["Joe_Biden"]}, "both"),
        ({"enrolled": ["Katy_Perry"]}, "no enrollment photos"),
        ({"enrolled": ["Joe_Biden"], "max_together": 4}, "max_together"),
    ],
)
def test_plan_errors(people: dict[str, tuple[Path, ...]], kwargs: dict, message: str) -> None:
    args = {"enrollment_photos": {"Paul_Rudd": people["Paul_Rudd"], "Joe_Biden": people["Joe_Biden"][:1]}, **kwargs}
    with pytest.raises(VideoGenError, match=message):
        plan_appearances(people, **args)


def test_spec_errors(people: dict[str, tuple[Path, ...]]) -> None:
    photo = people["Joe_Biden"][0]
    one = (Appearance("Joe_Biden", photo, 0.5, 2.0, True),)
    with pytest.raises(VideoGenError, match="frame size"):
        VideoSpec(one, width=641)
    with pytest.raises(VideoGenError, match="face sizes"):
        VideoSpec(one, min_face_px=300, max_face_px=200)
    with pytest.raises(VideoGenError, match="at least one appearance"):
        VideoSpec(())
    with pytest.raises(VideoGenError, match="start_s < end_s"):
        VideoSpec((Appearance("Joe_Biden", photo, 2.0, 1.0, True),))
    clash = (*one, Appearance("Katy_Perry", people["Katy_Perry"][0], 1.0, 3.0, False))
    with pytest.raises(VideoGenError, match="overlap in time"):
        VideoSpec(clash)


def test_unusable_photos_are_named(tmp_path: Path, pipeline: FacePipeline) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(VideoGenError, match=r"broken\.jpg: unreadable photo"):
        VideoRenderer(VideoSpec((Appearance("x", broken, 0.0, 1.0, False),)), pipeline.detector)
    faceless = tmp_path / "wall.png"
    cv2.imwrite(str(faceless), np.full((200, 200, 3), 120, np.uint8))
    with pytest.raises(VideoGenError, match=r"wall\.png: the detector finds no face"):
        VideoRenderer(VideoSpec((Appearance("x", faceless, 0.0, 1.0, False),)), pipeline.detector)
    with pytest.raises(VideoGenError, match="unsupported video type"):
        generate_video(VideoSpec((Appearance("x", faceless, 0.0, 1.0, False),)), tmp_path / "out.mkv")
    with pytest.raises(VideoGenError, match="not a folder"):
        load_people(tmp_path / "missing")
