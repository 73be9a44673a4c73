"""Home Assistant MQTT discovery (enrollment_server/home_assistant.py) on a real Mosquitto: what a Home Assistant
subscribed to `homeassistant/#` receives, checked against Home Assistant's documented discovery schema, and its
templates rendered (Jinja2, as Home Assistant renders them) on real edge payloads.

The rules below are Home Assistant's documentation, encoded:
- https://www.home-assistant.io/integrations/mqtt/ ("MQTT Discovery": the discovery topic
  `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config` with ids of `[a-zA-Z0-9_-]`; the payload a JSON
  object whose keys may be abbreviated as its "Supported abbreviations" tables list, for the entity, for the device
  registry (`dev`) and for the origin (`o`, whose `name` is required); a `unique_id` and a `device` with identifiers
  or connections for an entity to join a device; "Using Availability topics": `availability` is a list of mappings
  with a required `topic`, optional `value_template`, `payload_available` (default `online`), not to be combined with
  `availability_topic`; the birth message `online` on `homeassistant/status`, after which discovery is re-sent);
- https://www.home-assistant.io/integrations/sensor.mqtt/ (`state_topic` required);
- https://www.home-assistant.io/integrations/event.mqtt/ (`state_topic` and `event_types`, a list of valid
  `event_type` strings, required; the rendered payload is JSON with an `event_type` element from that list).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import jinja2
from agent_helpers import Tap
from waiting import wait_until

from enrollment_server.config import HomeAssistantSection
from enrollment_server.home_assistant import EVENT_TYPES, HomeAssistantDiscovery, object_id
from models.contract import topics
from models.contract.events import new_event
from models.contract.status import EdgeStatus

# the discovery topic, "MQTT Discovery" > "Discovery topic"
TOPIC = re.compile(
    r"(?P<prefix>[^/]+)/(?P<component>[^/]+)/(?:(?P<node>[a-zA-Z0-9_-]+)/)?(?P<object>[a-zA-Z0-9_-]+)/config"
)
# platforms supported by MQTT discovery (the two used here among them)
PLATFORMS = {"sensor", "event", "binary_sensor", "button", "device_automation", "tag", "switch", "text", "image"}
# "Supported abbreviations" (the entries a door's payload may use; the documented table is longer)
ABBREVIATIONS = {
    "avty": "availability",
    "avty_mode": "availability_mode",
    "avty_t": "availability_topic",
    "avty_tpl": "availability_template",
    "dev": "device",
    "dev_cla": "device_class",
    "en": "enabled_by_default",
    "ent_cat": "entity_category",
    "evt_typ": "event_types",
    "ic": "icon",
    "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template",
    "o": "origin",
    "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available",
    "stat_t": "state_topic",
    "t": "topic",
    "uniq_id": "unique_id",
    "unit_of_meas": "unit_of_measurement",
    "val_tpl": "value_template",
}
ENTITY_OPTIONS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device", "device_class",
    "enabled_by_default", "entity_category", "event_types", "icon", "json_attributes_template",
    "json_attributes_topic", "name", "object_id", "origin", "payload_available", "payload_not_available", "qos",
    "state_topic", "unique_id", "unit_of_measurement", "value_template", "encoding", "expire_after", "force_update",
}  # fmt: skip
# "Supported abbreviations for device registry configuration" and "... for origin info"
DEVICE_KEYS = {"cu": "configuration_url", "cns": "connections", "ids": "identifiers", "name": "name",
               "mf": "manufacturer", "mdl": "model", "mdl_id": "model_id", "hw": "hw_version", "sw": "sw_version",
               "sa": "suggested_area", "sn": "serial_number"}  # fmt: skip
ORIGIN_KEYS = {"name": "name", "sw": "sw_version", "url": "support_url"}
REQUIRED = {"sensor": {"state_topic"}, "event": {"state_topic", "event_types"}}
ENTITY_CATEGORIES = {"config", "diagnostic"}


def expand(mapping: dict, table: dict[str, str], allowed: set[str]) -> dict:
    out = {}
    for key, value in mapping.items():
        full = table.get(key, key)
        assert full in allowed, f"{key!r} is neither a documented option nor its abbreviation"
        assert full not in out, f"{full!r} given twice (abbreviated and not)"
        out[full] = value
    return out


def check_discovery(topic: str, payload: bytes, prefix: str) -> tuple[str, dict]:
    """One discovery message against the documented schema; returns (component, expanded config)."""
    m = TOPIC.fullmatch(topic)
    assert m and m["prefix"] == prefix, topic
    component = m["component"]
    assert component in PLATFORMS, component
    config = json.loads(payload)
    assert isinstance(config, dict)
    config = expand(config, ABBREVIATIONS, ENTITY_OPTIONS)
    assert REQUIRED[component] <= set(config), (component, sorted(config))
    assert isinstance(config["unique_id"], str) and config["unique_id"]
    # "Best practice for entities with a unique_id is to set <object_id> to unique_id" (ids character class)
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", config["unique_id"])
    device = expand(config["device"], DEVICE_KEYS, set(DEVICE_KEYS.values()))
    assert device.get("identifiers") or device.get("connections")
    assert isinstance(device["identifiers"], list) and all(isinstance(i, str) for i in device["identifiers"])
    origin = expand(config["origin"], ORIGIN_KEYS, set(ORIGIN_KEYS.values()))
    assert isinstance(origin["name"], str) and origin["name"]
    assert "availability_topic" not in config  # not together with `availability`
    for entry in config["availability"]:
        entry = expand(
            entry, {**ABBREVIATIONS}, {"topic", "value_template", "payload_available", "payload_not_available"}
        )
        assert isinstance(entry["topic"], str) and "+" not in entry["topic"] and "#" not in entry["topic"]
    for key in ("state_topic", "json_attributes_topic"):
        if key in config:
            assert isinstance(config[key], str) and not set(config[key]) & {"+", "#"}
    if "entity_category" in config:
        assert config["entity_category"] in ENTITY_CATEGORIES
    if component == "event":
        types = config["event_types"]
        assert isinstance(types, list) and types and all(isinstance(t, str) and t for t in types)
    assert config.get("qos", 0) in (0, 1, 2)
    return component, config


def render(template: str, payload: bytes, this_state: str | None = None) -> str:
    """A value template rendered as Home Assistant does: `value`, `value_json` and `this` (the entity's state)."""
    env = jinja2.Environment(undefined=jinja2.ChainableUndefined)
    return env.from_string(template).render(
        value=payload.decode(), value_json=json.loads(payload), this={"state": this_state}
    )


def status(device: str, state: str = "online", gallery_version: int | None = 4) -> EdgeStatus:
    return EdgeStatus(
        state=state,
        device_id=device,
        site="hq",
        agent_version="0.1.0",
        gallery_version=gallery_version,
        fingerprint="dlib_resnet_v1-0123456789abcdef",
        ts=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        health={"pipeline": {"fps": 14.5}},
    )


def event(device: str, person: str | None) -> bytes:
    return new_event(
        seq=1,
        device_id=device,
        site="hq",
        camera="entrance",
        track_id=3,
        person_id=person,
        name=None if person is None else "Ada Lovelace",
        distance=0.41 if person else 0.72,
        margin=0.2,
        threshold=0.55,
        gallery_version=4,
        fingerprint="dlib_resnet_v1-0123456789abcdef",
    ).to_json()


def test_doors_are_announced_with_valid_discovery_and_again_at_home_assistants_birth(mosquitto, mqtt_links) -> None:
    config = HomeAssistantSection(discovery=True)
    ha = Tap(mosquitto.url, f"{config.prefix}/#").start()  # Home Assistant, listening for discovery
    try:
        edge = mqtt_links(mosquitto, client_id="door-1")
        # a retained status before the server starts: announced from the retained replay at subscribe
        assert edge.publish(topics.edge_status("door-1"), status("door-1").to_json(), qos=1, retain=True).wait(10)
        bridge = HomeAssistantDiscovery(mqtt_links(mosquitto, client_id="server-ha"), config, "9.9.9")
        bridge.start()
        assert bridge.wait_subscribed()
        configs = lambda: [d for d in ha.deliveries() if d.topic.endswith("/config")]  # noqa: E731
        assert wait_until(lambda: len(configs()) == 3, timeout=15), ha.deliveries()

        # a second door, with a '.' in its id (not allowed in a discovery topic level)
        door2 = "gate.2"
        assert edge.publish(topics.edge_status(door2), status(door2).to_json(), qos=1, retain=True).wait(10)
        assert wait_until(lambda: len(configs()) == 6, timeout=15)
        # repeated statuses of a known door announce nothing new
        assert edge.publish(topics.edge_status("door-1"), status("door-1").to_json(), qos=1, retain=True).wait(10)

        by_door: dict[str, dict[str, dict]] = {}
        for d in configs():
            assert not d.retain  # no ghost entities: Home Assistant's birth message brings them back instead
            component, cfg = check_discovery(d.topic, d.payload, config.prefix)
            door = cfg["device"]["ids"][0]
            by_door.setdefault(door, {})[cfg["unique_id"]] = {"component": component, **cfg}
        assert set(by_door) == {f"faceattend_{object_id('door-1')}", f"faceattend_{object_id(door2)}"}
        assert object_id(door2) != object_id("gate_2") and re.fullmatch(r"[a-zA-Z0-9_-]+", object_id(door2))
        entities = by_door["faceattend_door-1"]
        assert {e["component"] for e in entities.values()} == {"sensor", "event"} and len(entities) == 3
        assert len({u for door in by_door.values() for u in door}) == 6  # unique ids are unique

        # the templates, rendered on real payloads
        person = entities["faceattend_door-1_last_person"]
        attendance = entities["faceattend_door-1_attendance"]
        gallery = entities["faceattend_door-1_gallery_version"]
        assert person["state_topic"] == attendance["state_topic"] == topics.edge_events("door-1")
        avty = person["availability"][0]
        assert avty["t"] == topics.edge_status("door-1")
        for state, expected in (("online", "online"), ("stopped", "offline"), ("offline", "offline")):
            assert render(avty["val_tpl"], status("door-1", state).to_json()) == expected
        assert render(person["value_template"], event("door-1", "ada")) == "Ada Lovelace"
        assert render(person["value_template"], event("door-1", None), this_state="Ada Lovelace") == "Ada Lovelace"
        attributes = json.loads(render(person["json_attributes_template"], event("door-1", "ada")))
        assert attributes["person_id"] == "ada" and attributes["camera"] == "entrance"
        for who, kind in (("ada", "recognised"), (None, "unknown")):
            fired = json.loads(render(attendance["value_template"], event("door-1", who)))
            assert fired["event_type"] == kind and kind in attendance["event_types"] and fired["person_id"] == who
        assert tuple(attendance["event_types"]) == EVENT_TYPES
        assert gallery["entity_category"] == "diagnostic" and gallery["state_topic"] == topics.edge_status("door-1")
        assert render(gallery["value_template"], status("door-1").to_json()) == "4"

        # Home Assistant restarts: its birth message brings every door's discovery again; its will does not
        before = len(configs())
        ha_link = mqtt_links(mosquitto, client_id="home-assistant")
        assert ha_link.publish(bridge.birth_topic, b"offline", qos=1).wait(10)
        assert ha_link.publish(bridge.birth_topic, b"online", qos=1).wait(10)
        assert wait_until(lambda: len(configs()) == before + 6, timeout=15), len(configs())
        again = {d.topic: d.payload for d in configs()[before:]}
        assert again == {d.topic: d.payload for d in configs()[:before]}
        assert bridge.announced() == before + 6 and [d.device_id for d in bridge.doors()] == ["door-1", door2]

        # the broker restarts: Home Assistant's birth may come before the server is subscribed again, so the server
        # announces every door it knows as soon as it is back
        mosquitto.stop()
        mosquitto.start()
        assert wait_until(lambda: bridge.announced() >= before + 12, timeout=20), bridge.announced()
        print(
            f"\n[home assistant] {len(configs())} discovery messages for 2 doors, every one valid against the "
            f"documented schema; re-sent on the birth message"
        )
    finally:
        ha.stop()
