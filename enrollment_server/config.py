"""The enrollment server's configuration (YAML, strict: unknown keys and bad values name the key)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.config import load_dataclass, load_yaml
from models.contract import topics
from models.errors import ConfigError, FaceAttendError
from models.face.encoders import DEFAULT_ENCODER, check_choice
from models.face.quality import QualityConfig

_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class DatabaseConfig:
    # a SQLite file path (embedded default) or an SQLAlchemy URL such as postgresql+psycopg://user@host/db
    url: str = "faceattend.db"
    # SQLite: how long a write waits for another writer's lock before it fails (the ingest then retries it)
    busy_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.busy_timeout_s <= 3600:
            raise ConfigError(f"database.busy_timeout_s: must be in (0, 3600] seconds, got {self.busy_timeout_s!r}")


@dataclass(frozen=True)
class MqttSection:
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = "enrollment-server"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # "5" lets the ingest bound the messages the broker has out to it (receive maximum); "3.1.1" for brokers
    # without MQTT 5 (the demo's embedded broker)
    protocol: Literal["3.1.1", "5"] = "5"
    # set on every server of a site run by several (PostgreSQL only): the ingest's shared-subscription group,
    # each event goes to one of them (docs/deployment.md, "Two servers, one site")
    shared_group: str = ""

    def __post_init__(self) -> None:
        if self.shared_group and not _GROUP.fullmatch(self.shared_group):
            raise ConfigError(
                f"mqtt.shared_group: {self.shared_group!r} must be 1-64 characters of [A-Za-z0-9_.-] (it becomes "
                "a topic level of $share/GROUP/...)"
            )


@dataclass(frozen=True)
class GallerySection:
    dtype: Literal["float32", "float16"] = "float32"
    chunk_kib: int = 256
    # the key that signs galleries; generated at first start (its public half goes into every edge's config)
    signing_key: Path = Path("keys/gallery-signing.pem")


@dataclass(frozen=True)
class EnrollmentSection:
    keep_photos: bool = False
    # a small JPEG of each template's aligned face (the console shows them); false keeps no face image at all
    keep_thumbnails: bool = True
    # the face encoder (models/face/encoders.py): every edge of the site must run the same one (provision-device
    # writes it into their configs); an encoder whose weights may not be used commercially needs accept_licence
    encoder: str = DEFAULT_ENCODER
    accept_licence: str = ""
    alignment: str = ""  # "": the encoder's own method
    # The distances below depend on the encoder's embedding space; absent, they are the encoder's calibrated ones
    # (dlib-resnet-v1: 0.5, 0.6 and quality.duplicate_template_distance 0.06).
    # A photo whose face is this close to someone else already enrolled is flagged, not silently added (new people
    # and photos added to an existing person alike); unknown visitors are grouped at it too.
    duplicate_identity_distance: float | None = None
    # a photo added to a person with templates must be this close to one of them (the encoder's same-person
    # distance): farther, it is most likely someone else's photo uploaded under that name
    same_person_distance: float | None = None
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        spec, method = check_choice(self.encoder, self.alignment, self.accept_licence, lambda f: f"enrollment.{f}")
        object.__setattr__(self, "alignment", method)
        # filled in here, so that every reader sees a number
        if self.duplicate_identity_distance is None:
            object.__setattr__(self, "duplicate_identity_distance", spec.duplicate_identity_distance)
        if self.same_person_distance is None:
            object.__setattr__(self, "same_person_distance", spec.same_person_distance)
        if self.quality.duplicate_template_distance is None:
            quality = dataclasses.replace(self.quality, duplicate_template_distance=spec.duplicate_template_distance)
            object.__setattr__(self, "quality", quality)


@dataclass(frozen=True)
class ApiSection:
    host: str = "127.0.0.1"
    port: int = 8080
    # the admin token; taken from the environment variable FACEATTEND_ADMIN_TOKEN when this is empty
    token: str = field(default="", repr=False)  # never in logs or tracebacks
    max_upload_mib: int = 16


@dataclass(frozen=True)
class ConsoleSection:
    """The web console at /console (same port and token as the API)."""

    enabled: bool = True
    session_hours: float = 12.0  # a login lasts this long (in memory: a server restart logs everybody out)
    stale_after_s: float = 120.0  # a device online by its last status but silent this long is flagged stale

    def __post_init__(self) -> None:
        for key, top in (("session_hours", 24.0 * 30), ("stale_after_s", 86_400.0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= top:
                raise ConfigError(f"console.{key}: must be a number in (0, {top:g}], got {value!r}")


@dataclass(frozen=True)
class UnknownVisitorsSection:
    """Faces of unknown visitors, sent by the edges of opted-in sites, grouped for the admin to name.

    Privacy: off by default. Only sites listed in `sites` have their unknown visitors' faces stored; whatever an
    edge of another site sends is dropped (and logged). Stored faces are deleted once older than `max_age_days`,
    and beyond the newest `max_faces` of a site; naming or ignoring a group deletes its faces at once.
    """

    sites: tuple[str, ...] = ()
    max_age_days: float = 14.0
    max_faces: int = 1000  # per site (grouping compares every pair: 5000 at most)
    best_crops: int = 3  # crops of a group turned into templates (quality-gated) when it is named

    def __post_init__(self) -> None:
        for site in self.sites:
            try:
                topics.validate_id(site, "site")
            except FaceAttendError as exc:
                raise ConfigError(f"unknown_visitors.sites: {exc}") from None
        age = self.max_age_days
        if isinstance(age, bool) or not isinstance(age, (int, float)) or not (math.isfinite(age) and 0 < age <= 3650):
            raise ConfigError(f"unknown_visitors.max_age_days: must be a number in (0, 3650], got {age!r}")
        for key, top in (("max_faces", 5000), ("best_crops", 32)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ConfigError(f"unknown_visitors.{key}: must be an integer in [1, {top}], got {value!r}")


_HA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class HomeAssistantSection:
    """Home Assistant MQTT discovery for every door the server hears of (enrollment_server/home_assistant.py)."""

    discovery: bool = False
    prefix: str = "homeassistant"  # Home Assistant's discovery prefix (its MQTT integration's option)
    node_id: str = "faceattend"  # the optional <node_id> level of the discovery topics

    def __post_init__(self) -> None:
        for key in ("prefix", "node_id"):
            if not _HA_ID.fullmatch(getattr(self, key)):
                raise ConfigError(f"home_assistant.{key}: 1-64 of [A-Za-z0-9_-], got {getattr(self, key)!r}")


@dataclass(frozen=True)
class ServerConfig:
    site: str = "main"
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    mqtt: MqttSection = field(default_factory=MqttSection)
    gallery: GallerySection = field(default_factory=GallerySection)
    enrollment: EnrollmentSection = field(default_factory=EnrollmentSection)
    api: ApiSection = field(default_factory=ApiSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)
    unknown_visitors: UnknownVisitorsSection = field(default_factory=UnknownVisitorsSection)
    home_assistant: HomeAssistantSection = field(default_factory=HomeAssistantSection)


def load_config(path: str | Path | None) -> ServerConfig:
    """The file's settings over the embedded defaults; no file means all defaults."""
    return ServerConfig() if path is None else load_yaml(ServerConfig, path)


def config_from_dict(data: dict) -> ServerConfig:
    return load_dataclass(ServerConfig, data)
