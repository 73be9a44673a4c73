"""Home Assistant MQTT discovery for the doors: each edge device appears in Home Assistant as a device with

- availability from the edge's own retained status (`faceattend/v1/edge/{device}/status`: available while `online`);
- a sensor "Last person": the name of the last person recognised at the door (unknown events leave it as it was);
- an `event` entity "Attendance": one event per attendance event, of type `recognised` or `unknown`, with the person,
  camera and distance as attributes (what automations trigger on);
- a diagnostic sensor "Gallery version": the gallery version the door has applied.

Home Assistant reads the edges' topics itself: the server only announces them. Discovery follows Home Assistant's
MQTT integration documentation (https://www.home-assistant.io/integrations/mqtt/, "MQTT Discovery"): one
single-component discovery message per entity on `<prefix>/<component>/<node_id>/<object_id>/config` (the form every
Home Assistant version with MQTT events understands), abbreviated keys, a `device` block shared by the door's
entities, an `origin` block, and `unique_id`s. The messages are not retained (no ghost entities once a door is gone):
they are sent when a door is first heard of (its retained status arrives at connect), when its agent version or site
changes, again for every door when Home Assistant's birth message (`<prefix>/status` = `online`) arrives, as the
documentation recommends, and at every reconnection of the server's link (a broker restart reconnects Home Assistant
too, whose birth message may come before this link has subscribed again).

The server's broker user may publish under `homeassistant/#` and read `homeassistant/status` (deploy/mosquitto/acl);
a Home Assistant broker user is made by `enrollment-server broker-user --home-assistant`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

from enrollment_server.config import HomeAssistantSection
from models.contract import topics
from models.contract.mqtt_link import InboundMessage, MqttLink
from models.contract.status import EdgeStatus
from models.errors import MqttError, PayloadError, TopicError

log = logging.getLogger(__name__)

EVENT_TYPES = ("recognised", "unknown")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

# Jinja templates Home Assistant renders on each message (value_json: the payload; this: the entity's own state)
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.state == 'online' else 'offline' }}"
LAST_PERSON_TEMPLATE = (
    "{% if value_json.person_id %}{{ value_json.name or value_json.person_id }}{% else %}{{ this.state }}{% endif %}"
)
LAST_PERSON_ATTRIBUTES = (
    '{"person_id": {{ value_json.person_id | tojson }}, "camera": {{ value_json.camera | tojson }}, '
    '"distance": {{ value_json.distance | tojson }}, "ts": {{ value_json.ts | tojson }}}'
)
ATTENDANCE_TEMPLATE = (
    "{\"event_type\": \"{{ 'recognised' if value_json.person_id else 'unknown' }}\", "
    '"person_id": {{ value_json.person_id | tojson }}, "name": {{ value_json.name | tojson }}, '
    '"camera": {{ value_json.camera | tojson }}, "distance": {{ value_json.distance | tojson }}, '
    '"event_id": {{ value_json.event_id | tojson }}}'
)
GALLERY_TEMPLATE = "{{ value_json.gallery_version }}"


def object_id(device_id: str) -> str:
    """A device id as a discovery topic level ([A-Za-z0-9_-]); a device id with a '.' gets a short hash of the
    original appended, so that `door.1` and `door_1` stay two devices."""
    safe = _UNSAFE.sub("_", device_id)
    if safe != device_id:
        safe += "_" + hashlib.sha256(device_id.encode()).hexdigest()[:6]
    return safe


@dataclass(frozen=True)
class Door:
    device_id: str
    site: str
    agent_version: str


def discovery_messages(door: Door, config: HomeAssistantSection, server_version: str) -> list[tuple[str, bytes]]:
    """(topic, payload) of the door's discovery messages."""
    oid = object_id(door.device_id)
    status_topic = topics.edge_status(door.device_id)
    events_topic = topics.edge_events(door.device_id)
    common: dict[str, Any] = {
        "dev": {
            "ids": [f"faceattend_{oid}"],
            "name": f"Door {door.device_id} ({door.site})",
            "mf": "faceattend",
            "mdl": "edge agent",
            "sw": door.agent_version,
        },
        "o": {"name": "faceattend", "sw": server_version},
        "avty": [{"t": status_topic, "val_tpl": AVAILABILITY_TEMPLATE}],
        "qos": 1,
    }
    entities: list[tuple[str, str, dict[str, Any]]] = [
        (
            "sensor",
            "last_person",
            {
                "name": "Last person",
                "stat_t": events_topic,
                "val_tpl": LAST_PERSON_TEMPLATE,
                "json_attr_t": events_topic,
                "json_attr_tpl": LAST_PERSON_ATTRIBUTES,
                "ic": "mdi:account-check",
            },
        ),
        (
            "event",
            "attendance",
            {
                "name": "Attendance",
                "stat_t": events_topic,
                "evt_typ": list(EVENT_TYPES),
                "val_tpl": ATTENDANCE_TEMPLATE,
                "ic": "mdi:door",
            },
        ),
        (
            "sensor",
            "gallery_version",
            {
                "name": "Gallery version",
                "stat_t": status_topic,
                "val_tpl": GALLERY_TEMPLATE,
                "ent_cat": "diagnostic",
                "ic": "mdi:database-sync",
            },
        ),
    ]
    out = []
    for component, key, options in entities:
        unique = f"faceattend_{oid}_{key}"
        payload = {**common, **options, "uniq_id": unique}
        topic = f"{config.prefix}/{component}/{config.node_id}/{oid}_{key}/config"
        out.append((topic, json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()))
    return out


class HomeAssistantDiscovery:
    """Announces every door heard of; re-announces all at Home Assistant's birth message. Its own link (clean
    session); `start()` before or after the link's."""

    def __init__(self, link: MqttLink, config: HomeAssistantSection, server_version: str) -> None:
        self._link = link
        self._config = config
        self._server_version = server_version
        self._lock = threading.Lock()
        self._doors: dict[str, Door] = {}
        self._announced = 0
        self.birth_topic = f"{config.prefix}/status"

    def start(self) -> None:
        self._link.add_connection_listener(self._on_connection)
        self._link.subscribe(topics.ALL_EDGE_STATUS, 1, self._on_status)
        self._link.subscribe(self.birth_topic, 1, self._on_birth)
        log.info("Home Assistant discovery under %s/ (birth topic %s)", self._config.prefix, self.birth_topic)

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._link.wait_subscribed(topics.ALL_EDGE_STATUS, timeout) and self._link.wait_subscribed(
            self.birth_topic, timeout
        )

    def doors(self) -> list[Door]:
        with self._lock:
            return sorted(self._doors.values(), key=lambda d: d.device_id)

    def announced(self) -> int:
        """Discovery messages handed to the link so far."""
        with self._lock:
            return self._announced

    def _on_status(self, msg: InboundMessage) -> None:
        if not msg.payload:
            return  # a cleared retained status
        try:
            device = topics.parse_topic(msg.topic).device
            status = EdgeStatus.from_json(msg.payload)
        except (TopicError, PayloadError) as exc:
            log.debug("Home Assistant discovery: status on %s ignored: %s", msg.topic, exc)
            return
        if device != status.device_id:
            return  # the ingest logs such a message; nothing to announce for it
        door = Door(status.device_id, status.site, status.agent_version)
        with self._lock:
            known = self._doors.get(door.device_id)
            self._doors[door.device_id] = door
        if known != door:
            self._announce([door])

    def _on_connection(self, connected: bool) -> None:
        if connected and self.doors():
            self._announce(self.doors())

    def _on_birth(self, msg: InboundMessage) -> None:
        if msg.payload.strip() != b"online":
            return
        doors = self.doors()
        log.info("Home Assistant is online: announcing %d door(s)", len(doors))
        self._announce(doors)

    def _announce(self, doors: list[Door]) -> None:
        for door in doors:
            for topic, payload in discovery_messages(door, self._config, self._server_version):
                try:
                    self._link.publish(topic, payload, qos=1, retain=False)
                except MqttError as exc:  # the link was stopped meanwhile
                    log.warning("Home Assistant discovery for %s not sent: %s", door.device_id, exc)
                    return
                with self._lock:
                    self._announced += 1
