"""An unknown visitor's face, sent by an edge (QoS 1, not retained) on `faceattend/v1/edge/{device}/unknown` to the
enrollment server, so that the admin can name people the doors keep seeing and nobody enrolled (schema 1.1).

Privacy: this is the one message that carries a face image. An edge sends it only when its configuration opts in
(`unknown_faces.share`, off by default), the server stores it only for sites its own configuration lists
(`unknown_visitors.sites`, empty by default) and deletes what is older or more than its retention limits allow; the
broker's ACL lets no consumer read the topic (deploy/mosquitto/acl).

One message per track the edge decided as unknown: `face_id` (a UUID, the de-duplication key: QoS 1 is
at-least-once), the track's best sample (`embedding`, its quality weight `quality` in (0, 1] and the `crop_jpeg`
around it, base64 of a JPEG of at most `limits.MAX_UNKNOWN_CROP_BYTES`), the vote's nearest distance (`distance`,
null without a gallery) and the gallery version and encoder fingerprint it was decided under.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from typing import ClassVar

from models.contract import limits
from models.contract.codec import Message, check_id, check_min, check_text, normalise_ts

SCHEMA = "faceattend.unknown_face"
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class UnknownFace(Message):
    SCHEMA: ClassVar[str] = SCHEMA
    MAX_BYTES: ClassVar[int] = limits.MAX_UNKNOWN_FACE_BYTES

    face_id: str
    device_id: str
    site: str
    camera: str
    track_id: int
    ts: str  # when the track was decided
    fingerprint: str
    gallery_version: int
    distance: float | None
    quality: float
    embedding: tuple[float, ...]
    crop_jpeg: str  # base64 (standard alphabet, padded)

    def validate(self) -> None:
        try:
            self.replace_field("face_id", str(uuid.UUID(self.face_id)))
        except ValueError:
            raise self.invalid("face_id", f"{self.face_id!r} is not a UUID") from None
        check_id(self, "device_id")
        check_id(self, "site")
        check_text(self, "camera", limits.MAX_CAMERA_CHARS)
        check_min(self, "track_id", 0)
        normalise_ts(self, "ts")
        check_text(self, "fingerprint", limits.MAX_FINGERPRINT_CHARS)
        check_min(self, "gallery_version", 0)
        check_min(self, "distance", 0)
        if not 0.0 < self.quality <= 1.0:
            raise self.invalid("quality", f"must be in (0, 1], got {self.quality}")
        if not 1 <= len(self.embedding) <= limits.MAX_DIM:
            raise self.invalid("embedding", f"must hold 1-{limits.MAX_DIM} numbers, got {len(self.embedding)}")
        jpeg = self.jpeg_bytes()
        if len(jpeg) > limits.MAX_UNKNOWN_CROP_BYTES:
            raise self.invalid("crop_jpeg", f"is {len(jpeg)} bytes; the limit is {limits.MAX_UNKNOWN_CROP_BYTES}")
        if not jpeg.startswith(JPEG_MAGIC):
            raise self.invalid("crop_jpeg", "is not a JPEG image")

    def jpeg_bytes(self) -> bytes:
        """The crop's JPEG bytes (the base64 is checked strictly: no stray characters, correct padding)."""
        try:
            return base64.b64decode(self.crop_jpeg, validate=True)
        except (binascii.Error, ValueError):
            raise self.invalid("crop_jpeg", "is not base64") from None


def encode_crop(jpeg: bytes) -> str:
    return base64.b64encode(jpeg).decode("ascii")
