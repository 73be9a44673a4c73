"""MQTT ingest: every edge's attendance events, statuses and gallery acknowledgements into the store.

Flow. `Ingest.start()` subscribes (QoS 1) to the contract's server filters through the link, which remembers them
and re-subscribes after every reconnect. Handlers run on paho's network thread, so they only put the raw message
on a bounded queue; one worker thread decodes, validates and writes. Events are stored with
`Store.insert_events` in batches of whatever has queued up since the last commit (up to `batch_size`): under
light load each event is committed at once, under heavy load one commit carries many, which is what keeps SQLite
(one fsync per commit) and PostgreSQL ahead of the edges.

Acknowledged after the commit. The ingest link is made with `manual_ack` (`ingest_config`): the broker gets the
PUBACK of a message only once its fate is final: an event committed (new or a duplicate), a status or gallery
ack written, or a rejection counted. Until then the broker keeps the message in our session and sends it again
after a reconnect, so `kill -9`, an OOM kill or a power cut of the server loses nothing it had received: what was
queued or being written is redelivered to the next start and stored once (the `event_id` is the primary key).
The broker sends at most its in-flight window of unacknowledged messages (MQTT 5: our `receive_maximum`, 1000;
MQTT 3.1.1: the broker's `max_inflight_messages`). After a reconnect it sends again what the earlier connection
left unacknowledged while those copies may still be queued here, so the queue (4096) can hold more than one
window; when it is full the network thread waits for room (measured by tests/integration/test_ingest_load.py).

Confirmations (contract 1.1). After each commit the ingest publishes, per device, an `events_stored` message
(QoS 1, not retained) on `faceattend/v1/device/{device}/stored` naming the events of the batch that are now in
the database, duplicates included (a duplicate usually means the edge missed our earlier confirmation). A 1.1
edge keeps each event until it is confirmed and publishes it again when no confirmation comes: this is what
makes an event survive a broker that lost its state or dropped messages over its queue limit. Events sent by 1.0
edges (`schema_version` "1.0") are stored the same way but not confirmed: those edges never read confirmations.

Validation, per message (any failure is a *rejection*: logged with topic and reason, counted in
`IngestStats.rejected[reason]`, acknowledged, never stored, and the process carries on):

- `oversized`: over the contract's limit for its kind (checked before anything is parsed);
- `not_utf8`, `malformed` (not JSON, not an object, duplicate keys, NaN, bad `schema_version` spelling),
  `wrong_schema` (another `schema` name), `unknown_major` (a schema major this reader does not know),
  `invalid_field` (missing, mistyped or out-of-range field): the contract codec decides, the reason is only
  recovered from which check failed;
- `device_mismatch`: the payload's `device_id` differs from the device id in the topic. With per-device broker
  ACLs the topic is what the broker authenticated; a payload claiming another device is a misconfigured or
  hostile edge and must not be credited to that device;
- `site_mismatch`: the payload's `site` differs from the site the device is registered at. The registry is the
  source of truth, not the payload: `provision-device` records each device's site (`Store.register_device`), and
  a device never provisioned through it is pinned to the site of its first message (`Store.pin_device_site`). A
  device may thus file events, statuses and acks under its own site only; moving it is a re-provisioning;
- `bad_topic`: the device level of the topic is not a valid id; `empty`: a zero-length payload (someone clearing
  a retained status);
- `store_refused`: the database refuses the row itself (StoreDataError: a constraint, a value out of a column's
  range, a character it cannot hold), which another try would not change. A batch refused so is retried one
  event at a time and only the refused events are rejected.

Events are de-duplicated by the store on `event_id` (QoS 1 is at-least-once; edges also re-send from their
outbox): a redelivery is counted in `duplicates` and increments the stored row's `duplicates`, nothing else.
Statuses go to `Store.upsert_device_status`, acknowledgements to `Store.record_ack`.

Nothing is dropped silently. Every message taken off the wire ends up in exactly one counter, so once the queue
is idle: received == stored + duplicates + statuses + stale_statuses + acks + sum(rejected) + abandoned.

Database failures. Any other failed write (the database unreachable, a lock held by another writer for longer
than the busy timeout, a full disk) is retried with back-off, for as long as it takes or until `stop()` runs out
of time: the messages wait unacknowledged, the broker stops sending once our in-flight window is full and queues
the rest for our session. Nothing that the database might still accept is ever rejected for a failed write.

Persistent session (deployment). The ingest link uses `clean_session=False` with a stable client id
(`ingest_config`), so the broker keeps the subscription and queues QoS 1 events while the server is down or
restarting. Mosquitto bounds that queue per client with `max_queued_messages` (default 1000); beyond it the
broker drops events, and 1.1 edges publish them again once they see no confirmation (a 1.0 edge has forgotten
them: for those the deployment's limit, deploy/mosquitto/mosquitto.conf, is what carries an outage). `stop()`
never unsubscribes, for the same reason: the session's subscription is what queues events while we are away.

Shared subscriptions (two servers, one site: docs/deployment.md). With `shared_group` the filters become
`$share/{group}/...`, so the broker hands each message to one of the servers subscribed in the group, and the
session is a clean one: Mosquitto keeps handing messages to an offline member of a group as long as its session
lives, so a server that died would hold a share of the traffic until it came back. Without a session the broker
drops a dead server's unacknowledged messages and forgets it at once; the edges' re-publication brings those
events to the server that is left. While no server of the group is connected nothing is queued at the broker:
the edges' outboxes hold the events and publish them again. Shared subscriptions get no retained messages: the
statuses arrive with each edge's next periodic status.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, TypeVar

from enrollment_server import store as st
from models.contract import limits, timestamps, topics
from models.contract.codec import Message, check_version, decode_object, from_object
from models.contract.events import AttendanceEvent, EventsStored
from models.contract.mqtt_link import InboundMessage, MqttConfig, MqttLink, shared_filter
from models.contract.status import EdgeStatus, GalleryAck
from models.contract.topics import TopicKind
from models.errors import (
    ConfigError,
    MqttError,
    PayloadError,
    SchemaVersionError,
    StoreDataError,
    StoreError,
    StoreValueError,
    TopicError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_QUEUE_SIZE = 4096
DEFAULT_BATCH_SIZE = 500
# MQTT 5: unacknowledged messages the broker may have out to us; below the queue size, so that the network
# thread never waits for room while messages it could take are the broker's to keep
RECEIVE_MAXIMUM = 1000
MAX_RETRY_DELAY_S = 5.0
# rejections: every one is logged until a reason has this many, then one line per LOG_EVERY, so that a broken or
# hostile edge cannot flood the log at its publish rate (the counters keep the exact figures)
LOG_ALL_UP_TO = 100
# a device's registered site is re-read after this long (a re-provisioning in another process moves it), and at once
# before anything is refused for a mismatch
SITE_CACHE_S = 60.0
_SITE_CACHE_MAX = 10_000
LOG_EVERY = 1000
FULL_LOG_EVERY_S = 10.0

_KINDS: dict[TopicKind, type[Message]] = {
    TopicKind.EDGE_EVENTS: AttendanceEvent,
    TopicKind.EDGE_STATUS: EdgeStatus,
    TopicKind.GALLERY_ACK: GalleryAck,
}
_FILTERS = {
    TopicKind.EDGE_EVENTS: topics.ALL_EDGE_EVENTS,
    TopicKind.EDGE_STATUS: topics.ALL_EDGE_STATUS,
    TopicKind.GALLERY_ACK: topics.ALL_GALLERY_ACKS,
}


def ingest_config(url: str, client_id: str, *, shared_group: str | None = None, **options: Any) -> MqttConfig:
    """The ingest link's MQTT settings: manual acknowledgement, and a persistent session under a stable client id,
    or with `shared_group` a clean one (see the module docstring). MQTT 5 gets our receive maximum."""
    if not client_id:
        raise ConfigError("the ingest link needs a stable client_id: its persistent session is found by it")
    settings: dict[str, Any] = {**options, "clean_session": shared_group is not None, "manual_ack": True}
    if settings.get("protocol") == "5":
        settings.setdefault("receive_maximum", RECEIVE_MAXIMUM)
    return MqttConfig.from_url(url, client_id=client_id, **settings)


@dataclass(frozen=True)
class IngestStats:
    """A snapshot of the ingest's counters (all since start)."""

    received: int  # messages taken off the wire: events, statuses, acks
    stored: int  # events stored (first delivery of an event_id)
    duplicates: int  # event redeliveries (event_id already stored)
    statuses: int  # statuses applied to the device table
    stale_statuses: int  # statuses older than the stored one (retained replays, reordering): ignored
    acks: int  # gallery acknowledgements recorded
    rejected: Mapping[str, int]  # reason -> count, see the module docstring
    # taken off the wire, then not written because stop() ran out of time (the database down): never
    # acknowledged, so the broker sends them again to the next start (lost only with a clean session: see above)
    abandoned: int
    deferred: int  # arrived after stop() began: left unacknowledged with the broker, not counted as received
    confirmations: int  # `events_stored` messages published
    confirmed: int  # event ids they named
    queue_depth: int  # messages waiting now
    max_queue_depth: int
    backpressure_waits: int  # times the network thread had to wait for room in the queue
    store_retries: int  # failed writes retried
    batches: int  # event commits
    max_lag_s: float | None  # largest (commit time - event ts) of a stored event; includes edge clock skew
    mean_lag_s: float | None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def accounted(self) -> int:
        """Messages that reached a final counter; equals `received` whenever the ingest is idle."""
        return (
            self.stored
            + self.duplicates
            + self.statuses
            + self.stale_statuses
            + self.acks
            + self.rejected_total
            + self.abandoned
        )


@dataclass(frozen=True)
class _Item:
    kind: TopicKind
    message: InboundMessage  # acknowledged through the link once settled
    received: float  # time.time() when the handler ran

    @property
    def topic(self) -> str:
        return self.message.topic


@dataclass(frozen=True)
class _Event:
    item: _Item
    record: st.AttendanceEvent
    confirm: bool  # sent by an edge that reads confirmations (schema 1.1 or later)


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Abandoned(Exception):
    """stop() ran out of time while the database was failing."""


class Ingest:
    def __init__(
        self,
        store: st.Store,
        link: MqttLink,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        shared_group: str | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ConfigError("ingest queue_size and batch_size must be >= 1")
        self._store = store
        self._link = link
        self._batch_size = batch_size
        self._filters = {kind: shared_filter(shared_group, f) if shared_group else f for kind, f in _FILTERS.items()}
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")
        # counters: written by both threads, read by stats()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._intake_open = True  # cleared by stop(): later messages stay with the broker
        self._outstanding = 0  # taken off the wire, not yet in a final counter
        self._settled: set[int] = set()  # id() of the worker's current group's items that reached a final counter
        self._last_full_log = -FULL_LOG_EVERY_S
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._max_depth = 0
        self._lag_max: float | None = None
        self._lag_sum = 0.0
        self._lag_n = 0
        self._sites: dict[str, tuple[str, float]] = {}  # device -> (registered site, when read); worker thread only

    # ---- lifecycle ----

    def start(self) -> None:
        """Start the worker and subscribe; call before or after the link's start()."""
        if self._worker is not None:
            raise ConfigError("ingest already started")
        self._worker = threading.Thread(target=self._run, name="faceattend-ingest", daemon=True)
        self._worker.start()
        for kind, topic_filter in self._filters.items():
            self._link.subscribe(topic_filter, 1, self._handler(kind))
        log.info("ingest: subscribed to %s", ", ".join(self._filters.values()))

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """True once the broker granted every ingest filter on the current connection (SUBACK)."""
        deadline = time.monotonic() + timeout
        return all(self._link.wait_subscribed(f, max(0.0, deadline - time.monotonic())) for f in self._filters.values())

    def stop(self, timeout: float = 30.0) -> bool:
        """Take no more messages, store what was taken (for at most `timeout` s), then end the worker.

        Shutdown order: `ingest.stop()`, then `link.stop()`: the link must still be up to carry the
        acknowledgements and confirmations of what is stored now. Messages arriving meanwhile are left
        unacknowledged (counted as `deferred`): the broker keeps them for the next start.

        Does not unsubscribe: the persistent session's subscription is what keeps events queued at the broker
        while the server is down. Returns False when messages had to be abandoned (the database kept failing);
        they too stay unacknowledged and are redelivered to the next start.
        """
        worker = self._worker
        with self._lock:
            self._intake_open = False
        if worker is None:
            return True
        self._stop_deadline = time.monotonic() + timeout
        self._stopping.set()
        worker.join(timeout + 5.0)
        with self._lock:
            abandoned = self._counts["abandoned"]
        if worker.is_alive():
            log.error("ingest: worker did not finish within %.0f s", timeout)
            return False
        return abandoned == 0

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once every message received so far reached a final counter (stored, duplicate, rejected ...)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._outstanding:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def stats(self) -> IngestStats:
        with self._lock:
            c = self._counts
            return IngestStats(
                received=c["received"],
                stored=c["stored"],
                duplicates=c["duplicates"],
                statuses=c["statuses"],
                stale_statuses=c["stale_statuses"],
                acks=c["acks"],
                rejected=MappingProxyType(dict(self._rejected)),
                abandoned=c["abandoned"],
                deferred=c["deferred"],
                confirmations=c["confirmations"],
                confirmed=c["confirmed"],
                queue_depth=self._queue.qsize(),
                max_queue_depth=self._max_depth,
                backpressure_waits=c["backpressure_waits"],
                store_retries=c["store_retries"],
                batches=c["batches"],
                max_lag_s=self._lag_max,
                mean_lag_s=self._lag_sum / self._lag_n if self._lag_n else None,
            )

    # ---- network thread ----

    def _handler(self, kind: TopicKind) -> Callable[[InboundMessage], None]:
        def handle(msg: InboundMessage) -> None:
            self._enqueue(_Item(kind, msg, time.time()))

        return handle

    def _enqueue(self, item: _Item) -> None:
        waited = False
        while True:
            # put_nowait under the lock stop() takes to close the intake: an item is either queued before the
            # worker's final drain or left with the broker, never stranded in a queue nobody reads
            with self._lock:
                if not self._intake_open:
                    self._counts["deferred"] += 1  # not acknowledged: the broker keeps it for the next start
                    return
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    pass
                else:
                    self._counts["received"] += 1
                    self._outstanding += 1
                    self._max_depth = max(self._max_depth, self._queue.qsize())
                    return
            if not waited:
                # only when the broker's in-flight window exceeds the queue (MQTT 3.1.1 with a large
                # max_inflight_messages): waiting here holds paho's network thread until the worker makes room
                waited = True
                now = time.monotonic()
                with self._lock:
                    self._counts["backpressure_waits"] += 1
                    loud, self._last_full_log = now - self._last_full_log >= FULL_LOG_EVERY_S, now
                if loud:  # once per stall, not once per message held
                    log.warning("ingest: queue full (%d messages); waiting for the store", self._queue.maxsize)
            time.sleep(0.005)

    # ---- worker thread ----

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            rest = self._drain()
            self._finish_abandoned(rest, "ingest stopped before storing them")

    def _loop(self) -> None:
        while True:
            if self._stopping.is_set() and time.monotonic() >= self._stop_deadline:
                return  # out of time (the database failing): _run abandons the rest
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stopping.is_set():
                    return  # the intake is closed: nothing more can come
                continue
            items = [first]
            # group commit: everything already waiting, without waiting for more
            while len(items) < self._batch_size:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                self._settled.clear()
            try:
                self._process(items)
            except _Abandoned:
                self._finish_abandoned(self._unsettled(items), "ingest stopped with the database failing")
                return
            except Exception:
                # a bug of ours must not end ingestion: count what is left of the group, keep the worker alive
                log.exception("ingest: unexpected error on a group of %d messages", len(items))
                with self._idle:
                    unsettled = [i for i in items if id(i) not in self._settled]
                    self._rejected["internal_error"] += len(unsettled)
                    self._settle(unsettled)
                self._ack(unsettled)

    def _unsettled(self, items: Sequence[_Item]) -> list[_Item]:
        with self._lock:
            return [i for i in items if id(i) not in self._settled]

    def _drain(self) -> list[_Item]:
        rest = []
        while True:
            try:
                rest.append(self._queue.get_nowait())
            except queue.Empty:
                return rest

    def _process(self, items: list[_Item]) -> None:
        events: list[_Event] = []
        others: list[tuple[_Item, Message]] = []
        for item in items:
            try:
                message, minor = self._decode(item)
                self._check_site(message)
            except _Rejected as rejected:
                self._reject(item, rejected.reason, str(rejected))
                continue
            if isinstance(message, AttendanceEvent):
                events.append(_Event(item, _event_record(message), confirm=minor >= 1))
            else:
                others.append((item, message))
        if events:
            self._store_events(events)
        for item, message in others:
            if isinstance(message, EdgeStatus):
                self._apply_status(item, message)
            elif isinstance(message, GalleryAck):
                self._apply_ack(item, message)

    # ---- decoding ----

    def _decode(self, item: _Item) -> tuple[Message, int]:
        """The message and its schema minor version."""
        try:
            parsed = topics.parse_topic(item.topic)
        except TopicError as exc:
            raise _Rejected("bad_topic", str(exc)) from None
        cls = _KINDS[item.kind]
        payload = item.message.payload
        if not payload:
            raise _Rejected("empty", "zero-length payload (a cleared retained message)")
        if len(payload) > cls.MAX_BYTES:
            raise _Rejected("oversized", f"{len(payload)} bytes, the limit is {cls.MAX_BYTES}")
        try:
            obj = decode_object(payload, cls.SCHEMA, cls.MAX_BYTES)
        except SchemaVersionError as exc:
            raise _Rejected("unknown_major", str(exc)) from None
        except PayloadError as exc:
            raise _Rejected(_envelope_reason(payload, cls.SCHEMA), str(exc)) from None
        try:
            message = from_object(cls, obj)
        except PayloadError as exc:
            raise _Rejected("invalid_field", str(exc)) from None
        device = getattr(message, "device_id", None)
        if device != parsed.device:
            raise _Rejected("device_mismatch", f"payload device_id {device!r} published on device {parsed.device!r}")
        return message, check_version(obj["schema_version"], cls.SCHEMA)[1]

    def _check_site(self, message: Message) -> None:
        """Refuse (`site_mismatch`) a message whose site is not the one its device is registered at."""
        device, claimed = message.device_id, message.site  # type: ignore[attr-defined]
        now = time.monotonic()
        cached = self._sites.get(device)
        if cached is not None and cached[0] == claimed and now - cached[1] < SITE_CACHE_S:
            return
        registered = self._write(lambda: self._store.pin_device_site(device, claimed), "a device's site")
        if isinstance(registered, _Refusal):
            raise _Rejected("store_refused", str(registered.error))
        if len(self._sites) >= _SITE_CACHE_MAX:
            self._sites.clear()
        self._sites[device] = (registered, now)
        if registered != claimed:
            raise _Rejected(
                "site_mismatch",
                f"device {device!r} is registered at site {registered!r}, the payload says {claimed!r} "
                "(a device moves with `enrollment-server provision-device --site`)",
            )

    # ---- writing ----

    def _store_events(self, events: list[_Event]) -> None:
        records = [e.record for e in events]
        result = self._write(lambda: self._store.insert_events(records), f"{len(records)} events")
        if isinstance(result, _Refusal):
            if len(events) == 1:
                self._reject(events[0].item, "store_refused", str(result.error))
                return
            # one bad row fails the whole batch: find it by storing one at a time
            log.warning("ingest: a batch of %d events was refused (%s); storing one by one", len(events), result.error)
            for event in events:
                self._store_events([event])
            return
        committed = time.time()
        new = sum(result)
        lags = [committed - r.ts.timestamp() for r, is_new in zip(records, result, strict=True) if is_new]
        with self._idle:
            self._counts["stored"] += new
            self._counts["duplicates"] += len(result) - new
            self._counts["batches"] += 1
            if lags:
                top = max(lags)
                self._lag_max = top if self._lag_max is None else max(self._lag_max, top)
                self._lag_sum += sum(lags)
                self._lag_n += len(lags)
            self._settle([e.item for e in events])
        self._confirm(events)
        self._ack([e.item for e in events])

    def _confirm(self, events: Sequence[_Event]) -> None:
        """Tell each device which of its events are now stored (committed): see the module docstring."""
        by_device: defaultdict[str, dict[str, None]] = defaultdict(dict)  # ordered, each id once
        for event in events:
            if event.confirm:
                by_device[event.record.device_id][event.record.event_id] = None
        now = timestamps.utc_now()
        for device, ids in by_device.items():
            listed = list(ids)
            for i in range(0, len(listed), limits.MAX_STORED_IDS):
                chunk = tuple(listed[i : i + limits.MAX_STORED_IDS])
                payload = EventsStored(device_id=device, event_ids=chunk, ts=now).to_json()
                try:
                    # not waited for: a lost confirmation makes the edge publish the event again, and the
                    # duplicate is confirmed anew
                    self._link.publish(topics.events_stored(device), payload, qos=1)
                except MqttError as exc:
                    log.warning("ingest: confirmation of %d events to %s not published: %s", len(chunk), device, exc)
                    continue
                with self._lock:
                    self._counts["confirmations"] += 1
                    self._counts["confirmed"] += len(chunk)

    def _apply_status(self, item: _Item, status: EdgeStatus) -> None:
        received = datetime.fromtimestamp(item.received, timezone.utc)
        # The offline status is the last will, encoded when the edge connected, so its own ts is older than the
        # edge's "online" and the store would discard it as stale. Its real moment is when the broker sent it:
        # our receive time. (An edge whose clock is behind ours by more than an outage then has its next
        # "online" ignored until a later status overtakes it; keep edge clocks on NTP.)
        offline = status.state == "offline"
        record = st.DeviceStatus(
            device_id=status.device_id,
            site_id=status.site,
            state=status.state,
            status_ts=received if offline else timestamps.parse_utc(status.ts),
            agent_version=status.agent_version,
            gallery_version=status.gallery_version,
            fingerprint=status.fingerprint,
            health=status.to_object()["health"],  # plain nested dicts (the message holds read-only views)
            gallery_epoch=status.gallery_epoch,
        )

        def write() -> bool:
            return self._store.upsert_device_status(self._keep_newer(record) if offline else record, received=received)

        result = self._write(write, "a status")
        if isinstance(result, _Refusal):
            self._reject(item, "store_refused", str(result.error))
            return
        with self._idle:
            self._counts["statuses" if result else "stale_statuses"] += 1
            self._settle([item])
        self._ack([item])

    def _keep_newer(self, will: st.DeviceStatus) -> st.DeviceStatus:
        """The last will's figures are those of the moment the edge connected; what the server learnt since (a
        gallery applied, fresher health) is newer, so an offline status only changes the state."""
        known = next((d for d in self._store.list_devices(will.site_id) if d.device_id == will.device_id), None)
        if known is None:
            return will
        keep_gallery = known.gallery_version is not None
        return dataclasses.replace(
            will,
            gallery_version=known.gallery_version if keep_gallery else will.gallery_version,
            gallery_epoch=known.gallery_epoch if keep_gallery else will.gallery_epoch,
            agent_version=known.agent_version or will.agent_version,
            health=known.health() if known.health_json is not None else will.health,
        )

    def _apply_ack(self, item: _Item, ack: GalleryAck) -> None:
        received = datetime.fromtimestamp(item.received, timezone.utc)
        result = self._write(
            lambda: self._store.record_ack(
                ack.device_id,
                ack.site,
                ack.version,
                ok=ack.status == "ok",
                error=ack.error,
                received=received,
                epoch=ack.epoch,
            ),
            "a gallery ack",
        )
        if isinstance(result, _Refusal):
            self._reject(item, "store_refused", str(result.error))
            return
        with self._idle:
            self._counts["acks"] += 1
            self._settle([item])
        self._ack([item])

    def _write(self, op: Callable[[], T], what: str) -> T | _Refusal:
        """Run one store write: retried until it succeeds (or stop() runs out of time), a _Refusal only when the
        database refuses the data itself."""
        delay = 0.1
        failures = 0
        while True:
            try:
                return op()
            except (StoreValueError, StoreDataError) as exc:
                return _Refusal(exc)  # our own validation, or the database's verdict on the data: final
            except StoreError as exc:
                failures += 1
                with self._lock:
                    self._counts["store_retries"] += 1
                if self._stopping.is_set() and time.monotonic() >= self._stop_deadline:
                    raise _Abandoned from exc
                # every failure at first, then one line in ten: an outage of minutes should not flood the log
                level = logging.WARNING if failures <= 3 or failures % 10 == 0 else logging.DEBUG
                log.log(
                    level, "ingest: storing %s failed (%s); retrying in %.1f s (try %d)", what, exc, delay, failures
                )
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)

    # ---- accounting ----

    def _reject(self, item: _Item, reason: str, detail: str) -> None:
        with self._idle:
            self._rejected[reason] += 1
            n = self._rejected[reason]
            self._settle([item])
        # acknowledged: the broker would only send it again, and it would be refused again
        self._ack([item])
        if n <= LOG_ALL_UP_TO or n % LOG_EVERY == 0:
            log.warning(
                "ingest: rejected message on %s: %s: %s (%d rejected for %s)", item.topic, reason, detail, n, reason
            )

    def _ack(self, items: Sequence[_Item]) -> None:
        for item in items:
            self._link.ack(item.message)

    def _finish_abandoned(self, items: Sequence[_Item], why: str) -> None:
        if not items:
            return
        with self._idle:
            self._counts["abandoned"] += len(items)
            self._settle(items)
        # not acknowledged: the broker sends them again to the next start (a persistent session keeps them)
        log.error("ingest: %d message(s) not stored: %s; left unacknowledged for redelivery", len(items), why)

    def _settle(self, items: Sequence[_Item]) -> None:
        # caller holds self._idle (self._lock)
        self._outstanding -= len(items)
        self._settled.update(id(i) for i in items)
        if self._outstanding <= 0:
            self._idle.notify_all()


@dataclass(frozen=True)
class _Refusal:
    error: StoreError


def _envelope_reason(payload: bytes, schema: str) -> str:
    """Which envelope check failed; only run on the failure path, so the happy path parses once."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return "malformed"
    if not isinstance(obj, dict):
        return "malformed"
    if obj.get("schema") != schema:
        return "wrong_schema"
    return "malformed"  # duplicate keys, NaN, a schema_version that is not "MAJOR.MINOR"


def _event_record(event: AttendanceEvent) -> st.AttendanceEvent:
    return st.AttendanceEvent(
        event_id=event.event_id,
        seq=event.seq,
        device_id=event.device_id,
        site_id=event.site,
        ts=timestamps.parse_utc(event.ts),
        camera=event.camera,
        track_id=event.track_id,
        person_id=event.person_id,
        name=event.name,
        distance=event.distance,
        margin=event.margin,
        threshold=event.threshold,
        gallery_version=event.gallery_version,
        fingerprint=event.fingerprint,
        snapshot=event.snapshot,
    )
