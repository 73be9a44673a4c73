"""The edge agent: its parts wired together, started and stopped in order.

One MQTT connection per device (client id = device id unless configured): events, status (with the `offline`
last will), gallery sync and the server's event confirmations share it. An admitted decision becomes an
attendance event in this order: snapshot saved, event written to the durable outbox, publisher woken; the
publisher deletes it once the server confirms it stored it (edge_agent/delivery/event_publisher.py). Nothing
between the decision and the outbox talks to the network, so a broker outage never slows or loses recognition.
An event the outbox refuses (full with `overflow: refuse_new`, a full disk) is counted by reason and its
admission taken back from the attendance gate: the person's next decision makes an event.

Start-up: the saved gallery serves at once (the broker may be down), the models are warmed up, then the cameras
start (`start_cameras`, separate so a caller can wait for a gallery first). Stop: cameras, then the worker (live
tracks are decided and their events stored), then the publisher drains what it can, `stopped` status, link.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.capture import CameraSet
from edge_agent.config import EdgeConfig
from edge_agent.delivery.event_publisher import EventPublisher
from edge_agent.delivery.outbox import Outbox
from edge_agent.delivery.snapshots import SnapshotStore
from edge_agent.delivery.unknown_faces import UnknownFaceSharer
from edge_agent.gallery.index import GalleryIndex, IndexHolder
from edge_agent.gallery.sync import GallerySync
from edge_agent.health.metrics import MetricsServer
from edge_agent.health.status import StatusReporter, offline_will
from edge_agent.recognition.attendance import AttendanceGate
from edge_agent.recognition.latency import LatencyEma
from edge_agent.recognition.recognizer import TrackDecision, rule_in_force
from edge_agent.recognition.worker import InferenceWorker
from models import extras
from models.contract.events import new_event
from models.contract.mqtt_link import MqttConfig, PahoMqttLink
from models.contract.signing import Verifier
from models.contract.timestamps import format_utc
from models.errors import ConfigError, FaceAttendError, OutboxError, OutboxFullError
from models.face.pipeline import FacePipeline

log = logging.getLogger(__name__)

REFUSAL_REASONS = ("outbox_full", "outbox_error")


def agent_version() -> str:
    return extras.distribution_version()


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
        self._refused: Counter[str] = Counter()  # reason -> events the outbox refused
        self._snapshot_failures = 0
        self._latency = LatencyEma(window=256)  # a face's first frame -> its event in the outbox
        self._started = False
        self._stopped = False
        self.pipeline: FacePipeline | None = None
        self.outbox: Outbox | None = None
        self.holder = IndexHolder()
        self.snapshots: SnapshotStore | None = None
        self.unknown_faces: UnknownFaceSharer | None = None  # only when the site shares unknown visitors' faces
        self.gate = AttendanceGate(cfg.attendance)
        self._parts: dict[str, Any] = {}  # started parts by name, stopped in _STOP_ORDER
        self._override_logged = False  # the config's rule over the site's: said once (under _lock)

    # ---- lifecycle ----

    def start(self) -> None:
        if self._started:
            raise FaceAttendError("edge agent already started (an agent is started once)")
        self._started = True
        cfg = self.cfg
        log.info(
            "edge agent %s: device %s, site %s, %d camera(s), encoder %s (%s alignment), backend %s, broker %s, "
            "decision %s",
            self._version,
            cfg.device_id,
            cfg.site,
            len(cfg.cameras),
            cfg.models.encoder,
            cfg.models.alignment,
            cfg.models.backend,
            cfg.mqtt.url,
            f"{cfg.rule.to_dict()} from the config"
            if cfg.decision is not None
            else f"{cfg.rule.to_dict()}, the encoder's default, until a gallery brings the site's calibrated rule",
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
            gallery_epoch=self.gallery_epoch,
        )
        self.sync = GallerySync(
            self.link,
            cfg.site,
            cfg.device_id,
            self._verifier,
            fingerprint,
            self.holder,
            cfg.gallery_dir,
            on_applied=self._on_gallery_applied,  # GallerySync logs the new version itself
            params=cfg.gallery.index,
        )
        self.publisher = EventPublisher(self.outbox, self.link, cfg.device_id, delivery=cfg.delivery)
        if cfg.unknown_faces.share:
            self.unknown_faces = UnknownFaceSharer(cfg.unknown_faces, self.link, cfg.device_id, cfg.site)
            log.info("unknown_faces.share: faces of unknown tracks are sent to the enrollment server")
        self.cameras = CameraSet(cfg.cameras)
        self.worker = InferenceWorker(
            self.pipeline,
            self.cameras,
            self.holder,
            self._on_decision,
            tracker=cfg.tracker,
            recognition=cfg.recognition,
            rule=cfg.rule,
            site_rules=cfg.decision is None,  # an explicit decision section wins over the site's rule
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
        if self.holder.current is not None:  # the saved gallery, in service already
            self._note_site_rule(self.holder.current)
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
        log.info("edge agent stopped (%d events this run, %d unconfirmed kept)", self._events, self.outbox_depth())

    def check(self) -> None:
        """Raise when a part that must run has died (the service manager restarts the agent)."""
        if not self.worker.running:
            raise FaceAttendError("the inference worker has stopped")

    # ---- decisions -> events ----

    def _on_decision(self, d: TrackDecision) -> None:
        if self.unknown_faces is not None and not d.known:
            self.unknown_faces.offer(d)  # independent of the attendance gate: unknown events may be off
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
        except OutboxError as exc:  # full (refuse_new), a full disk, a broken file: the event does not exist
            self.gate.revoke(d)
            reason = "outbox_full" if isinstance(exc, OutboxFullError) else "outbox_error"
            with self._lock:
                self._refused[reason] += 1
            log.error(
                "event %s for %s on %s not stored (%s): %s; the next decision for them makes an event",
                event_id,
                d.person_id or "unknown",
                d.camera,
                reason,
                exc,
            )
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

    def gallery_epoch(self) -> int | None:
        index = self.holder.current
        return None if index is None else index.epoch

    def outbox_depth(self) -> int:
        return 0 if self.outbox is None else self.outbox.depth()

    def cameras_finished(self, timeout: float = 0.0) -> bool:
        """Every camera source ended (files without loop) and the tracks they left were decided."""
        return self.worker.wait_sources_ended(timeout)

    def event_counts(self) -> dict[str, int]:
        """Events stored in the outbox, refused by it (in all and per reason), snapshots that failed."""
        with self._lock:
            refused = dict(self._refused)
            counts = {"stored_total": self._events, "snapshot_failures_total": self._snapshot_failures}
        counts["refused_total"] = sum(refused.values())
        counts.update({f"refused_{reason}_total": refused.get(reason, 0) for reason in REFUSAL_REASONS})
        return counts

    def decision_in_force(self) -> dict[str, Any]:
        """The rule that decides now and its source (config / site / encoder default), for status and metrics."""
        rule, source = rule_in_force(self.cfg.rule, self.holder.current, site_rules=self.cfg.decision is None)
        figures = {"threshold": rule.threshold, "max_distance": rule.max_distance}
        # a figure that is absent or infinite (no cap) is left out: JSON has no inf, and metrics take numbers only
        finite = {k: v for k, v in figures.items() if v is not None and math.isfinite(v)}
        return {"rule": rule.rule, "source": source, **finite}

    def _on_gallery_applied(self, index: GalleryIndex) -> None:
        self._note_site_rule(index)
        self.status.poke()

    def _note_site_rule(self, index: GalleryIndex) -> None:
        site = index.gallery.decision
        if site is not None and self.cfg.decision is not None and self._first_override():
            log.warning(
                "the config's decision %s overrides the site's calibrated rule %s (calibrated %s); remove the "
                "config's decision section to apply the site's",
                self.cfg.decision.to_dict(),
                site.rule.to_dict(),
                site.calibrated,
            )
        elif site is not None and self.cfg.decision is None:
            log.info("decision: the site's calibrated rule %s (calibrated %s)", site.rule.to_dict(), site.calibrated)

    def _first_override(self) -> bool:
        """True once only: the start path and the gallery-sync thread both note the site's rule."""
        with self._lock:
            first = not self._override_logged
            self._override_logged = True
        return first

    def health(self) -> dict[str, Any]:
        sync = dataclasses.asdict(self.sync.status())
        publisher = dataclasses.asdict(self.publisher.stats())  # reads the outbox's depth and oldest age once
        out: dict[str, Any] = {
            "pipeline": self.worker.stats().to_dict(),
            "events": {**self.event_counts(), "first_frame_to_outbox": self._latency.figures()},
            "outbox": {
                # every event in the outbox is one the server has not confirmed yet
                "depth": publisher.pop("depth"),
                "oldest_unconfirmed_age_s": publisher.pop("oldest_age_s"),
                "awaiting_confirmation": publisher.pop("awaiting_confirmation"),
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
            "decision": self.decision_in_force(),
        }
        if self.style is not None:
            out["style"] = self.style.stats_dict()
        if self.unknown_faces is not None:
            out["unknown_faces"] = dataclasses.asdict(self.unknown_faces.stats())
        return out
