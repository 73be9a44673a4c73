"""The MQTT connection used by the edge agent and the enrollment server: a small interface and its paho-mqtt 2.x
implementation.

What `PahoMqttLink` guarantees, and what it leaves to the caller (verified by tests/integration/test_mqtt_link.py
against a real Mosquitto):

- Connection: `start()` returns at once (paho `connect_async` + `loop_start`); paho's own network thread
  connects and reconnects with exponential back-off between `reconnect_min_delay` and `reconnect_max_delay`.
  There is no reconnect loop of ours. A broker that is down at start-up is simply retried.
- Subscriptions are remembered and (re)made in `on_connect`, so they survive reconnects and broker restarts even
  with a clean session. Every SUBSCRIBE makes the broker replay retained messages: handlers see duplicates.
  `wait_subscribed(filter)` turns True once the broker's SUBACK granted the filter on the current connection
  (paho's `on_subscribe`), and False again when the connection is lost: after it, a message published to the
  filter is delivered.
- Handlers run on paho's network thread, one at a time; an exception in a handler is logged and the loop goes
  on. A slow handler delays everything else on the link (including PUBACKs and keep-alives): hand heavy work to
  a worker thread. Never call `stop()` from a handler.
- Acknowledging what we receive: by default paho sends the PUBACK of an inbound QoS 1 message when the handler
  returns. A link made with `manual_ack=True` sends it only when `ack(message)` is called (from any thread), so a
  consumer can acknowledge once the message is safely stored: until then the broker keeps it, counts it against
  the client's in-flight window (MQTT 5: `receive_maximum`; MQTT 3.1.1: the broker's `max_inflight_messages`)
  and, for a persistent session, sends it again after a reconnect. An ack for a message of an earlier connection
  is not sent (the broker sends that message again on the new connection, where it is acknowledged anew).
- Shared subscriptions: a filter `$share/{group}/{filter}` (MQTT 5, also accepted from 3.1.1 clients by
  Mosquitto 2) makes the broker hand each message to one member of the group; the handler sees the real topic.
- Publishing: `publish()` never silently drops a QoS 1 message. paho keeps every QoS >= 1 message in its memory
  queue (`max_queued_messages_set(0)`: unbounded; the durable outbox upstream bounds it) until the broker's
  PUBACK, and resends it after a reconnect, also when `publish()` was called while disconnected (paho then returns
  MQTT_ERR_NO_CONN but keeps the message). The returned `PublishHandle.wait(timeout)` turns True on the PUBACK.
  That memory queue dies with the process: only the outbox makes an event survive `kill -9`. A message
  resent after a reconnect may reach subscribers twice (QoS 1 is at-least-once): consumers de-duplicate.
  QoS 0 messages published while disconnected are dropped; their handle is failed at once.
- Note for users of paho directly: after a publish made while disconnected, paho's own
  `MQTTMessageInfo.wait_for_publish()` / `is_published()` raise RuntimeError even once the message went through
  (its rc stays MQTT_ERR_NO_CONN); `PublishHandle` tracks PUBACKs through `on_publish` instead.
- Last will: set before connecting. `stop()` sends DISCONNECT, and the broker then discards the will (MQTT
  rule); publish a "stopped" status and wait for its PUBACK before stopping.
- Persistent sessions (`clean_session=False`, a stable `client_id`): the broker keeps subscriptions and queues
  QoS 1 messages for the client while it is away (Mosquitto's `max_queued_messages`, 1000 by default, bounds
  that queue: size it for the longest outage of a consumer).
"""

from __future__ import annotations

import abc
import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from models.errors import ConfigError, MqttError

log = logging.getLogger(__name__)

PROTOCOLS = ("3.1.1", "5")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs
    client_id: str = ""  # "" = a random one (only with clean_session)
    keepalive: int = 30
    clean_session: bool = True
    protocol: str = "3.1.1"
    session_expiry: int = 7 * 24 * 3600  # MQTT 5 only: how long the broker keeps a persistent session (s)
    ca_file: str | None = None  # TLS: CA bundle; None = the system's
    cert_file: str | None = None  # TLS client certificate (per-device auth)
    key_file: str | None = None
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 30
    max_inflight: int = 20
    manual_ack: bool = False  # inbound QoS 1 messages are acknowledged by `ack()`, not on the handler's return
    receive_maximum: int | None = None  # MQTT 5 only: unacknowledged inbound messages the broker may have out

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("mqtt: host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"mqtt: port {self.port} is not in [1, 65535]")
        if self.client_id and not _CLIENT_ID.fullmatch(self.client_id):
            raise ConfigError(f"mqtt: client_id {self.client_id!r} must be 1-128 characters of [A-Za-z0-9_.:-]")
        if not self.clean_session and not self.client_id:
            raise ConfigError("mqtt: a persistent session (clean_session=False) needs a stable client_id")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"mqtt: protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"mqtt: keepalive {self.keepalive} is not in [5, 65535] seconds")
        if not 1 <= self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ConfigError("mqtt: reconnect delays must satisfy 1 <= min <= max")
        if self.max_inflight < 1:
            raise ConfigError("mqtt: max_inflight must be >= 1")
        if (self.ca_file or self.cert_file or self.key_file) and not self.tls:
            raise ConfigError("mqtt: ca_file / cert_file / key_file need TLS (an mqtts:// URL)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("mqtt: cert_file and key_file go together")
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt: a password needs a username")
        if self.receive_maximum is not None:
            if self.protocol != "5":
                raise ConfigError('mqtt: receive_maximum is an MQTT 5 setting (protocol "5")')
            if not 1 <= self.receive_maximum <= 65535:
                raise ConfigError(f"mqtt: receive_maximum {self.receive_maximum} is not in [1, 65535]")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MqttConfig:
        """`mqtt://[user[:password]@]host[:port]` or `mqtts://...` (TLS, default port 8883); credentials
        percent-decoded; every other field as a keyword (client_id=..., ca_file=..., clean_session=...)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"mqtt: URL scheme must be mqtt or mqtts, got {parts.scheme!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError("mqtt: the URL takes no path, query or fragment; pass options as keywords")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"mqtt: bad port in URL: {exc}") from None
        tls = parts.scheme == "mqtts"
        fields: dict[str, Any] = {
            "host": parts.hostname or "",
            "port": port or (8883 if tls else 1883),
            "tls": tls,
            "username": unquote(parts.username) if parts.username is not None else None,
            "password": unquote(parts.password) if parts.password is not None else None,
        }
        fields.update(options)
        try:
            return cls(**fields)
        except TypeError as exc:  # an unknown keyword
            raise ConfigError(f"mqtt: {exc}") from None

    @property
    def url(self) -> str:
        """For logs: no password."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool  # True when replayed from the broker's retained store
    mid: int = 0  # the packet id, for `MqttLink.ack` on a manual_ack link (QoS >= 1)
    connection: int = 0  # which connection of the link delivered it (an ack goes out on that one only)


Handler = Callable[[InboundMessage], None]


class PublishHandle:
    """The fate of one publish. `wait(timeout)` is True once the broker acknowledged it: PUBACK for QoS 1, the
    message written to the socket for QoS 0. False on timeout, or at once when it can never be acknowledged
    (link stopped, QoS 0 while disconnected)."""

    def __init__(self, mid: int, qos: int) -> None:
        self.mid = mid
        self.qos = qos
        self.reason_code: int | None = None  # MQTT 5 PUBACK reason (0 = success); 0 under 3.1.1
        self._done = threading.Event()
        self._failed = False

    def wait(self, timeout: float | None = None) -> bool:
        self._done.wait(timeout)
        return self.acknowledged

    @property
    def acknowledged(self) -> bool:
        return self._done.is_set() and not self._failed

    @property
    def failed(self) -> bool:
        """Resolved without an acknowledgement (link stopped, QoS 0 while disconnected): waiting longer is useless."""
        return self._done.is_set() and self._failed

    @property
    def rejected(self) -> bool:
        """MQTT 5 only: the broker acknowledged but refused the message (e.g. not authorised); do not retry."""
        return self.reason_code is not None and self.reason_code >= 0x80

    def _resolve(self, reason_code: int) -> None:
        self.reason_code = reason_code
        self._done.set()

    def _fail(self) -> None:
        self._failed = True
        self._done.set()


class MqttLink(abc.ABC):
    """What the edge agent and the server need from MQTT; tests and other transports can substitute it."""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin connecting in the background; returns at once."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Disconnect cleanly (the will is not sent) and stop the network thread; unacknowledged handles fail."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle: ...

    @abc.abstractmethod
    def subscribe(self, topic_filter: str, qos: int, handler: Handler) -> None:
        """Remembered: (re)made on every connect. One handler per filter; a later call replaces it."""

    @abc.abstractmethod
    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        """True once the broker granted `topic_filter` (SUBACK) on the current connection; False on timeout."""

    @abc.abstractmethod
    def unsubscribe(self, topic_filter: str) -> None: ...

    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @abc.abstractmethod
    def wait_connected(self, timeout: float | None = None) -> bool: ...

    @abc.abstractmethod
    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        """Called with True on every (re)connect and False on every loss, on the network thread."""

    @abc.abstractmethod
    def ack(self, message: InboundMessage) -> None:
        """Acknowledge `message` (QoS >= 1) on a link made with `manual_ack`; on other links the handler's return
        already did, and this does nothing."""


SHARE_PREFIX = "$share/"


def shared_filter(group: str, topic_filter: str) -> str:
    """`$share/{group}/{filter}`: each matching message goes to one subscriber of the group."""
    return check_topic_filter(f"{SHARE_PREFIX}{group}/{topic_filter}")


def matched_filter(topic_filter: str) -> str:
    """The part of a filter that topics are matched against (a shared subscription's filter without its prefix)."""
    if topic_filter.startswith(SHARE_PREFIX):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def check_topic_filter(topic_filter: str) -> str:
    """MQTT filter rules: non-empty, `+` a whole level, `#` a whole last level; `$share/{group}/{filter}` with a
    group name free of wildcards."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        raise MqttError(f"topic filter {topic_filter!r} is empty or not a string")
    if topic_filter.startswith(SHARE_PREFIX):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1] or not parts[2]:
            raise MqttError(f"shared subscription {topic_filter!r} must be $share/GROUP/FILTER")
    levels = matched_filter(topic_filter).split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            raise MqttError(f"topic filter {topic_filter!r}: wildcards must fill a level ('#' only the last)")
    return topic_filter


def _not_the_stop_race(record: logging.LogRecord) -> bool:
    # paho's network thread makes one more pass after disconnect() closed the socket and logs that pass at ERROR
    # ("Client is not connected ..."); a real connection loss is reported by our own on_disconnect instead
    return not record.getMessage().startswith("Client is not connected")


_PAHO_LOG = logging.getLogger(__name__ + ".paho")
_PAHO_LOG.addFilter(_not_the_stop_race)


class PahoMqttLink(MqttLink):
    def __init__(self, config: MqttConfig, *, will: Will | None = None) -> None:
        self._config = config
        self._will = will
        self._client_id = config.client_id or f"faceattend-{uuid.uuid4().hex[:16]}"
        # guards the tables below; never held while calling into paho, whose own locks are held while it calls
        # our callbacks (holding ours across a paho call could deadlock against the network thread)
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._pending: dict[int, PublishHandle] = {}
        self._early_acks: dict[int, int] = {}  # PUBACKs that beat publish() to registering their handle
        self._sub_mids: dict[int, list[str]] = {}  # SUBSCRIBE packet id -> its filters, until the SUBACK
        self._early_subacks: dict[int, list[bool]] = {}  # SUBACKs that beat subscribe() to registering the mid
        self._granted: dict[str, threading.Event] = {}  # filter -> set while granted on this connection
        self._listeners: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        self._connection = 0  # counts connections; inbound messages carry theirs (acks go out on it only)
        self._started = False
        self._stopped = False
        self._connect_failures = 0
        self._client = self._make_client()

    @property
    def client_id(self) -> str:
        return self._client_id

    def _make_client(self) -> mqtt.Client:
        cfg = self._config
        v5 = cfg.protocol == "5"
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # MQTT 5 expresses the session through clean_start + session expiry at connect time instead
            clean_session=None if v5 else cfg.clean_session,
            manual_ack=cfg.manual_ack,
        )
        client.enable_logger(_PAHO_LOG)
        client.suppress_exceptions = True  # a bug in a callback of ours must not end the network thread
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            try:
                client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
            except (OSError, ValueError) as exc:  # missing / unreadable / mismatched files
                raise ConfigError(f"mqtt: TLS setup failed: {exc}") from exc
        client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        if self._will is not None:
            w = self._will
            try:
                client.will_set(w.topic, w.payload, w.qos, w.retain)
            except ValueError as exc:  # wildcard or empty topic, bad qos
                raise MqttError(f"invalid last will on {w.topic!r}: {exc}") from None
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # ---- lifecycle ----

    def start(self) -> None:
        with self._lock:
            if self._started:
                raise MqttError("mqtt link already started (a link is started once)")
            self._started = True
        cfg = self._config
        options: dict[str, Any] = {}
        if cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if cfg.clean_session else cfg.session_expiry
            if cfg.receive_maximum is not None:
                props.ReceiveMaximum = cfg.receive_maximum
            options = {"clean_start": cfg.clean_session, "properties": props}
        log.info("mqtt: connecting to %s as %s", cfg.url, self._client_id)
        self._client.connect_async(cfg.host, cfg.port, cfg.keepalive, **options)
        self._client.loop_start()

    def stop(self) -> None:
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        self._client.disconnect()
        try:
            self._client.loop_stop()
        except AttributeError:
            # paho 2.x race (eclipse-paho/paho.mqtt.python#872): after disconnect() the network thread may end on
            # its own and clear its handle between loop_stop()'s check and its join(); the thread is gone either way
            log.debug("mqtt: network thread ended before loop_stop() joined it")
        self._connected.clear()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            self._early_acks.clear()
        for handle in pending:
            handle._fail()
        if pending:
            # paho's memory queue goes with the client; the outbox still holds these and resends them next time
            log.info("mqtt: stopped with %d unacknowledged publishes", len(pending))

    # ---- publish / subscribe ----

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        if self._stopped:
            raise MqttError(f"publish on {topic!r} after the link was stopped")
        if qos not in (0, 1, 2):
            raise MqttError(f"qos must be 0, 1 or 2, got {qos!r}")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, TypeError) as exc:  # wildcard / empty topic, payload too large or not bytes
            raise MqttError(f"cannot publish on {topic!r}: {exc}") from None
        handle = PublishHandle(info.mid, qos)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE or (qos == 0 and info.rc != mqtt.MQTT_ERR_SUCCESS):
            # not queued at all: a QoS 0 message while disconnected, or 65535 messages already unacknowledged
            log.warning("mqtt: publish on %s not queued: %s", topic, mqtt.error_string(info.rc))
            handle._fail()
            return handle
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.debug("mqtt: publish on %s queued while disconnected (mid %d)", topic, info.mid)
        with self._lock:
            reason = self._early_acks.pop(info.mid, None)
            if reason is None:
                self._pending[info.mid] = handle
        if reason is not None:
            handle._resolve(reason)
        return handle

    def subscribe(self, topic_filter: str, qos: int, handler: Handler) -> None:
        check_topic_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise MqttError(f"qos must be 0, 1 or 2, got {qos!r}")
        with self._lock:
            self._subs[topic_filter] = (qos, handler)
            self._granted.setdefault(topic_filter, threading.Event())
            # decided under the lock that on_connect also takes: either on_connect's snapshot holds this filter
            # or we see the connection and subscribe now (at worst both: a harmless double SUBSCRIBE)
            now = self._connected.is_set()
        if now:
            _rc, mid = self._client.subscribe(topic_filter, qos)
            self._track_subscribe(mid, [topic_filter])

    def wait_subscribed(self, topic_filter: str, timeout: float | None = None) -> bool:
        with self._lock:
            granted = self._granted.get(topic_filter)
        if granted is None:
            raise MqttError(f"wait_subscribed({topic_filter!r}): never subscribed on this link")
        return granted.wait(timeout)

    def _track_subscribe(self, mid: int | None, filters: list[str]) -> None:
        if mid is None:  # not sent (no connection): on_connect subscribes again
            return
        with self._lock:
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._sub_mids[mid] = filters
        if early is not None:
            self._grant(filters, early)

    def _grant(self, filters: list[str], ok: list[bool]) -> None:
        with self._lock:
            for topic_filter, granted in zip(filters, ok, strict=False):
                event = self._granted.get(topic_filter)
                if granted and event is not None and topic_filter in self._subs:
                    event.set()

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._subs.pop(topic_filter, None) is not None
            granted = self._granted.pop(topic_filter, None)
            now = self._connected.is_set()
        if granted is not None:
            granted.clear()
        if known and now:
            self._client.unsubscribe(topic_filter)

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def add_connection_listener(self, listener: Callable[[bool], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def ack(self, message: InboundMessage) -> None:
        if not self._config.manual_ack or message.qos == 0:
            return
        with self._lock:
            current = self._connected.is_set() and message.connection == self._connection
        if not current:
            # paho would send it on whatever connection is up now; the broker re-sends the message there instead
            log.debug("mqtt: ack of mid %d from an earlier connection not sent", message.mid)
            return
        self._client.ack(message.mid, message.qos)

    # ---- paho callbacks (network thread) ----

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            # paho keeps retrying with back-off; wrong credentials or ACLs keep failing until fixed
            log.error("mqtt: %s refused the connection: %s", self._config.url, reason)
            return
        with self._lock:
            self._connected.set()
            self._connection += 1
            subs = [(f, qos) for f, (qos, _) in self._subs.items()]
            listeners = list(self._listeners)
        self._connect_failures = 0
        log.info("mqtt: connected to %s (session present: %s)", self._config.url, flags.session_present)
        if subs:
            _rc, mid = client.subscribe(subs)
            self._track_subscribe(mid, [f for f, _ in subs])
        self._notify(listeners, True)

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self._connect_failures += 1
        # first failure loud, then one line in ten: a long outage should not flood the log
        level = logging.WARNING if self._connect_failures % 10 == 1 else logging.DEBUG
        log.log(level, "mqtt: cannot reach %s (attempt %d); retrying", self._config.url, self._connect_failures)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        with self._lock:
            was_connected = self._connected.is_set()
            self._connected.clear()
            listeners = list(self._listeners)
            for granted in self._granted.values():
                granted.clear()  # a new connection subscribes again
            self._sub_mids.clear()
            self._early_subacks.clear()
        if self._stopped:
            log.info("mqtt: disconnected from %s", self._config.url)
        elif was_connected:
            log.warning("mqtt: lost connection to %s (%s); paho reconnects", self._config.url, reason)
        if was_connected:
            self._notify(listeners, False)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        value = int(reason.value) if reason is not None else 0
        with self._lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                self._early_acks[mid] = value
        if value >= 0x80:
            log.warning("mqtt: broker refused publish mid %d: %s", mid, reason)
        if handle is not None:
            handle._resolve(value)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: list, _props: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            # typically an ACL: the filter stays remembered and is retried on the next reconnect
            log.error("mqtt: broker refused subscription (mid %d): %s", mid, ", ".join(failed))
        ok = [not r.is_failure for r in reasons]
        with self._lock:
            filters = self._sub_mids.pop(mid, None)
            if filters is None:
                self._early_subacks[mid] = ok
        if filters is not None:
            self._grant(filters, ok)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("mqtt: message with a non-UTF-8 topic dropped")
            return
        with self._lock:
            handlers = [h for f, (_, h) in self._subs.items() if mqtt.topic_matches_sub(matched_filter(f), topic)]
            connection = self._connection
        if not handlers:
            # on a manual_ack link it stays unacknowledged: the broker sends it again on the next connection
            level = logging.WARNING if self._config.manual_ack else logging.DEBUG
            log.log(level, "mqtt: message on %s matches no subscription (subscribed after connecting?)", topic)
            return
        inbound = InboundMessage(
            topic, bytes(message.payload), message.qos, bool(message.retain), message.mid, connection
        )
        for handler in handlers:
            try:
                handler(inbound)
            except Exception:
                log.exception("mqtt: handler for %s failed; the link goes on", topic)

    @staticmethod
    def _notify(listeners: list[Callable[[bool], None]], connected: bool) -> None:
        for listener in listeners:
            try:
                listener(connected)
            except Exception:
                log.exception("mqtt: connection listener failed")
