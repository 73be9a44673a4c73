"""A minimal MQTT 3.1.1 broker, embedded in the local demo so that it runs on a machine with no broker installed.

For the demo and tests only; for production use Mosquitto (see deploy/). It runs on its own asyncio loop in a
background thread of the demo process and keeps everything in memory: nothing survives `stop()`.

What it does: the subset of MQTT 3.1.1 that the wire contract and `models.contract.mqtt_link.PahoMqttLink` rely on
(checked with that link by tests/integration/test_embedded_broker.py):

- CONNECT / CONNACK, protocol level 4 only (MQTT 5 and 3.1 clients are refused with return code 1); any
  credentials are accepted; a second connection with a client id in use takes the session over (no will sent).
- SUBSCRIBE / UNSUBSCRIBE with `+` and `#` (which do not match `$` topics at the first level); granted QoS <= 1.
- QoS 0 and 1 both ways (PUBACK once the message is routed); an inbound QoS 2 publish is accepted
  (PUBREC / PUBREL / PUBCOMP) and delivered at QoS 1.
- Retained messages, replayed with the retain flag on SUBSCRIBE; an empty retained payload clears the topic.
- Persistent sessions (clean_session=0): subscriptions kept and QoS 1 messages queued while the client is away;
  unacknowledged ones are re-sent (DUP) when it comes back.
- Last will on any connection loss without DISCONNECT (socket closed, keep-alive expired, protocol violation).
- PINGREQ; keep-alive (a silent client is dropped after 1.5 x its keep-alive); a maximum packet size (counted
  after the fixed header; a larger packet closes the connection, as Mosquitto does).
- Bounded per-client state: at most `max_inflight` unacknowledged QoS 1 messages on the wire and
  `max_queued_messages` waiting behind them; beyond that new messages are dropped (Mosquitto's policy). QoS 0 is
  dropped for an absent client and for one whose socket already holds `MAX_QOS0_BACKLOG` unsent bytes.

Not there: TLS, authentication and ACLs, MQTT 5, shared subscriptions (refused), persistence to disk, $SYS
topics.

Why not amqtt (0.12.1, the maintained pure-Python broker): it discards the persistent session of every anonymous
client, and with a username it re-delivers queued messages with retain=1 (consumers would take live events for
replays); it has no packet size limit and unbounded session queues, and pins websockets==15.0.1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import secrets
import struct
import threading
from collections import deque
from dataclasses import dataclass
from types import TracebackType

from models.contract.limits import MAX_CHUNK_SIZE, MIB
from models.contract.mqtt_link import SHARE_PREFIX, check_topic_filter
from models.errors import ConfigError, EmbeddedBrokerError, MqttError

log = logging.getLogger(__name__)

# a 1 MiB gallery chunk plus topic and header, with room to spare (the tests configure Mosquitto the same way)
DEFAULT_MAX_PACKET_SIZE = 2 * MAX_CHUNK_SIZE
DEFAULT_MAX_INFLIGHT = 20  # Mosquitto's max_inflight_messages
DEFAULT_MAX_QUEUED = 1000  # Mosquitto's max_queued_messages
MAX_QOS0_BACKLOG = 8 * MIB  # unsent bytes to one client beyond which its QoS 0 messages are dropped
CONNECT_TIMEOUT_S = 10.0  # a new connection must send CONNECT within this
KEEPALIVE_GRACE = 1.5  # MQTT 3.1.1 §3.1.2.10
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_MAX_PACKET_ID = 65535


class _Type(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


_CONNACK_BAD_PROTOCOL = 1
_CONNACK_BAD_CLIENT_ID = 2
_SUBACK_FAILURE = 0x80
_PINGRESP = bytes([_Type.PINGRESP << 4, 0])


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


# ---- wire format ----------------------------------------------------------------------------------------------------


def _packet(first_byte: int, body: bytes) -> bytes:
    header = bytearray([first_byte])
    remaining = len(body)
    while True:
        remaining, digit = divmod(remaining, 128)
        header.append(digit | 0x80 if remaining else digit)
        if not remaining:
            return bytes(header) + body


def _text(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def _ack(kind: _Type, packet_id: int) -> bytes:
    return _packet(kind << 4, struct.pack(">H", packet_id))


def _publish_packet(message: Message, packet_id: int, dup: bool) -> bytes:
    flags = (dup << 3) | (message.qos << 1) | message.retain
    ident = struct.pack(">H", packet_id) if message.qos else b""
    return _packet(_Type.PUBLISH << 4 | flags, _text(message.topic) + ident + message.payload)


class _Fields:
    """Cursor over a packet body; running past its end is a protocol violation."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def done(self) -> bool:
        return self._pos >= len(self._data)

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise EmbeddedBrokerError("packet shorter than its fields")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        high, low = self.take(2)
        return high << 8 | low

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise EmbeddedBrokerError("string field is not UTF-8") from None

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._pos)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching; wildcards at the first level do not match `$` topics (§4.7.2)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if i >= len(topic_levels) or level not in ("+", topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


def _check_topic_name(topic: str) -> str:
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise EmbeddedBrokerError(f"invalid topic name {topic!r}")
    return topic


# ---- broker state (touched only on the broker's loop) -------------------------------------------------------------


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self.session: _Session | None = None  # None until CONNECT is accepted, and again once taken over
        self.will: Message | None = None

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def backlog(self) -> int:
        return self.writer.transport.get_write_buffer_size()


class _Session:
    def __init__(self, client_id: str, persistent: bool) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.subscriptions: dict[str, int] = {}  # filter -> granted QoS
        self.inflight: dict[int, Message] = {}  # packet id -> QoS 1 message sent, awaiting PUBACK (in send order)
        self.queue: deque[Message] = deque()  # QoS 1 messages waiting for an in-flight slot or for the client
        self.qos2_received: set[int] = set()  # inbound QoS 2 ids routed, awaiting PUBREL (routed once)
        self.connection: _Connection | None = None
        self.dropping = False  # queue full: warned once until it has room again
        self._last_id = 0

    def next_packet_id(self) -> int:
        while True:  # terminates: inflight is far smaller than the id space
            self._last_id = self._last_id % _MAX_PACKET_ID + 1
            if self._last_id not in self.inflight:
                return self._last_id


class _Core:
    def __init__(self, max_packet_size: int, max_inflight: int, max_queued: int) -> None:
        self._max_packet_size = max_packet_size
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, Message] = {}
        self._connections: set[_Connection] = set()
        self._stopping = False

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        conn = _Connection(writer, peer)
        self._connections.add(conn)
        if self._stopping:  # accepted just before the listener closed
            writer.transport.abort()
        disconnected = False
        try:
            first, body = await asyncio.wait_for(self._read_packet(reader), CONNECT_TIMEOUT_S)
            if first >> 4 != _Type.CONNECT:
                raise EmbeddedBrokerError("first packet is not CONNECT")
            keepalive = self._on_connect(conn, body)
            timeout = keepalive * KEEPALIVE_GRACE if keepalive else None
            while conn.session is not None:
                first, body = await asyncio.wait_for(self._read_packet(reader), timeout)
                if first >> 4 == _Type.DISCONNECT:
                    disconnected = True
                    break
                self._on_packet(conn, first, body)
        except (asyncio.IncompleteReadError, OSError):
            log.info("mqtt broker: %s closed the connection", peer)
        except asyncio.TimeoutError:
            log.info("mqtt broker: %s silent too long (no CONNECT, or past its keep-alive); dropped", peer)
        except EmbeddedBrokerError as exc:
            log.warning("mqtt broker: %s broke the protocol (%s); connection closed", peer, exc)
        finally:
            self._end(conn, send_will=not disconnected)

    async def shutdown(self, server: asyncio.Server) -> None:
        self._stopping = True
        server.close()
        for conn in list(self._connections):
            conn.writer.transport.abort()  # its read fails at once and serve_client() ends
        # wait for those, and for connections accepted just before close() (turned away on arrival), so that no
        # task is pending when the loop closes; cancel any that hangs
        current = asyncio.current_task()
        while others := asyncio.all_tasks() - {current}:
            _, stuck = await asyncio.wait(others, timeout=1.0)
            for task in stuck:
                task.cancel()
        await server.wait_closed()

    async def _read_packet(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await reader.readexactly(1))[0]
        length = 0
        for shift in range(0, 28, 7):  # the remaining length takes at most 4 bytes
            digit = (await reader.readexactly(1))[0]
            length |= (digit & 0x7F) << shift
            if not digit & 0x80:
                break
        else:
            raise EmbeddedBrokerError("malformed remaining length")
        if length > self._max_packet_size:
            raise EmbeddedBrokerError(f"packet of {length} bytes exceeds max_packet_size {self._max_packet_size}")
        return first, await reader.readexactly(length)

    def _end(self, conn: _Connection, send_will: bool) -> None:
        self._connections.discard(conn)
        conn.writer.close()
        session = conn.session
        if session is None:
            return  # never connected, or taken over (the new connection owns the session)
        conn.session = None
        session.connection = None
        if not session.persistent:
            del self._sessions[session.client_id]
        log.info("mqtt broker: %s (%s) disconnected", session.client_id, conn.peer)
        if send_will and conn.will is not None and not self._stopping:
            self._route(conn.will)

    # ---- inbound packets ----

    def _on_connect(self, conn: _Connection, body: bytes) -> int:
        """Accept or refuse a CONNECT; returns the keep-alive. `conn.session` stays None when refused."""
        fields = _Fields(body)
        protocol, level, flags, keepalive = fields.text(), fields.u8(), fields.u8(), fields.u16()
        if protocol != "MQTT" or level != 4:
            log.warning("mqtt broker: %s speaks %s level %d; only MQTT 3.1.1 is served", conn.peer, protocol, level)
            conn.send(_packet(_Type.CONNACK << 4, bytes([0, _CONNACK_BAD_PROTOCOL])))
            return 0
        if flags & 0x01:
            raise EmbeddedBrokerError("reserved CONNECT flag set")
        client_id = fields.text()
        clean = bool(flags & 0x02)
        will = None
        if flags & 0x04:
            topic, payload, will_qos = fields.text(), fields.binary(), (flags >> 3) & 0x03
            if will_qos > 2:
                raise EmbeddedBrokerError("will QoS 3")
            will = Message(_check_topic_name(topic), payload, min(will_qos, 1), bool(flags & 0x20))
        if flags & 0x80:
            fields.text()  # user name: anyone is welcome on the demo broker
        if flags & 0x40:
            fields.binary()  # password
        if not client_id:
            if not clean:
                conn.send(_packet(_Type.CONNACK << 4, bytes([0, _CONNACK_BAD_CLIENT_ID])))
                return 0
            client_id = f"auto-{secrets.token_hex(8)}"
        existing = self._sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            self._take_over(existing.connection)
        if existing is None or clean:
            session = _Session(client_id, persistent=not clean)
            self._sessions[client_id] = session
        else:
            session = existing
        session.connection = conn
        conn.session = session
        conn.will = will
        conn.send(_packet(_Type.CONNACK << 4, bytes([int(session is existing), 0])))
        log.info("mqtt broker: %s connected from %s (session present: %s)", client_id, conn.peer, session is existing)
        # §4.4: unacknowledged messages go again, with their ids, before anything newer
        for packet_id, message in session.inflight.items():
            conn.send(_publish_packet(message, packet_id, dup=True))
        self._pump(session)
        return keepalive

    def _take_over(self, old: _Connection) -> None:
        log.info("mqtt broker: %s reconnected; closing its previous connection", old.peer)
        old.session = None
        old.will = None  # the client is evidently alive
        old.writer.transport.abort()

    def _on_packet(self, conn: _Connection, first: int, body: bytes) -> None:
        session = conn.session
        if session is None:  # the caller loops only while there is one
            raise EmbeddedBrokerError("packet without a session")
        kind, flags = first >> 4, first & 0x0F
        if kind == _Type.PUBLISH:
            self._on_publish(conn, session, flags, body)
        elif kind == _Type.PUBACK:
            session.inflight.pop(_Fields(body).u16(), None)
            self._pump(session)
        elif kind == _Type.PUBREL and flags == 0x02:
            packet_id = _Fields(body).u16()
            session.qos2_received.discard(packet_id)
            conn.send(_ack(_Type.PUBCOMP, packet_id))
        elif kind == _Type.SUBSCRIBE and flags == 0x02:
            self._on_subscribe(conn, session, body)
        elif kind == _Type.UNSUBSCRIBE and flags == 0x02:
            fields = _Fields(body)
            packet_id = fields.u16()
            while not fields.done:
                session.subscriptions.pop(fields.text(), None)
            conn.send(_ack(_Type.UNSUBACK, packet_id))
        elif kind == _Type.PINGREQ:
            conn.send(_PINGRESP)
        else:
            raise EmbeddedBrokerError(f"unexpected packet type {kind} (flags {flags:#x})")

    def _on_publish(self, conn: _Connection, session: _Session, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise EmbeddedBrokerError("PUBLISH with QoS 3")
        fields = _Fields(body)
        topic = _check_topic_name(fields.text())
        packet_id = fields.u16() if qos else 0
        message = Message(topic, fields.rest(), min(qos, 1), bool(flags & 0x01))
        if qos == 2:
            if packet_id not in session.qos2_received:  # a DUP of a routed one is not routed again
                session.qos2_received.add(packet_id)
                self._route(message)
            conn.send(_ack(_Type.PUBREC, packet_id))
            return
        self._route(message)
        if qos == 1:
            conn.send(_ack(_Type.PUBACK, packet_id))

    def _on_subscribe(self, conn: _Connection, session: _Session, body: bytes) -> None:
        fields = _Fields(body)
        packet_id = fields.u16()
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        while not fields.done:
            topic_filter, requested = fields.text(), fields.u8()
            if requested > 2:
                raise EmbeddedBrokerError(f"SUBSCRIBE with QoS {requested}")
            try:
                check_topic_filter(topic_filter)
            except MqttError:
                codes.append(_SUBACK_FAILURE)
                continue
            if topic_filter.startswith(SHARE_PREFIX):  # not implemented: refused rather than never delivered
                codes.append(_SUBACK_FAILURE)
                continue
            qos = min(requested, 1)
            session.subscriptions[topic_filter] = qos
            codes.append(qos)
            granted.append((topic_filter, qos))
        if not codes:
            raise EmbeddedBrokerError("SUBSCRIBE without a filter")
        conn.send(_packet(_Type.SUBACK << 4, struct.pack(">H", packet_id) + bytes(codes)))
        for topic_filter, qos in granted:
            for stored in self._retained.values():
                if topic_matches(topic_filter, stored.topic):
                    self._deliver(session, Message(stored.topic, stored.payload, min(stored.qos, qos), True))

    # ---- routing and delivery ----

    def _route(self, message: Message) -> None:
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for session in self._sessions.values():
            # overlapping filters of one client: one copy, at the highest granted QoS
            granted = max((q for f, q in session.subscriptions.items() if topic_matches(f, message.topic)), default=-1)
            if granted >= 0:
                # §3.3.1.3: the retain flag is cleared on messages delivered to existing subscriptions
                self._deliver(session, Message(message.topic, message.payload, min(message.qos, granted), False))

    def _deliver(self, session: _Session, message: Message) -> None:
        conn = session.connection
        if message.qos == 0:
            if conn is not None and conn.backlog() < MAX_QOS0_BACKLOG:
                conn.send(_publish_packet(message, 0, dup=False))
            return
        if conn is not None and not session.queue and len(session.inflight) < self._max_inflight:
            self._send_qos1(session, conn, message)
        elif len(session.queue) < self._max_queued:
            session.queue.append(message)
        elif not session.dropping:
            session.dropping = True
            log.warning(
                "mqtt broker: %d messages queued for %s; dropping new ones", len(session.queue), session.client_id
            )

    def _send_qos1(self, session: _Session, conn: _Connection, message: Message) -> None:
        packet_id = session.next_packet_id()
        session.inflight[packet_id] = message
        conn.send(_publish_packet(message, packet_id, dup=False))

    def _pump(self, session: _Session) -> None:
        conn = session.connection
        if conn is None:
            return
        while session.queue and len(session.inflight) < self._max_inflight:
            self._send_qos1(session, conn, session.queue.popleft())
        if len(session.queue) < self._max_queued:
            session.dropping = False


# ---- the embeddable broker ------------------------------------------------------------------------------------------


class EmbeddedBroker:
    """An in-process MQTT 3.1.1 broker for the demo: `start()` returns its URL (for `MqttConfig.from_url`),
    `stop()` closes every connection and frees the port. Also a context manager. Started once.

    `port=0` picks a free port. `log_level` applies to this module's logger: warnings only unless asked.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_queued_messages: int = DEFAULT_MAX_QUEUED,
        log_level: int = logging.WARNING,
    ) -> None:
        if not host:
            raise ConfigError("embedded broker: host must not be empty")
        if not 0 <= port <= 65535:
            raise ConfigError(f"embedded broker: port {port} is not in [0, 65535]")
        if max_packet_size < 1024 or max_inflight < 1 or max_queued_messages < 0:
            raise ConfigError("embedded broker: need max_packet_size >= 1024, max_inflight >= 1, max_queued >= 0")
        self._host = host
        self._port = port
        self._core = _Core(max_packet_size, max_inflight, max_queued_messages)
        self._log_level = log_level
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise EmbeddedBrokerError("embedded broker not started")
        return self._bound_port

    @property
    def url(self) -> str:
        # a wildcard listen address is reached through the loopback
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        return f"mqtt://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> str:
        if self._thread is not None:
            raise EmbeddedBrokerError("embedded broker already started (a broker is started once)")
        log.setLevel(self._log_level)
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        try:
            self._bound_port = started.result(START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise EmbeddedBrokerError(f"embedded broker did not start within {START_TIMEOUT_S}s") from None
        log.info("mqtt broker: listening on %s (demo only; use Mosquitto in production)", self.url)
        return self.url

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)  # _run then shuts the listener and connections down
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("mqtt broker: did not stop within %ss; left to die with the process", STOP_TIMEOUT_S)
        else:
            log.info("mqtt broker: stopped")

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        try:
            try:
                server = loop.run_until_complete(asyncio.start_server(self._core.serve_client, self._host, self._port))
            except OSError as exc:
                started.set_exception(EmbeddedBrokerError(f"cannot listen on {self._host}:{self._port}: {exc}"))
                return
            self._loop = loop
            started.set_result(int(server.sockets[0].getsockname()[1]))
            loop.run_forever()
            loop.run_until_complete(self._core.shutdown(server))
        finally:
            loop.close()
