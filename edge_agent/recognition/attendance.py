"""Which track decisions become attendance events: one per person per door (camera) per window.

Somebody who lingers at the door, leaves and comes back a minute later, or is tracked twice because a hand crossed
their face, must not be counted several times: after an admitted event for (camera, person), further decisions for
that pair are refused until `window_s` has passed since the admitted one (a fixed window from the event, not one
that each sighting prolongs: a person standing at the door all morning is counted again every window).

Unknown faces are refused unless `unknown_events` is on; then each track gives at most one unknown event (the
recognizer already decides a track once, the gate makes it hold even for a caller that replays decisions).

Admission is a promise that an event will exist: when the event cannot be stored after all (the outbox refuses
it, the disk is full), the caller `revoke`s the admission, so the person's next decision is admitted instead of
being suppressed as a repeat of an event nobody will ever see.

Time is the decision's `decided_ts` (time.monotonic() in the agent), so the gate follows the frames, not the moment
it is called. Memory is bounded: entries older than the window are dropped as admissions go by (oldest first, in
O(1) amortised), and at most `max_entries` are kept; past that the oldest goes early (logged), which can only let a
duplicate through, never lose an event. Thread-safe.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from edge_agent.recognition.recognizer import TrackDecision
from models.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttendanceConfig:
    window_s: float = 300.0  # one event per person per camera within this many seconds
    unknown_events: bool = False  # publish unknown faces too (one event per track)
    max_entries: int = 100_000  # remembered (camera, person) and (camera, track) pairs at most

    def __post_init__(self) -> None:
        if isinstance(self.window_s, bool) or not (
            isinstance(self.window_s, (int, float)) and math.isfinite(self.window_s) and self.window_s >= 0
        ):
            raise ConfigError(f"attendance.window_s: must be a finite number >= 0, got {self.window_s!r}")
        if not isinstance(self.unknown_events, bool):
            raise ConfigError(f"attendance.unknown_events: expected true or false, got {self.unknown_events!r}")
        if isinstance(self.max_entries, bool) or not isinstance(self.max_entries, int) or self.max_entries < 1:
            raise ConfigError(f"attendance.max_entries: must be an integer >= 1, got {self.max_entries!r}")


@dataclass(frozen=True)
class AttendanceStats:
    admitted_known: int
    admitted_unknown: int
    suppressed_repeat: int  # a known person again within the window (or an unknown track decided twice)
    suppressed_unknown: int  # unknowns refused because unknown_events is off
    entries: int  # pairs remembered now
    evicted_early: int  # entries dropped before their window ended because of max_entries
    revoked: int  # admissions taken back because their event could not be stored (not in admitted_*)


_Key = tuple[str, str, object]  # ("person", camera, person_id) or ("track", camera, track_id)


class AttendanceGate:
    def __init__(self, config: AttendanceConfig | None = None) -> None:
        self.config = config or AttendanceConfig()
        self._lock = threading.Lock()
        # key -> time of the admitted event; insertion order is admission order, which is the expiry order as long
        # as decided_ts does not go back (one worker thread; a late caller's entry only expires a little late)
        self._entries: OrderedDict[_Key, float] = OrderedDict()
        self._known = 0
        self._unknown = 0
        self._repeat = 0
        self._unknown_off = 0
        self._evicted = 0
        self._revoked = 0

    def admit(self, decision: TrackDecision) -> bool:
        """True when this decision is to become an attendance event (and is remembered as such)."""
        now = decision.decided_ts
        if decision.person_id is None and not self.config.unknown_events:
            with self._lock:
                self._unknown_off += 1
            return False
        key = self._key(decision)
        with self._lock:
            self._expire(now)
            last = self._entries.get(key)
            if last is not None and now - last < self.config.window_s:
                self._repeat += 1
                return False
            self._entries.pop(key, None)
            self._entries[key] = now
            while len(self._entries) > self.config.max_entries:
                old, _ = self._entries.popitem(last=False)
                self._evicted += 1
                log.warning("attendance gate full (%d entries): forgot %s early", self.config.max_entries, old)
            if decision.person_id is None:
                self._unknown += 1
            else:
                self._known += 1
            return True

    def revoke(self, decision: TrackDecision) -> None:
        """`decision` was admitted but its event was not stored: forget the admission (if it is still the one
        remembered for its person or track) and count it as revoked rather than admitted."""
        if decision.person_id is None and not self.config.unknown_events:
            return  # never admitted
        key = self._key(decision)
        with self._lock:
            if self._entries.get(key) == decision.decided_ts:
                del self._entries[key]
            self._revoked += 1
            if decision.person_id is None:
                self._unknown -= 1
            else:
                self._known -= 1

    @staticmethod
    def _key(decision: TrackDecision) -> _Key:
        if decision.person_id is None:
            return ("track", decision.camera, decision.track_id)
        return ("person", decision.camera, decision.person_id)

    def _expire(self, now: float) -> None:
        window = self.config.window_s
        while self._entries:
            key, ts = next(iter(self._entries.items()))
            if now - ts < window:
                return
            del self._entries[key]

    def stats(self) -> AttendanceStats:
        with self._lock:
            return AttendanceStats(
                admitted_known=self._known,
                admitted_unknown=self._unknown,
                suppressed_repeat=self._repeat,
                suppressed_unknown=self._unknown_off,
                entries=len(self._entries),
                evicted_early=self._evicted,
                revoked=self._revoked,
            )
