"""The enrollment server's configuration (YAML, strict: unknown keys and bad values name the key)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.config import load_dataclass, load_yaml
from models.errors import ConfigError
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
    # a photo whose face is this close to someone else already enrolled is flagged, not silently added (new people
    # and photos added to an existing person alike)
    duplicate_identity_distance: float = 0.5
    # a photo added to a person with templates must be this close to one of them (dlib's own same-person threshold):
    # farther, it is most likely someone else's photo uploaded under that name
    same_person_distance: float = 0.6
    alignment: Literal["dlib5", "template"] = "dlib5"
    quality: QualityConfig = field(default_factory=QualityConfig)


@dataclass(frozen=True)
class ApiSection:
    host: str = "127.0.0.1"
    port: int = 8080
    # the admin token; taken from the environment variable FACEATTEND_ADMIN_TOKEN when this is empty
    token: str = field(default="", repr=False)  # never in logs or tracebacks
    max_upload_mib: int = 16


@dataclass(frozen=True)
class ServerConfig:
    site: str = "main"
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    mqtt: MqttSection = field(default_factory=MqttSection)
    gallery: GallerySection = field(default_factory=GallerySection)
    enrollment: EnrollmentSection = field(default_factory=EnrollmentSection)
    api: ApiSection = field(default_factory=ApiSection)


def load_config(path: str | Path | None) -> ServerConfig:
    """The file's settings over the embedded defaults; no file means all defaults."""
    return ServerConfig() if path is None else load_yaml(ServerConfig, path)


def config_from_dict(data: dict) -> ServerConfig:
    return load_dataclass(ServerConfig, data)
