"""The edge agent's configuration (YAML, strict: unknown keys and bad values are errors that name the key).

Every section has embedded defaults except what only the site can know: `device_id`, `site`, the gallery's
public key and at least one camera. Relative paths are taken relative to the configuration file's folder (a
provisioned device keeps its config, CA certificate and gallery key together), and the agent's files default to
places under `state_dir`: `outbox.db`, `gallery/`, `snapshots/` (the style queue beside the snapshots).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from edge_agent.capture import CameraConfig, SourceKind
from edge_agent.delivery.event_publisher import DeliveryConfig
from edge_agent.delivery.outbox import OVERFLOW_POLICIES, Overflow
from edge_agent.delivery.snapshots import SnapshotConfig
from edge_agent.delivery.unknown_faces import UnknownFacesConfig
from edge_agent.gallery.index import IndexParams
from edge_agent.health.metrics import MetricsConfig
from edge_agent.health.status import StatusConfig
from edge_agent.recognition.attendance import AttendanceConfig
from edge_agent.recognition.recognizer import RecognitionConfig
from edge_agent.recognition.tracker import TrackerConfig
from edge_agent.recognition.worker import WorkerConfig
from edge_agent.style.worker import StyleConfig
from models.config import load_dataclass, load_yaml
from models.contract import limits, topics
from models.decision.rules import DecisionRule
from models.errors import ConfigError, FaceAttendError
from models.face.encoders import encoder_spec
from models.face.pipeline import PipelineConfig

BACKENDS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class MqttSection:
    # mqtt://host:1883 or mqtts://host:8883 (TLS); a username may be in the URL, never a password: see password_file
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = ""  # "" = the device id (the broker's ACLs may require it)
    password_file: Path | None = None  # a file holding the broker password (mode 0600), kept out of this file
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30
    reconnect_min_s: int = 1  # paho's reconnect backoff: doubles from min to max while the broker is away
    reconnect_max_s: int = 30
    # "5" makes the broker say when it refuses a publish (an ACL mistake): the event stays in the outbox instead of
    # being acknowledged and dropped as MQTT 3.1.1 does; the embedded demo broker speaks 3.1.1 only
    protocol: Literal["3.1.1", "5"] = "3.1.1"

    def __post_init__(self) -> None:
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"mqtt.keepalive: must be in [5, 65535] seconds, got {self.keepalive}")
        if not 1 <= self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError(
                f"mqtt.reconnect_min_s / reconnect_max_s: need 1 <= min <= max, got {self.reconnect_min_s} / "
                f"{self.reconnect_max_s}"
            )
        if urlsplit(self.url).password is not None:
            raise ConfigError("mqtt.url: must not carry a password (put it in the file named by mqtt.password_file)")


@dataclass(frozen=True)
class GallerySection:
    public_key: Path | None = None  # the enrollment server's gallery signing key, public half (PEM)
    store_dir: Path | None = None  # the last good gallery, used at start-up when the broker is unreachable
    # `edge-agent run` without a saved gallery (a device's first start) waits this long for the retained one before
    # the cameras start, so the first visitors are not all decided against an empty gallery
    wait_at_start_s: float = 30.0
    index: IndexParams = field(default_factory=IndexParams)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.wait_at_start_s) and self.wait_at_start_s >= 0):
            raise ConfigError(f"gallery.wait_at_start_s: must be a finite number >= 0, got {self.wait_at_start_s!r}")


@dataclass(frozen=True)
class OutboxSection:
    path: Path | None = None
    max_events: int = 100_000
    # drop_oldest: the newest attendance matters most after a very long outage; refuse_new: keep the history
    overflow: Overflow = "drop_oldest"

    def __post_init__(self) -> None:
        if self.max_events < 1:
            raise ConfigError(f"outbox.max_events: must be >= 1, got {self.max_events}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"outbox.overflow: expected one of {', '.join(OVERFLOW_POLICIES)}, got {self.overflow!r}")


@dataclass(frozen=True)
class EdgeConfig:
    device_id: str = ""
    site: str = ""
    state_dir: Path = Path("state")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mqtt: MqttSection = field(default_factory=MqttSection)
    gallery: GallerySection = field(default_factory=GallerySection)
    cameras: tuple[CameraConfig, ...] = ()
    models: PipelineConfig = field(default_factory=PipelineConfig)
    # `model-tool calibrate` writes this section: append its output here; absent, the encoder's calibrated default
    decision: DecisionRule | None = None
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    attendance: AttendanceConfig = field(default_factory=AttendanceConfig)
    # the inference worker; `clock: media` measures tracks in the video's own time (a file camera replayed with
    # `realtime: false` for a benchmark, so the outcome does not depend on how fast this machine is)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    # privacy: whether faces of unknown visitors go to the enrollment server (off by default; the server must opt
    # the site in as well)
    unknown_faces: UnknownFacesConfig = field(default_factory=UnknownFacesConfig)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    style: StyleConfig = field(default_factory=StyleConfig)

    def __post_init__(self) -> None:
        for key in ("device_id", "site"):
            value = getattr(self, key)
            if not value:
                raise ConfigError(f"{key}: required (the {key.replace('_id', '')} this agent serves)")
            try:
                topics.validate_id(value, key)
            except FaceAttendError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        if self.gallery.public_key is None:
            raise ConfigError("gallery.public_key: required (the enrollment server's gallery public key, PEM)")
        if not self.cameras:
            raise ConfigError("cameras: at least one camera is required")
        names = [c.name for c in self.cameras]
        for i, name in enumerate(names):
            # every attendance event carries its camera's name: one the contract cannot carry would make the codec
            # refuse every event of that camera at run time
            if len(name) > limits.MAX_CAMERA_CHARS:
                raise ConfigError(
                    f"cameras[{i}].name: {name[:24]!r}... is {len(name)} characters; attendance events carry it, and "
                    f"the wire contract allows at most {limits.MAX_CAMERA_CHARS}"
                )
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"cameras: camera names must be unique, {duplicates[0]!r} is used more than once")
        if self.models.backend not in BACKENDS:
            raise ConfigError(f"models.backend: expected one of {', '.join(BACKENDS)}, got {self.models.backend!r}")

    @property
    def rule(self) -> DecisionRule:
        """The decision the door applies: the configured one, else the encoder's calibrated default."""
        return self.decision if self.decision is not None else encoder_spec(self.models.encoder).default_decision

    # The agent's files, with the state_dir defaults applied.
    @property
    def outbox_path(self) -> Path:
        return self.outbox.path or self.state_dir / "outbox.db"

    @property
    def gallery_dir(self) -> Path:
        return self.gallery.store_dir or self.state_dir / "gallery"

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.device_id


def load_config(path: str | Path) -> EdgeConfig:
    """Read and check a config file; relative paths in it become relative to its folder."""
    return _finished(load_yaml(EdgeConfig, path), Path(path).resolve().parent)


def config_from_dict(data: Any, base_dir: Path) -> EdgeConfig:
    return _finished(load_dataclass(EdgeConfig, data), base_dir)


def _finished(cfg: EdgeConfig, base_dir: Path) -> EdgeConfig:
    cfg = _resolved(cfg, base_dir)
    if cfg.snapshots.dir is None:
        cfg = dataclasses.replace(cfg, snapshots=dataclasses.replace(cfg.snapshots, dir=cfg.state_dir / "snapshots"))
    return cfg


def _resolved(obj: Any, base: Path) -> Any:
    """A copy of a config dataclass with every relative Path field (and video file camera source) under `base`."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Path) and not value.is_absolute():
            changes[f.name] = base / value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _resolved(value, base)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            changes[f.name] = tuple(_resolved(v, base) for v in value)
    if isinstance(obj, CameraConfig) and obj.kind is SourceKind.FILE and not Path(obj.source).is_absolute():
        changes["source"] = str(base / obj.source)
    return dataclasses.replace(obj, **changes) if changes else obj
