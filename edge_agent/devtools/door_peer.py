"""The `face_recognition` peer at the door: the same video, frame by frame, as its own webcam example runs it.

Per processed frame (every `every`-th frame of the file, 1 = all): `face_locations` (dlib's HOG detector, upsampling
once: its default), `face_encodings` (one jitter, 5-point landmarks: its defaults), `face_distance` to every enrolled
encoding, and the nearest person when within `tolerance` (0.6, its default), else unknown. The enrolled encodings are
face_recognition's own, of the same enrollment photos our server enrolled (`embed_dataset_peer`: the face nearest
the photo's centre).

Attribution: each face the peer finds goes to the ground-truth face on that frame it overlaps most (IoU >= 0.3, as our
decisions' boxes are attributed); a face that overlaps none is counted, not scored.

The peer has no tracker and no attendance logic, so its calls on an appearance are turned into verdicts two ways,
both scored by `door_score` and both reported:

- **majority** (the peer's track decision): the label most of the appearance's frames carry; a tie between labels
  counts as unknown;
- **any frame** (a per-frame system that announces every match): every person it named on any of the frames.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.devtools.door_score import Verdict
from edge_agent.recognition.tracker import iou_matrix
from models.errors import FaceAttendError

log = logging.getLogger(__name__)

TOLERANCE = 0.6  # face_recognition's default
MIN_IOU = 0.3


class PeerError(FaceAttendError):
    """The peer cannot run (not installed, unreadable video)."""


@dataclass(frozen=True)
class PeerCall:
    frame: int
    label: str | None  # the person named, None: unknown
    nearest: str
    distance: float  # to the nearest enrolled encoding


@dataclass(frozen=True)
class PeerRun:
    calls: Mapping[int, tuple[PeerCall, ...]]  # appearance index -> the peer's call on each frame it found the face
    frames: int  # frames processed
    faces: int  # faces found
    unattributed: int  # faces that overlapped no ground-truth face
    seconds: float

    def verdicts(self, mode: str) -> list[Verdict]:
        """`majority` or `any` (see the module docstring)."""
        out: list[Verdict] = []
        for index, calls in sorted(self.calls.items()):
            votes = Counter(c.label for c in calls)
            if mode == "majority":
                ranked = votes.most_common()
                tie = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
                label = None if tie else ranked[0][0]
                named = [c.distance for c in calls if c.label == label and label is not None]
                detail = {
                    "frames": len(calls),
                    "votes": {str(k): v for k, v in votes.items()},
                    "mean_distance": float(np.mean(named)) if named else None,
                }
                out.append(Verdict(index, label, detail))
            elif mode == "any":
                out.extend(Verdict(index, label, {"frames": n}) for label, n in votes.items())
            else:
                raise PeerError(f"peer verdicts: mode must be majority or any, got {mode!r}")
        out.extend(Verdict(None, None) for _ in range(self.unattributed))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "faces": self.faces,
            "unattributed_faces": self.unattributed,
            "seconds": round(self.seconds, 1),
            "appearances": {
                str(i): [
                    {"frame": c.frame, "label": c.label, "nearest": c.nearest, "distance": round(c.distance, 4)}
                    for c in calls
                ]
                for i, calls in sorted(self.calls.items())
            },
        }


def run_peer(
    video: Path,
    truth: Any,  # edge_agent.devtools.videogen.GroundTruth
    names: Sequence[str],
    encodings: np.ndarray,
    *,
    tolerance: float = TOLERANCE,
    every: int = 1,
    progress: Callable[[int], None] | None = None,
) -> PeerRun:
    """face_recognition on `video` against `encodings` (one row per enrolled photo, person `names[i]`)."""
    import time

    try:
        import face_recognition
    except ImportError as exc:
        raise PeerError("the peer needs face_recognition: pip install --no-deps face_recognition==1.3.0") from exc
    if every < 1:
        raise PeerError(f"peer: every must be >= 1, got {every}")
    known = np.asarray(encodings, dtype=np.float64)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise PeerError(f"{video}: the peer cannot open the video")
    calls: dict[int, list[PeerCall]] = {}
    frames = faces = unattributed = index = 0
    started = time.perf_counter()
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if index % every == 0:
                rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                locations = face_recognition.face_locations(rgb, number_of_times_to_upsample=1)
                found = face_recognition.face_encodings(rgb, locations) if locations else []
                frames += 1
                faces += len(found)
                truth_faces = truth.faces_at(index)
                for (top, right, bottom, left), enc in zip(locations, found, strict=True):
                    who = _attribute((left, top, right, bottom), truth_faces, truth)
                    if who is None:
                        unattributed += 1
                        continue
                    d = face_recognition.face_distance(known, enc) if len(known) else np.empty(0)
                    j = int(np.argmin(d)) if d.size else -1
                    nearest = names[j] if j >= 0 else ""
                    distance = float(d[j]) if j >= 0 else float("inf")
                    label = nearest if j >= 0 and distance <= tolerance else None
                    calls.setdefault(who, []).append(PeerCall(index, label, nearest, distance))
                if progress is not None:
                    progress(1)
            index += 1
    finally:
        cap.release()
    return PeerRun({k: tuple(v) for k, v in calls.items()}, frames, faces, unattributed, time.perf_counter() - started)


def _attribute(box: tuple[float, float, float, float], truth_faces: list[Any], truth: Any) -> int | None:
    """The index of the ground-truth appearance whose face `box` overlaps most (IoU >= MIN_IOU) on this frame."""
    if not truth_faces:
        return None
    overlaps = iou_matrix(np.array([box], dtype=np.float64), np.array([b.box for _, b in truth_faces]))[0]
    j = int(np.argmax(overlaps))
    if overlaps[j] < MIN_IOU:
        return None
    appearance = truth_faces[j][0]
    return next(i for i, a in enumerate(truth.appearances) if a is appearance)
