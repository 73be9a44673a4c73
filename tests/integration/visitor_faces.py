"""Real unknown visitors' faces for tests (not a test module): the shipped demo photos, detected, encoded and cropped
the way an edge crops them (edge_agent/delivery/unknown_faces.py), as store records and as wire messages."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np

from edge_agent.delivery.snapshots import face_crop
from edge_agent.devtools.demo import DEMO_PEOPLE
from enrollment_server.store import UnknownFace
from models.contract.timestamps import format_utc
from models.contract.unknown_face import UnknownFace as WireFace
from models.contract.unknown_face import encode_crop
from models.face.pipeline import FacePipeline
from models.imageio import encode_jpeg, load_image

# recent: the server's retention (14 days by default) would delete older faces as soon as they are stored
T0 = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=6)


@dataclass(frozen=True, eq=False)
class Face:
    person: str
    photo: Path
    embedding: np.ndarray
    crop: bytes  # JPEG, the face with half a box of context on every side, at most 320 px (the edge's default)


def demo_photos(person: str) -> list[Path]:
    return sorted(p for p in (DEMO_PEOPLE / person).iterdir() if p.suffix.lower() == ".jpg")


def real_faces(pipeline: FacePipeline, people: dict[str, int]) -> list[Face]:
    """`people`: person -> how many of their demo photos (the first ones)."""
    out = []
    for person, n in people.items():
        for photo in demo_photos(person)[:n]:
            image = load_image(photo)
            faces = pipeline.embed(image)
            assert faces, photo
            best = max(faces, key=lambda f: f.detection.width * f.detection.height)
            crop = face_crop(image, best.detection.bbox, 0.5)
            scale = 320 / max(crop.shape[:2])
            if scale < 1:
                crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            out.append(
                Face(person, photo, best.embedding.astype(np.float32), encode_jpeg(np.ascontiguousarray(crop), 85))
            )
    return out


def record(face: Face, *, site: str, fingerprint: str, i: int, device: str = "door-1") -> UnknownFace:
    return UnknownFace(
        face_id=str(uuid.uuid4()),
        site_id=site,
        device_id=device,
        camera="entrance",
        track_id=i,
        ts=T0 + timedelta(minutes=7 * i),
        embedding=face.embedding,
        fingerprint=fingerprint,
        gallery_version=1,
        distance=0.7,
        quality=round(0.5 + 0.04 * (i % 10), 3),
    )


def wire(face: Face, *, site: str, fingerprint: str, device: str = "door-1", i: int = 0) -> WireFace:
    return WireFace(
        face_id=str(uuid.uuid4()),
        device_id=device,
        site=site,
        camera="entrance",
        track_id=i,
        ts=format_utc(T0 + timedelta(minutes=i)),
        fingerprint=fingerprint,
        gallery_version=1,
        distance=0.71,
        quality=0.8,
        embedding=tuple(float(v) for v in face.embedding),
        crop_jpeg=encode_crop(face.crop),
    )
