"""The edge agent: its parts wired together, started and stopped in order.

One MQTT connection per device (client id = device id unless configured): events, status (with the `offline`
last will) and gallery sync share it. An admitted decision becomes an attendance event in this order: snapshot
saved, event written to the durable outbox, publisher woken; the publisher deletes it on PUBACK. Nothing between
the decision and the outbox talks to the network, so a broker outage never slows or loses recognition.

Start-up: the saved gallery serves at once (the broker may be down), the models are warmed up, then the cameras
start (`start_cameras`, separate so a caller can wait for a gallery first). Stop: cameras, then the worker (live
tracks are decided and their events stored), then the publisher drains what it can, `stopped` status, link.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.capture import CameraSet
from edge_agent.config import EdgeConfig
from edge_agent.delivery.event_publisher import EventPublisher
from edge_agent.delivery.outbox import Outbox
from edge_agent.delivery.snapshots import SnapshotStore
from edge_agent.gallery.index import IndexHolder
from edge_agent.gallery.sync import GallerySync
from edge_agent.health.metrics import MetricsServer
from edge_agent.health.status import StatusReporter, offline_will
from edge_agent.recognition.attendance import AttendanceGate
from edge_agent.recognition.latency import LatencyEma
from edge_agent.recognition.recognizer import TrackDecision
from edge_agent.recognition.worker import InferenceWorker
from models.contract.events import new_event
from models.contract.mqtt_link import MqttConfig, PahoMqttLink
from models.contract.signing import Verifier
from models.contract.timestamps import format_utc
from models.errors import ConfigError, FaceAttendError, OutboxFullError
from models.face.pipeline import FacePipeline

log = logging.getLogger(__name__)


def agent_version() -> str:
    try:
        return metadata.version("faceattend")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _readable(key: str, path: Path | None) -> None:
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {path} is not readable by this user")


def check_files(cfg: EdgeConfig) -> Verifier:
    """Every file the config names exists and parses; returns the gallery verifier. ConfigError names the key."""
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        _readable(f"mqtt.{key}", getattr(cfg.mqtt, key))
    for spec in cfg.style.styles if cfg.style.enabled else ():
        _readable(f"style.styles[{spec.name}].model", spec.model)
    _readable("gallery.public_key", cfg.gallery.public_key)
    try:
        return Verifier.from_pem_file(cfg.gallery.public_key)  # type: ignore[arg-type]  # checked by EdgeConfig
    except FaceAttendError as exc:
        raise ConfigError(f"gallery.public_key: {exc}") from exc


def mqtt_config(cfg: EdgeConfig) -> MqttConfig:
    m = cfg.mqtt
    options: dict[str, Any] = {
        "client_id": cfg.client_id,
        "keepalive": m.keepalive,
        "protocol": m.protocol,
        "reconnect_min_delay": m.reconnect_min_s,
        "reconnect_max_delay": m.reconnect_max_s,
    }
    for key in ("ca_file", "cert_file", "key_file"):
        if getattr(m, key) is not None:
            options[key] = str(getattr(m, key))
    if m.password_file is not None:
        if urlsplit(m.url).username is None:
            raise ConfigError("mqtt.password_file: needs a username in mqtt.url (mqtt://USER@host)")
        try:
            options["password"] = m.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {m.password_file}: {exc}") from exc
    return MqttConfig.from_url(m.url, **options)


# No new frames, then no new decisions (the worker decides live tracks into the outbox), the painter, then the
# publisher drains, `stopped` goes out and the gallery subscription ends while the connection is still up.
_STOP_ORDER = (
    "cameras",
    "inference worker",
    "style worker",
    "event publisher",
    "status",
    "gallery sync",
    "metrics",
    "mqtt link",
    "outbox",
)


class EdgeAgent:
    """`start()`, then `start_cameras()`; `stop()` at the end. Health figures from `health()`."""

    def __init__(self, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self._verifier = check_files(cfg)
        self._version = agent_version()
        self._lock = threading.Lock()
        self._events = 0
        self._events_failed = 0
        self._snapshot_failures = 0
        self._latency = LatencyEma(window=256)  # a face's first frame -> its event in the outbox
        self._started = False
        self._stopped = False
        self.pipeline: FacePipeline | None = None
        self.outbox: Outbox | None = None
        self.holder = IndexHolder()
        self.snapshots: SnapshotStore | None = None
        self.gate = AttendanceGate(cfg.attendance)
        self._parts: dict[str, Any] = {}  # started parts by name, stopped in _STOP_ORDER

    # ---- lifecycle ----

    def start(self) -> None:
        if self._started:
            raise FaceAttendError("edge agent already started (an agent is started once)")
        self._started = True
        cfg = self.cfg
        log.info(
            "edge agent %s: device %s, site %s, %d camera(s), backend %s, broker %s",
            self._version,
            cfg.device_id,
            cfg.site,
            len(cfg.cameras),
            cfg.models.backend,
            cfg.mqtt.url,
        )
        try:
            self._start_parts()
        except BaseException:
            self.stop()
            raise

    def _start_parts(self) -> None:
        cfg = self.cfg
        self.pipeline = FacePipeline.create(cfg.models)
        fingerprint = self.pipeline.fingerprint
        self.outbox = Outbox.open(cfg.outbox_path, max_events=cfg.outbox.max_events, overflow=cfg.outbox.overflow)
        self._parts["outbox"] = self.outbox
        if cfg.snapshots.mode != "off":
            self.snapshots = SnapshotStore(cfg.snapshots)
        self.link = PahoMqttLink(
            mqtt_config(cfg), will=offline_will(cfg.device_id, cfg.site, self._version, fingerprint)
        )
        self.status = StatusReporter(
            self.link,
            cfg.device_id,
            cfg.site,
            self._version,
            fingerprint,
            health=self.health,
            gallery_version=self.gallery_version,
            config=cfg.status,
        )
        self.sync = GallerySync(
            self.link,
            cfg.site,
            cfg.device_id,
            self._verifier,
            fingerprint,
            self.holder,
            cfg.gallery_dir,
            on_applied=lambda _index: self.status.poke(),  # GallerySync logs the new version itself
            params=cfg.gallery.index,
        )
        self.publisher = EventPublisher(self.outbox, self.link)
        self.cameras = CameraSet(cfg.cameras)
        self.worker = InferenceWorker(
            self.pipeline,
            self.cameras,
            self.holder,
            self._on_decision,
            tracker=cfg.tracker,
            recognition=cfg.recognition,
            rule=cfg.decision,
            config=cfg.worker,
        )
        self.metrics = MetricsServer(
            cfg.metrics,
            self.health,
            info={"device_id": cfg.device_id, "site": cfg.site, "agent_version": self._version},
            counters=self.status.counters,
        )
        self.style = self._make_style_worker()
        # the saved gallery first (works with the broker down), then the network, then the models
        self.sync.start()
        self._parts["gallery sync"] = self.sync
        self.publisher.start()
        self._parts["event publisher"] = self.publisher
        self.status.start()
        self._parts["status"] = self.status
        self.link.start()
        self._parts["mqtt link"] = self.link
        self.metrics.start()
        self._parts["metrics"] = self.metrics
        self.worker.start()
        self._parts["inference worker"] = self.worker
        if self.style is not None:
            self.style.start()
            self._parts["style worker"] = self.style
        self.worker.wait_ready(120.0)

    def _make_style_worker(self) -> Any:
        if not self.cfg.style.enabled or self.snapshots is None:
            if self.cfg.style.enabled:
                log.warning("style: enabled but snapshots.mode is off: there is nothing to stylise")
            return None
        from edge_agent.style.worker import StyleWorker

        return StyleWorker.for_agent(
            self.cfg.style,
            self.snapshots,
            self.link,
            self.cfg.device_id,
            self.cfg.site,
            is_idle=self._idle_for_style,
            backend=self.cfg.models.backend,
        )

    def _idle_for_style(self) -> bool:
        return self.worker.idle().quiet_for(self.cfg.style.idle_after_s)

    def wait_for_gallery(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a gallery to be in service (at once when the saved one is); True if one is."""
        deadline = time.monotonic() + timeout
        while self.gallery_version() is None:
            if time.monotonic() >= deadline:
                log.warning("no gallery after %.0f s: every face is unknown until one arrives", timeout)
                return False
            time.sleep(0.1)
        return True

    def start_cameras(self) -> None:
        self.cameras.start()
        self._parts["cameras"] = self.cameras

    def stop(self) -> None:
        """Stop every part that started, in `_STOP_ORDER`; never raises (each failure is logged)."""
        if self._stopped:
            return
        self._stopped = True
        for name in _STOP_ORDER:
            part = self._parts.pop(name, None)
            if part is None:
                continue
            try:
                if name == "outbox":
                    part.close()
                else:
                    part.stop()
            except Exception:
                log.exception("stopping %s failed", name)
        if self.pipeline is not None:
            self.pipeline.close()
        log.info("edge agent stopped (%d events this run, %d undelivered kept)", self._events, self.outbox_depth())

    def check(self) -> None:
        """Raise when a part that must run has died (the service manager restarts the agent)."""
        if not self.worker.running:
            raise FaceAttendError("the inference worker has stopped")

    # ---- decisions -> events ----

    def _on_decision(self, d: TrackDecision) -> None:
        if not self.gate.admit(d):
            return
        cfg = self.cfg
        event_id = str(uuid.uuid4())
        snapshot = None
        if self.snapshots is not None:
            try:
                snapshot = self.snapshots.save(event_id, d.frame, d.bbox, at=d.decided_wall)
            except FaceAttendError as exc:  # SnapshotError, ImageError: the event matters more than its picture
                with self._lock:
                    self._snapshot_failures += 1
                log.error("event %s: snapshot not stored: %s", event_id, exc)
        outbox = self.outbox
        if outbox is None:  # stopped meanwhile
            return
        try:
            event = outbox.put_new(
                lambda seq: new_event(
                    seq=seq,
                    event_id=event_id,
                    device_id=cfg.device_id,
                    site=cfg.site,
                    camera=d.camera,
                    track_id=d.track_id,
                    person_id=d.person_id,
                    name=d.name,
                    distance=d.distance,
                    margin=d.margin,
                    threshold=d.threshold,
                    gallery_version=d.gallery_version,
                    fingerprint=d.fingerprint,
                    snapshot=snapshot,
                    ts=format_utc(d.decided_wall),
                )
            )
        except OutboxFullError as exc:
            with self._lock:
                self._events_failed += 1
            log.error("event for %s on %s refused: %s", d.person_id or "unknown", d.camera, exc)
            return
        self.publisher.notify()
        self._latency.add(time.monotonic() - d.first_seen_ts)
        with self._lock:
            self._events += 1
        log.info(
            "event %s seq %d: %s on %s (distance %s, %d samples)",
            event.event_id,
            event.seq,
            d.person_id or "unknown",
            d.camera,
            "-" if d.distance is None else f"{d.distance:.3f}",
            d.samples,
        )
        if self.style is not None and snapshot is not None:
            self.style.enqueue(event.event_id, snapshot)

    # ---- figures ----

    def gallery_version(self) -> int | None:
        index = self.holder.current
        return None if index is None else index.version

    def outbox_depth(self) -> int:
        return 0 if self.outbox is None else self.outbox.depth()

    def cameras_finished(self, timeout: float = 0.0) -> bool:
        """Every camera source ended (files without loop) and the tracks they left were decided."""
        return self.worker.wait_sources_ended(timeout)

    def health(self) -> dict[str, Any]:
        sync = dataclasses.asdict(self.sync.status())
        publisher = dataclasses.asdict(self.publisher.stats())  # reads the outbox's depth and oldest age once
        with self._lock:
            events, failed, snapshot_failures = self._events, self._events_failed, self._snapshot_failures
        out: dict[str, Any] = {
            "pipeline": self.worker.stats().to_dict(),
            "events": {
                "stored_total": events,
                "refused_total": failed,
                "snapshot_failures_total": snapshot_failures,
                "first_frame_to_outbox": self._latency.figures(),
            },
            "outbox": {
                "depth": publisher.pop("depth"),
                "oldest_age_s": publisher.pop("oldest_age_s"),
                "dropped_total": self.outbox.dropped() if self.outbox else 0,
            },
            "publisher": publisher,
            "gallery": {
                "version": -1 if (version := sync.pop("version")) is None else version,
                "people": sync.pop("people"),
                "templates": sync.pop("templates"),
                "sync": sync,
            },
            "attendance": dataclasses.asdict(self.gate.stats()),
            "mqtt_connected": self.link.is_connected(),
        }
        if self.style is not None:
            out["style"] = self.style.stats_dict()
        return out
