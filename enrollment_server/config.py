"""The enrollment server's configuration (YAML, strict: unknown keys and bad values name the key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.config import load_dataclass, load_yaml
from models.face.quality import QualityConfig


@dataclass(frozen=True)
class DatabaseConfig:
    # a SQLite file path (embedded default) or an SQLAlchemy URL such as postgresql+psycopg://user@host/db
    url: str = "faceattend.db"


@dataclass(frozen=True)
class MqttSection:
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = "enrollment-server"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


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
