"""Embeddings of a protocol's images, by our pipeline and by the face_recognition peer, for `model-tool eval`.

Both pick the face nearest the image centre when several are found, as the reference peer script does
(`shared/eval/embed_peer.py`), so the two systems are scored on the same faces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from models.errors import ImageError, ModelError
from models.face.pipeline import FacePipeline
from models.imageio import load_image
from models.types import FaceEmbedding

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
CHUNK = 8
PEER_SYSTEM = "face_recognition"  # the peer measured beside us, by its package name


def central_face(faces: Sequence[FaceEmbedding], height: int, width: int) -> FaceEmbedding | None:
    if not faces:
        return None
    cy, cx = height / 2, width / 2

    def off_centre(f: FaceEmbedding) -> float:
        x1, y1, x2, y2 = f.detection.bbox
        return ((y1 + y2) / 2 - cy) ** 2 + ((x1 + x2) / 2 - cx) ** 2

    return min(faces, key=off_centre)


def embed_ours(
    root: Path, images: Sequence[str], pipeline: FacePipeline, progress: Progress | None = None
) -> dict[str, np.ndarray | None]:
    out: dict[str, np.ndarray | None] = {}
    for start in range(0, len(images), CHUNK):
        names = list(images[start : start + CHUNK])
        pixels = []
        for name in names:
            try:
                pixels.append(load_image(root / name))
            except ImageError as exc:
                log.warning("eval: %s", exc)
                pixels.append(None)
        loaded = [(n, p) for n, p in zip(names, pixels, strict=True) if p is not None]
        results = pipeline.embed_many([p for _, p in loaded])
        for (name, p), faces in zip(loaded, results, strict=True):
            face = central_face(faces, p.shape[0], p.shape[1])
            out[name] = None if face is None else face.embedding
        for name, p in zip(names, pixels, strict=True):
            if p is None:
                out[name] = None
        if progress:
            progress(len(names))
    return out


def embed_peer(root: Path, images: Sequence[str], progress: Progress | None = None) -> dict[str, np.ndarray | None]:
    """face_recognition exactly as the reference peer script runs it (HOG, upsample 1, centre-box fallback)."""
    try:
        import face_recognition
    except ImportError as exc:
        raise ModelError("the peer needs face_recognition: pip install --no-deps face_recognition==1.3.0") from exc
    out: dict[str, np.ndarray | None] = {}
    for name in images:
        img = face_recognition.load_image_file(str(root / name))
        h, w = img.shape[:2]
        locs = face_recognition.face_locations(img, number_of_times_to_upsample=1)
        if locs:
            cy, cx = h / 2, w / 2
            locs = [min(locs, key=lambda b: ((b[0] + b[2]) / 2 - cy) ** 2 + ((b[1] + b[3]) / 2 - cx) ** 2)]
        else:
            locs = [(int(h * 0.27), int(w * 0.73), int(h * 0.73), int(w * 0.27))]
        enc = face_recognition.face_encodings(img, locs)
        out[name] = np.asarray(enc[0], dtype=np.float32) if enc else None
        if progress:
            progress(1)
    return out
