"""Drains the durable outbox to MQTT: QoS 1, not retained, each event on the topic stored with it
(`faceattend/v1/edge/{device}/events`), deleted from the outbox only once the enrollment server has confirmed that
it stored it (`faceattend/v1/device/{device}/stored`, contract 1.1).

Why the server's word and not the broker's PUBACK: a PUBACK means the broker took the message, not that anybody
will get it. A broker that restarts without its persistence file, crashes between autosaves or drops messages
over its queue limit while the server is down forgets events that the edge, had it trusted the PUBACK, would
have deleted: lost. So an event stays here until an `events_stored` message names it, and is published again
while none does.

One background thread does everything, so the rows it tracks need no locking of their own:

- it publishes only while the link is connected, oldest first, at most `max_in_flight` events awaiting their
  PUBACK at a time: that bounds paho's memory queue (the outbox is the unbounded, durable one);
- an event is handed to the link once; while its PublishHandle is pending the row is in flight and never
  published again concurrently. paho itself resends its unacknowledged messages after a reconnect, so a
  disconnect alone does not make us publish again (that would double every in-flight event);
- a row is taken back when its handle failed (the link was stopped), when the broker refused it (MQTT 5
  reason >= 0x80), or when no PUBACK came for `ack_timeout_s` while connected (a lost message);
- once PUBACKed, a row awaits its confirmation. With none after `confirm_timeout_s` it is published again, and
  again after each doubling of that wait up to `max_republish_interval_s` (bounded back-off: a server that is
  down or working through a backlog is not flooded with copies, and a lost event still comes through within the
  cap of the server being back). The server stores each event once and confirms duplicates too, so a lost
  confirmation costs one duplicate;
- confirmations arrive on paho's network thread and are handed over; the worker deletes the confirmed rows in
  one outbox transaction (one fsync) per turn;
- `notify()` (call it after each `Outbox.put_new`) wakes the thread at once: an event is on the wire within
  milliseconds of its commit; without it the outbox is looked at every `idle_interval_s`.

A server older than contract 1.1 never confirms. The events then stay in the outbox, are published again with
the back-off above (that server de-duplicates them on `event_id`) and the outbox's overflow policy bounds it; once
events have waited `unconfirmed_warning_s` with no confirmation at all in that time, an ERROR says so (every
`unconfirmed_warning_s`), and `last_error`, `confirmation_overdue` and the outbox's depth and oldest age in the
status and metrics show it. `confirm_by: broker` restores the 1.0 behaviour for such a server: a row goes on its
PUBACK. An ACL from before 1.1 looks the same from here (Mosquitto grants the subscription and withholds the
messages; a broker that refuses the subscription gets an ERROR of its own after `_SUBSCRIBE_GRACE_S`): provision
the device again.

Rows left by a previous run (a crash, a `kill -9`, a power cut) are published on the first connection. `stop()`
waits a little for PUBACKs and confirmations, deletes what was confirmed and leaves everything else in the
outbox.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from edge_agent.delivery.outbox import Outbox, OutboxItem
from models.contract import topics
from models.contract.events import EventsStored
from models.contract.mqtt_link import InboundMessage, MqttLink, PublishHandle
from models.errors import ConfigError, ContractError

log = logging.getLogger(__name__)

ConfirmBy = Literal["server", "broker"]
CONFIRM_BY: tuple[ConfirmBy, ...] = ("server", "broker")

_ERROR_BACKOFF_S = 1.0  # after a failing outbox or link operation: retry, without spinning on a broken disk
_SUBSCRIBE_GRACE_S = 10.0  # connected this long without the confirmation subscription granted: say so
_OVERDUE_CHECK_S = 5.0  # how often the oldest wait for a confirmation is looked at
_IDS_LOGGED = 10  # event ids named per re-publication log line


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    # "server": an event leaves the outbox when the server confirms it stored it (contract 1.1); "broker": on the
    # broker's PUBACK (the 1.0 behaviour, for a server older than 1.1 that never confirms)
    confirm_by: ConfirmBy = "server"
    confirm_timeout_s: float = 30.0  # PUBACKed and not confirmed for this long: published again
    max_republish_interval_s: float = 600.0  # the back-off between re-publications doubles up to this
    unconfirmed_warning_s: float = 300.0  # events waiting this long with the server silent: logged as an ERROR

    def __post_init__(self) -> None:
        if self.confirm_by not in CONFIRM_BY:
            raise ConfigError(f"delivery.confirm_by: expected one of {', '.join(CONFIRM_BY)}, got {self.confirm_by!r}")
        for name in ("confirm_timeout_s", "max_republish_interval_s", "unconfirmed_warning_s"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ConfigError(f"delivery.{name}: expected a number of seconds > 0, got {value!r}")
        if self.max_republish_interval_s < self.confirm_timeout_s:
            raise ConfigError(
                f"delivery.max_republish_interval_s: must be >= delivery.confirm_timeout_s ({self.confirm_timeout_s:g})"
            )


@dataclass(frozen=True)
class PublisherStats:
    connected: bool
    confirm_by: str
    published: int  # publishes handed to the link, re-publications included
    acked: int  # PUBACKs from the broker
    confirmed: int  # events the server confirmed, removed from the outbox (confirm_by "broker": PUBACKed ones)
    republished: int  # rows published again (handle failed, refused, no PUBACK or no confirmation in time)
    in_flight: int  # published, PUBACK not yet seen
    awaiting_confirmation: int  # PUBACKed, not yet confirmed by the server
    depth: int  # unconfirmed events in the outbox (in flight and awaiting included)
    oldest_age_s: float  # age of the oldest unconfirmed event; 0.0 when none
    last_confirmation_age_s: float | None  # since the server's last confirmation; None: none this run
    confirmation_overdue: bool  # events wait longer than unconfirmed_warning_s while the server is silent
    confirmations_subscribed: bool  # the broker granted the subscription to confirmations (now)
    invalid_confirmations: int  # confirmation messages that broke the contract (logged, ignored)
    last_error: str | None


@dataclass(frozen=True)
class _InFlight:
    item: OutboxItem
    handle: PublishHandle
    sent: float  # time.monotonic() of the publish
    attempts: int  # publications of this row in this run, this one included
    since: float | None  # time.monotonic() of its first PUBACK in this run; None before it


@dataclass(frozen=True)
class _Awaiting:
    due: float  # time.monotonic() at which it is published again
    attempts: int
    since: float | None  # time.monotonic() of its first PUBACK in this run (the overdue warning); None: none yet


class EventPublisher:
    """`start()` once, `notify()` after each put, `stop()` at the end. The link is shared (status, gallery) and
    neither started nor stopped here."""

    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        device_id: str,
        *,
        delivery: DeliveryConfig | None = None,
        max_in_flight: int = 100,
        ack_timeout_s: float = 30.0,
        poll_interval_s: float = 0.01,
        idle_interval_s: float = 1.0,
    ) -> None:
        if max_in_flight < 1:
            raise ConfigError(f"event publisher: max_in_flight must be >= 1, got {max_in_flight}")
        if ack_timeout_s <= 0 or poll_interval_s <= 0 or idle_interval_s <= 0:
            raise ConfigError("event publisher: ack_timeout_s, poll_interval_s and idle_interval_s must be > 0")
        self._outbox = outbox
        self._link = link
        self._device = topics.validate_id(device_id, "device")
        self._confirm_topic = topics.events_stored(device_id)
        self._cfg = delivery or DeliveryConfig()
        self._by_server = self._cfg.confirm_by == "server"
        self._max_in_flight = max_in_flight
        self._ack_timeout_s = ack_timeout_s
        self._poll_s = poll_interval_s  # how often PublishHandles are looked at while events are in flight
        self._idle_s = idle_interval_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._connected_at = time.monotonic()
        # confirmations handed over by the network thread
        self._confirm_lock = threading.Lock()
        self._confirmations: deque[tuple[str, ...]] = deque()
        self._last_confirmation: float | None = None
        self._invalid_confirmations = 0
        # owned by the worker thread; stats() only reads their lengths
        self._in_flight: dict[int, _InFlight] = {}
        self._awaiting: dict[int, _Awaiting] = {}
        self._due: list[tuple[float, int]] = []  # heap of (due, row id); an entry is stale once its row moved on
        self._overdue = False
        self._next_overdue_check = 0.0
        self._next_overdue_log = 0.0
        self._subscribe_warned = False
        self._stats_lock = threading.Lock()
        self._published = 0
        self._acked = 0
        self._confirmed = 0
        self._republished = 0
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="event-publisher", daemon=True)
        link.add_connection_listener(self._on_connection)

    # ---- API ----

    def start(self) -> None:
        if self._by_server:
            self._link.subscribe(self._confirm_topic, 1, self._on_confirmation)
        self._thread.start()

    def notify(self) -> None:
        """A new event was put: publish it now rather than at the next idle look."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop publishing, give in-flight events most of `timeout` to be acknowledged and confirmed, delete those
        that were; the rest stay in the outbox for the next run. True when the thread ended in time."""
        deadline = time.monotonic() + timeout
        self._drain_until = deadline - min(0.5, timeout / 4)  # the rest of the time is for the final delete
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error("event publisher did not stop within %.1f s", timeout)
            return False
        return True

    def stats(self) -> PublisherStats:
        with self._stats_lock:
            published, acked, confirmed = self._published, self._acked, self._confirmed
            republished, error = self._republished, self._last_error
        with self._confirm_lock:
            last, invalid = self._last_confirmation, self._invalid_confirmations
        return PublisherStats(
            connected=self._link.is_connected(),
            confirm_by=self._cfg.confirm_by,
            published=published,
            acked=acked,
            confirmed=confirmed,
            republished=republished,
            in_flight=len(self._in_flight),
            awaiting_confirmation=len(self._awaiting),
            depth=self._outbox.depth(),
            oldest_age_s=self._outbox.oldest_age_s(),
            last_confirmation_age_s=None if last is None else time.monotonic() - last,
            confirmation_overdue=self._overdue,
            confirmations_subscribed=self._subscribed(),
            invalid_confirmations=invalid,
            last_error=error,
        )

    def _subscribed(self) -> bool:
        if not self._by_server or not self._thread.is_alive():
            return False
        return self._link.wait_subscribed(self._confirm_topic, 0)

    # ---- network thread: note it and wake the worker ----

    def _on_connection(self, up: bool) -> None:
        if up:
            self._connected_at = time.monotonic()
            self._subscribe_warned = False
        self._wake.set()

    def _on_confirmation(self, msg: InboundMessage) -> None:
        try:
            stored = EventsStored.from_json(msg.payload)
            if stored.device_id != self._device:
                raise ContractError(f"confirmation for device {stored.device_id!r} on {msg.topic}")
        except ContractError as exc:
            with self._confirm_lock:
                self._invalid_confirmations += 1
            log.warning("event publisher: confirmation on %s ignored: %s", msg.topic, exc)
            return
        with self._confirm_lock:
            self._confirmations.append(stored.event_ids)
            self._last_confirmation = time.monotonic()
        self._wake.set()

    # ---- worker thread ----

    def _run(self) -> None:
        cursor = 0  # invariant: every outbox row with an id <= cursor is in flight, awaiting, or gone
        while not self._stopping.is_set():
            self._wake.clear()  # before the work: a notify() arriving during it makes the wait below return
            try:
                self._apply_confirmations()
                self._settle()
                if self._link.is_connected():
                    self._republish_due()
                    cursor = self._fill(cursor)
                    self._check_confirmation_path()
                pause = self._pause()
            except Exception as exc:  # the thread must outlive any failure: the events wait in the outbox
                log.exception("event publisher: %s (depth %d); retrying", exc, self._outbox.depth())
                with self._stats_lock:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                pause = _ERROR_BACKOFF_S
            self._wake.wait(pause)
        self._drain()

    def _pause(self) -> float:
        if self._in_flight:
            return self._poll_s
        pause = self._idle_s
        if self._due and self._link.is_connected():
            pause = min(pause, max(self._poll_s, self._due[0][0] - time.monotonic()))
        return pause

    def _fill(self, cursor: int) -> int:
        free = self._max_in_flight - len(self._in_flight)
        if free <= 0:
            return cursor
        # a range read on the primary key: costs next to nothing when no row lies above the cursor
        for item in self._outbox.pending(free, after_id=cursor):
            self._publish(item, attempts=1, since=None)
            cursor = item.row_id
        return cursor

    def _publish(self, item: OutboxItem, attempts: int, since: float | None) -> None:
        handle = self._link.publish(item.topic, item.payload, qos=1, retain=False)
        self._in_flight[item.row_id] = _InFlight(item, handle, time.monotonic(), attempts, since)
        with self._stats_lock:
            self._published += 1
            if attempts > 1:
                self._republished += 1
        log.debug("event publisher: published %s seq %d (attempt %d)", item.event_id, item.seq, attempts)

    def _republish_due(self) -> None:
        """Publish again the rows whose confirmation (or PUBACK) is overdue, oldest due first."""
        free = self._max_in_flight - len(self._in_flight)
        now = time.monotonic()
        due: dict[int, _Awaiting] = {}
        while self._due and len(due) < free and self._due[0][0] <= now:
            at, row_id = heapq.heappop(self._due)
            entry = self._awaiting.get(row_id)
            if entry is not None and entry.due == at:
                due[row_id] = entry
        if not due:
            return
        items = {item.row_id: item for item in self._outbox.items(due)}
        for row_id, entry in due.items():
            del self._awaiting[row_id]
            item = items.get(row_id)
            if item is not None:  # else dropped on overflow meanwhile
                self._publish(item, attempts=entry.attempts + 1, since=entry.since)
        if items:
            shown = sorted(items)[:_IDS_LOGGED]
            log.info(
                "event publisher: published %d events again (no %s in time): %s%s",
                len(items),
                "confirmation from the server" if self._by_server else "PUBACK",
                ", ".join(items[r].event_id for r in shown),
                f" and {len(items) - len(shown)} more" if len(items) > len(shown) else "",
            )

    def _await(self, row_id: int, attempts: int, since: float | None, wait: float) -> None:
        due = time.monotonic() + wait
        self._awaiting[row_id] = _Awaiting(due, attempts, since)
        heapq.heappush(self._due, (due, row_id))

    def _backoff(self, attempts: int) -> float:
        return min(self._cfg.confirm_timeout_s * 2 ** (attempts - 1), self._cfg.max_republish_interval_s)

    def _settle(self) -> None:
        """PUBACKed rows: deleted (confirm_by broker) or set to await their confirmation; rows whose publication
        failed or timed out are due again."""
        if not self._in_flight:
            return
        now = time.monotonic()
        connected = self._link.is_connected()
        acked: list[_InFlight] = []
        retry: list[_InFlight] = []
        for entry in self._in_flight.values():
            handle = entry.handle
            if handle.acknowledged and not handle.rejected:
                acked.append(entry)
            elif (
                handle.failed
                or handle.rejected
                # paho resends after a reconnect: the clock restarts then, and stands still while disconnected
                or (connected and now - max(entry.sent, self._connected_at) > self._ack_timeout_s)
            ):
                retry.append(entry)
        if acked:
            if not self._by_server:
                self._outbox.delete(e.item.row_id for e in acked)  # raises before anything is forgotten
            for entry in acked:
                del self._in_flight[entry.item.row_id]
                if self._by_server:
                    since = now if entry.since is None else entry.since
                    self._await(entry.item.row_id, entry.attempts, since, self._backoff(entry.attempts))
            with self._stats_lock:
                self._acked += len(acked)
                if not self._by_server:
                    self._confirmed += len(acked)
        if not retry:
            return
        reasons: set[str] = set()
        for entry in retry:
            del self._in_flight[entry.item.row_id]
            handle = entry.handle
            if handle.rejected:
                # a misconfigured ACL refuses every try: wait as for a missing confirmation, do not spin
                reasons.add(f"refused by the broker, reason {handle.reason_code}")
                self._await(entry.item.row_id, entry.attempts, entry.since, self._backoff(entry.attempts))
            else:
                reasons.add("the link failed them" if handle.failed else f"no PUBACK within {self._ack_timeout_s:g} s")
                self._await(entry.item.row_id, entry.attempts, entry.since, 0.0)
        ids = ", ".join(entry.item.event_id for entry in retry)
        log.warning("event publisher: %d events to publish again (%s): %s", len(retry), "; ".join(sorted(reasons)), ids)
        if any(entry.handle.rejected for entry in retry):
            with self._stats_lock:
                self._last_error = f"events refused by the broker: {ids}"

    def _apply_confirmations(self) -> None:
        with self._confirm_lock:
            batches = list(self._confirmations)
            self._confirmations.clear()
        if not batches:
            return
        event_ids = [event_id for batch in batches for event_id in batch]
        try:
            gone = self._outbox.confirm(event_ids)
        except Exception:
            with self._confirm_lock:  # kept for the next turn: a failed delete must not forget a confirmation
                self._confirmations.extendleft(reversed(batches))
            raise
        early = 0  # confirmed before its PUBACK was looked at: the broker took it, count the PUBACK too
        for row_id in gone:
            self._awaiting.pop(row_id, None)
            early += self._in_flight.pop(row_id, None) is not None
        with self._stats_lock:
            self._confirmed += len(gone)
            self._acked += early
        if self._overdue:
            self._overdue = False
            log.info("event publisher: the server confirms events again")

    def _check_confirmation_path(self) -> None:
        """Say so when the server does not confirm (down, far behind, or older than 1.1), or when the broker did
        not grant the subscription that confirmations come through (ACL)."""
        if not self._by_server:
            return
        now = time.monotonic()
        if not self._subscribe_warned and now - self._connected_at > _SUBSCRIBE_GRACE_S and not self._subscribed():
            self._subscribe_warned = True
            message = (
                f"the broker has not granted the subscription to {self._confirm_topic}: the server's confirmations "
                "cannot arrive and every event stays in the outbox (an ACL from before contract 1.1? re-provision "
                "the device)"
            )
            log.error("event publisher: %s", message)
            with self._stats_lock:
                self._last_error = message
        if now < self._next_overdue_check:
            return
        limit = self._cfg.unconfirmed_warning_s
        self._next_overdue_check = now + min(_OVERDUE_CHECK_S, limit / 4)
        oldest = min((a.since for a in self._awaiting.values() if a.since is not None), default=None)
        with self._confirm_lock:
            last = self._last_confirmation
        self._overdue = oldest is not None and now - oldest > limit and (last is None or now - last > limit)
        if not self._overdue or now < self._next_overdue_log:
            return
        self._next_overdue_log = now + limit
        heard = "never this run" if last is None else f"{now - last:.0f} s ago"
        message = (
            f"{len(self._awaiting)} events acknowledged by the broker have no confirmation from the server after "
            f"{now - oldest:.0f} s (last confirmation: {heard}): the server is down or far behind, older than "
            "contract 1.1 and never confirms (then set delivery.confirm_by: broker), or the broker's ACL withholds "
            "its confirmations from this device (provisioned before 1.1: provision it again)"
        )
        log.error(
            "event publisher: %s; they stay in the outbox (depth %d) and are published again every %g s at most",
            message,
            self._outbox.depth(),
            self._cfg.max_republish_interval_s,
        )
        with self._stats_lock:
            self._last_error = message

    def _drain(self) -> None:
        try:
            while (self._in_flight or (self._by_server and self._awaiting)) and time.monotonic() < self._drain_until:
                self._apply_confirmations()
                self._settle()
                time.sleep(self._poll_s)
            self._apply_confirmations()
            self._settle()
        except Exception:
            log.exception("event publisher: stopping with %d events in flight", len(self._in_flight))
        if self._in_flight or self._awaiting:
            log.info(
                "event publisher stopped: %d events unconfirmed stay in the outbox (depth %d)",
                len(self._in_flight) + len(self._awaiting),
                self._outbox.depth(),
            )
