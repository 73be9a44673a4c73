"""Drains the durable outbox to MQTT: QoS 1, not retained, each event on the topic stored with it
(`faceattend/v1/edge/{device}/events`), deleted from the outbox only once the broker has acknowledged it.

One background thread does everything, so the outbox rows it tracks need no locking of their own:

- it publishes only while the link is connected, oldest first, at most `max_in_flight` unacknowledged events at a
  time: that bounds paho's memory queue (the outbox is the unbounded, durable one);
- an event is handed to the link once; while its PublishHandle is pending the row is in flight and never
  published again concurrently. paho itself resends its unacknowledged messages after a reconnect, so a
  disconnect alone does not make us publish again (that would double every in-flight event);
- a row is published again when its handle failed (the link was stopped), when the broker refused it (MQTT 5
  reason >= 0x80, retried after `ack_timeout_s` so a misconfigured ACL does not spin), or when no PUBACK came
  for `ack_timeout_s` while connected (a lost message): a rare duplicate, which consumers drop by `event_id`;
- acknowledged rows are deleted in batches (one outbox transaction, one fsync, per loop turn);
- `notify()` (call it after each `Outbox.put_new`) wakes the thread at once: an event is on the wire within
  milliseconds of its commit; without it the outbox is looked at every `idle_interval_s`.

Rows left by a previous run (a crash, a `kill -9`, a power cut) are published on the first connection. `stop()`
waits a little for in-flight PUBACKs, deletes what was acknowledged and leaves everything else in the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from edge_agent.delivery.outbox import Outbox, OutboxItem
from models.contract.mqtt_link import MqttLink, PublishHandle
from models.errors import ConfigError

log = logging.getLogger(__name__)

_ERROR_BACKOFF_S = 1.0  # after a failing outbox or link operation: retry, without spinning on a broken disk


@dataclass(frozen=True)
class PublisherStats:
    connected: bool
    published: int  # publishes handed to the link, re-publications included
    acked: int  # events acknowledged by the broker and removed from the outbox
    republished: int  # rows taken back to be published again (handle failed, refused, no PUBACK in time)
    in_flight: int  # published, PUBACK not yet seen
    depth: int  # undelivered events in the outbox (in flight included)
    oldest_age_s: float  # age of the oldest undelivered event; 0.0 when none
    last_error: str | None


@dataclass(frozen=True)
class _InFlight:
    item: OutboxItem
    handle: PublishHandle
    sent: float  # time.monotonic() of the publish


class EventPublisher:
    """`start()` once, `notify()` after each put, `stop()` at the end. The link is shared (status, gallery) and
    neither started nor stopped here."""

    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        *,
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
        self._max_in_flight = max_in_flight
        self._ack_timeout_s = ack_timeout_s
        self._poll_s = poll_interval_s  # how often PublishHandles are looked at while events are in flight
        self._idle_s = idle_interval_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_until = 0.0
        self._connected_at = time.monotonic()
        # owned by the worker thread; stats() only reads its length
        self._in_flight: dict[int, _InFlight] = {}
        self._stats_lock = threading.Lock()
        self._published = 0
        self._acked = 0
        self._republished = 0
        self._last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="event-publisher", daemon=True)
        link.add_connection_listener(self._on_connection)

    # ---- API ----

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """A new event was put: publish it now rather than at the next idle look."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop publishing, give in-flight events most of `timeout` to be acknowledged, delete those that were;
        the rest stay in the outbox for the next run. True when the thread ended in time."""
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
            published, acked, republished, error = self._published, self._acked, self._republished, self._last_error
        return PublisherStats(
            connected=self._link.is_connected(),
            published=published,
            acked=acked,
            republished=republished,
            in_flight=len(self._in_flight),
            depth=self._outbox.depth(),
            oldest_age_s=self._outbox.oldest_age_s(),
            last_error=error,
        )

    # ---- worker thread ----

    def _on_connection(self, up: bool) -> None:  # paho's network thread: note it and wake the worker
        if up:
            self._connected_at = time.monotonic()
        self._wake.set()

    def _run(self) -> None:
        cursor = 0  # invariant: every outbox row with an id <= cursor is in flight or already acknowledged
        while not self._stopping.is_set():
            self._wake.clear()  # before the work: a notify() arriving during it makes the wait below return
            pause = self._poll_s if self._in_flight else self._idle_s
            try:
                cursor = self._settle(cursor)
                if self._link.is_connected():
                    cursor = self._fill(cursor)
                    pause = self._poll_s if self._in_flight else self._idle_s
            except Exception as exc:  # the thread must outlive any failure: the events wait in the outbox
                log.exception("event publisher: %s (depth %d); retrying", exc, self._outbox.depth())
                with self._stats_lock:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                pause = _ERROR_BACKOFF_S
            self._wake.wait(pause)
        self._drain()

    def _fill(self, cursor: int) -> int:
        free = self._max_in_flight - len(self._in_flight)
        if free <= 0:
            return cursor
        # a range read on the primary key: costs next to nothing when no row lies above the cursor
        for item in self._outbox.pending(free, after_id=cursor):
            if item.row_id not in self._in_flight:  # rows below an earlier cursor reset may still be in flight
                handle = self._link.publish(item.topic, item.payload, qos=1, retain=False)
                self._in_flight[item.row_id] = _InFlight(item, handle, time.monotonic())
                with self._stats_lock:
                    self._published += 1
                log.debug("event publisher: published %s seq %d", item.event_id, item.seq)
            cursor = item.row_id
        return cursor

    def _settle(self, cursor: int) -> int:
        """Delete what was acknowledged; take back for publishing what failed or timed out. Returns the cursor,
        lowered below any row taken back."""
        if not self._in_flight:
            return cursor
        now = time.monotonic()
        connected = self._link.is_connected()
        acked: list[int] = []
        retry: list[_InFlight] = []
        for row_id, entry in self._in_flight.items():
            handle = entry.handle
            if handle.acknowledged and not handle.rejected:
                acked.append(row_id)
            elif handle.failed or (
                # paho resends after a reconnect: the clock restarts then, and stands still while disconnected
                connected and now - max(entry.sent, self._connected_at) > self._ack_timeout_s
            ):
                retry.append(entry)
        if acked:
            self._outbox.delete(acked)  # raises before anything is forgotten: retried next turn
            for row_id in acked:
                del self._in_flight[row_id]
            with self._stats_lock:
                self._acked += len(acked)
        if not retry:
            return cursor
        reasons: set[str] = set()
        for entry in retry:
            del self._in_flight[entry.item.row_id]
            cursor = min(cursor, entry.item.row_id - 1)
            handle = entry.handle
            if handle.rejected:
                reasons.add(f"refused by the broker, reason {handle.reason_code}")
            else:
                reasons.add("the link failed them" if handle.failed else f"no PUBACK within {self._ack_timeout_s:g} s")
        ids = ", ".join(entry.item.event_id for entry in retry)
        log.warning("event publisher: publishing %d events again (%s): %s", len(retry), "; ".join(sorted(reasons)), ids)
        with self._stats_lock:
            self._republished += len(retry)
            if any(entry.handle.rejected for entry in retry):
                self._last_error = f"events refused by the broker: {ids}"
        return cursor

    def _drain(self) -> None:
        try:
            while self._in_flight and time.monotonic() < self._drain_until:
                self._settle(0)  # the cursor no longer matters: nothing is published from here on
                time.sleep(self._poll_s)
            self._settle(0)
        except Exception:
            log.exception("event publisher: stopping with %d events in flight", len(self._in_flight))
        if self._in_flight:
            log.info(
                "event publisher stopped: %d events unacknowledged stay in the outbox (depth %d)",
                len(self._in_flight),
                self._outbox.depth(),
            )
