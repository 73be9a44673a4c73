"""The edge's retained status on `faceattend/v1/edge/{device}/status` (QoS 1, retained): `online` while it runs,
`stopped` after a clean shutdown, `offline` (the last will) when it vanished.

Wiring (the order matters):

    will = offline_will(device_id, site, agent_version, fingerprint)
    link = PahoMqttLink(mqtt_config, will=will)          # the will is registered at connect time
    reporter = StatusReporter(link, device_id, site, agent_version, fingerprint,
                              health=agent.health, gallery_version=lambda: holder.version,
                              gallery_epoch=lambda: holder.epoch, config=StatusConfig())
    link.start(); reporter.start()
    ...
    gallery_sync(on_applied=lambda index: reporter.poke())  # a new gallery version is reported at once
    ...
    reporter.stop()                                      # retained `stopped`, waits for its PUBACK
    link.stop()                                          # DISCONNECT: the broker discards the will

When the reporter publishes `online` (always retained, fresh `ts`, `gallery_version` and its `gallery_epoch`,
and health figures):

- on every (re)connection of the link (a connection listener wakes the reporter thread; the connection that was
  already up when `start()` was called counts too). This replaces whatever the broker retained meanwhile: the
  `offline` will of a dropped connection, a stale `online` restored from the broker's persistence, or nothing at
  all after a broker that lost its store;
- every `interval_s` while connected (nothing is published, or queued in paho, while disconnected: the next
  connection publishes a fresh one), so a consumer can also tell a silent edge by the age of its last status;
- at once on `poke()` (gallery version applied, a camera lost), at most one per `min_interval_s`; pokes in between
  are folded into one publish.

`stop()` publishes `stopped` and waits up to `stop_timeout_s` for the PUBACK, then the agent stops the link. The
`stopped` status carries the figures of the last status published (the components are being stopped, and a
health callable that hangs must not hold up the shutdown). If the broker is unreachable, the wait times out and
the broker, once it notices the dead connection, publishes the `offline` will: also true.

Health figures. `health()` returns a nested mapping (numbers, strings, booleans, nested mappings); before it goes
on the wire `clean_health()` brings it within the contract (models/contract/status.py, limits.py): at most 3
levels and 256 entries, keys of 1-64 characters, strings cut to 256 characters, floats rounded (6 significant
digits, but never coarser than 0.001: a Unix time keeps its milliseconds), numpy scalars / enums / dataclasses
converted; None values are left out (the contract has no null figure); what cannot be represented (NaN, inf,
lists, objects, integers beyond 64 bits, deeper levels, entries past the limit) is dropped and counted in
`health_dropped`. A health callable that raises, or returns something other than a mapping, is logged (first
failure with its traceback, repeats at debug level) and the status still goes out with `health_error` saying why.
The encoded status is kept under the contract's 64 KiB: if the figures do not fit, their strings are left out,
then all of them.

`offline` caveats: its `ts` is when the link was created (the will is encoded once), and its figures are empty
(the server keeps the last known ones: enrollment_server/ingest.py). A device that disappears while the broker
itself is down keeps whatever was retained; consumers should also look at the age of the last status.

Threads: one daemon thread ("faceattend-status") calls `health()`, `gallery_version()` and `gallery_epoch()` and
publishes; connection listeners and `poke()` only set flags. These three must be safe to call from that
thread (read snapshots or locked counters).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from models.contract import limits, timestamps, topics
from models.contract.mqtt_link import MqttLink, PublishHandle, Will
from models.contract.status import EdgeStatus
from models.errors import ConfigError, ContractError

log = logging.getLogger(__name__)

HEALTH_ERROR_KEY = "health_error"
HEALTH_DROPPED_KEY = "health_dropped"
_RESERVED_ENTRIES = 2  # room the reporter keeps for its own two keys above
_SIG_DIGITS = 6
_MIN_DECIMALS = 3
_MAX_DECIMALS = 12
_MAX_TRACKED_HANDLES = 64

HealthFn = Callable[[], "Mapping[str, Any] | None"]
GalleryVersionFn = Callable[[], "int | None"]  # also the type of gallery_epoch()
_Gallery = tuple["int | None", "int | None"]  # (version, epoch) as a status reports them


@dataclass(frozen=True, kw_only=True)
class StatusConfig:
    interval_s: float = 30.0  # periodic `online` status while connected
    min_interval_s: float = 1.0  # poke() publishes at most this often
    stop_timeout_s: float = 5.0  # how long stop() waits for the PUBACK of `stopped`

    def __post_init__(self) -> None:
        for name, top in (("interval_s", 86_400.0), ("min_interval_s", 3_600.0), ("stop_timeout_s", 300.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"status.{name}: expected a number of seconds, got {value!r}")
            if not (math.isfinite(value) and 0 < value <= top):
                raise ConfigError(f"status.{name}: must be in (0, {top:g}] seconds, got {value!r}")
        if self.min_interval_s > self.interval_s:
            raise ConfigError(
                f"status.min_interval_s: must not exceed status.interval_s ({self.interval_s:g}), "
                f"got {self.min_interval_s!r}"
            )


@dataclass(frozen=True)
class CleanHealth:
    tree: dict[str, Any]
    dropped: int  # entries left out: unrepresentable value or key, too deep, past the entry limit
    truncated: int  # strings and keys cut to the contract's length


@dataclass(frozen=True)
class StatusStats:
    published: int  # statuses handed to the link (online and stopped)
    acknowledged: int  # of those, acknowledged by the broker (PUBACK)
    publish_errors: int  # refused by the link, failed handles, or refused by the broker
    health_errors: int  # health() / gallery_version() / gallery_epoch() raised or returned something unusable
    health_dropped: int  # health entries left out by clean_health(), summed over every status built
    connects: int  # (re)connections seen
    last_state: str | None
    last_published_at: str | None  # UTC ISO-8601


def offline_will(
    device_id: str,
    site: str,
    agent_version: str,
    fingerprint: str,
    *,
    gallery_version: int | None = None,
    gallery_epoch: int | None = None,
) -> Will:
    """The retained `offline` last will to create the agent's link with (`PahoMqttLink(config, will=...)`).
    Raises ConfigError for an invalid id, version or fingerprint."""
    try:
        status = _status("offline", device_id, site, agent_version, (gallery_version, gallery_epoch), fingerprint, {})
    except (ContractError, TypeError) as exc:
        raise ConfigError(f"status: {exc}") from exc
    return Will(topic=topics.edge_status(device_id), payload=status.to_json(), qos=1, retain=True)


class StatusReporter:
    """`start()` once after the link was created (before or after `link.start()`), `poke()` on news, `stop()` before
    `link.stop()`. The link is shared and neither started nor stopped here."""

    def __init__(
        self,
        link: MqttLink,
        device_id: str,
        site: str,
        agent_version: str,
        fingerprint: str,
        health: HealthFn | None = None,
        gallery_version: GalleryVersionFn | None = None,
        config: StatusConfig | None = None,
        gallery_epoch: GalleryVersionFn | None = None,
    ) -> None:
        try:  # fail at construction, naming the field, rather than on the reporter thread
            _status("online", device_id, site, agent_version, (None, None), fingerprint, {})
        except (ContractError, TypeError) as exc:
            raise ConfigError(f"status: {exc}") from exc
        self._link = link
        self._device = device_id
        self._site = site
        self._agent_version = agent_version
        self._fingerprint = fingerprint
        self._health = health
        self._gallery_version_fn = gallery_version
        self._gallery_epoch_fn = gallery_epoch
        self._config = config or StatusConfig()
        self.topic = topics.edge_status(device_id)

        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flags_lock = threading.Lock()
        self._want_online = False  # a (re)connect or start(): publish as soon as connected, no rate limit
        self._poked = False
        self._publish_lock = threading.Lock()  # orders the reporter's last publish before `stopped`
        self._stats_lock = threading.Lock()
        self._published = 0
        self._acknowledged = 0
        self._publish_errors = 0
        self._health_errors = 0
        self._health_dropped = 0
        self._connects = 0
        self._last_state: str | None = None
        self._last_published_at: str | None = None
        self._handles: list[PublishHandle] = []  # unresolved, for the acknowledged / error counts
        # the last figures published: `stopped` repeats them
        self._last_health: dict[str, Any] = {}
        self._last_gallery: _Gallery = (None, None)
        self._health_failing = False
        self._started = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="faceattend-status", daemon=True)
        link.add_connection_listener(self._on_connection)

    # ---- API ----

    def start(self) -> None:
        if self._started:
            raise ConfigError("status reporter already started (a reporter is started once)")
        self._started = True
        with self._flags_lock:
            self._want_online = True  # the link may be connected already: its listener call came before us
        self._thread.start()

    def poke(self) -> None:
        """Something the status shows changed (gallery version, a camera): publish soon, within `min_interval_s`."""
        with self._flags_lock:
            self._poked = True
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """End the reporter thread, publish the retained `stopped` status and wait up to `timeout` (default
        `stop_timeout_s`) for its PUBACK. True when the broker acknowledged it. Call before `link.stop()`."""
        if not self._started or self._stopped:
            return False
        self._stopped = True
        wait_s = self._config.stop_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait_s
        self._stopping.set()
        self._wake.set()
        self._thread.join(max(0.0, min(1.0, wait_s / 2)))  # a hung health() must not hold up the shutdown
        if self._thread.is_alive():
            log.warning("status reporter thread still busy (in health()?); publishing `stopped` anyway")
        status = self._build_with("stopped", dict(self._last_health), self._last_gallery)
        with self._publish_lock:
            handle = self._publish(status)
        if handle is None:
            return False
        acknowledged = handle.wait(max(0.0, deadline - time.monotonic()))
        self._settle_handles()
        if acknowledged and not handle.rejected:
            log.info("status: `stopped` acknowledged by the broker")
            return True
        log.warning(
            "status: `stopped` not acknowledged within %.1f s (%s); the broker will show the offline will instead",
            wait_s,
            "refused by the broker" if handle.rejected else "broker unreachable?",
        )
        return False

    def stats(self) -> StatusStats:
        self._settle_handles()
        with self._stats_lock:
            return StatusStats(
                published=self._published,
                acknowledged=self._acknowledged,
                publish_errors=self._publish_errors,
                health_errors=self._health_errors,
                health_dropped=self._health_dropped,
                connects=self._connects,
                last_state=self._last_state,
                last_published_at=self._last_published_at,
            )

    def counters(self) -> dict[str, int]:
        """Monotonic counts for the metrics endpoint (`MetricsServer(counters=reporter.counters)`)."""
        s = self.stats()
        return {
            "status_published": s.published,
            "status_acknowledged": s.acknowledged,
            "status_publish_errors": s.publish_errors,
            "status_health_errors": s.health_errors,
            "status_health_dropped": s.health_dropped,
            "mqtt_connects": s.connects,
        }

    def build(self, state: str = "online") -> EdgeStatus:
        """A status with fresh figures, as the reporter would publish it now (the agent's `status` command, tests).
        Calls health() on the caller's thread."""
        health, gallery = self._gather()
        return self._build_with(state, health, gallery)

    # ---- connection listener (paho's network thread): set a flag, nothing else ----

    def _on_connection(self, up: bool) -> None:
        if not up:
            return
        with self._flags_lock:
            self._want_online = True
        with self._stats_lock:
            self._connects += 1
        self._wake.set()

    # ---- reporter thread ----

    def _run(self) -> None:
        cfg = self._config
        last_publish = -math.inf
        next_periodic = time.monotonic() + cfg.interval_s
        while not self._stopping.is_set():
            self._wake.clear()  # before reading the flags: a flag set after this wakes the wait below
            now = time.monotonic()
            connected = self._link.is_connected()
            with self._flags_lock:
                reason = None
                if self._want_online:
                    reason = "connect"
                elif self._poked and now - last_publish >= cfg.min_interval_s:
                    reason = "poke"
                elif now >= next_periodic:
                    reason = "periodic"
                if reason is not None and connected:
                    self._want_online = self._poked = False
                if not connected:
                    self._poked = False  # the next connection publishes fresh figures anyway
            if reason is not None:
                if connected:
                    self._publish_online(reason)
                    last_publish = time.monotonic()
                    next_periodic = last_publish + cfg.interval_s
                elif reason == "periodic":
                    next_periodic = now + cfg.interval_s  # the next connection publishes a fresh status
            self._settle_handles()
            with self._flags_lock:
                poke_due = last_publish + cfg.min_interval_s if self._poked and connected else math.inf
            wait = min(next_periodic, poke_due) - time.monotonic()
            self._wake.wait(max(0.0, wait))

    def _publish_online(self, reason: str) -> None:
        try:
            health, gallery = self._gather()
            status = self._build_with("online", health, gallery)
        except Exception:  # a bug of ours: say so and keep reporting
            log.exception("status: building the online status failed; sending a minimal one")
            status = self._build_with(
                "online", {HEALTH_ERROR_KEY: "status reporter error (see the edge log)"}, (None, None)
            )
        with self._publish_lock:
            if self._stopping.is_set():
                return  # `stopped` is (about to be) published: an `online` after it would be retained instead
            if self._publish(status) is not None:
                log.debug("status: online published (%s), gallery v%s", reason, status.gallery_version)

    def _gather(self) -> tuple[dict[str, Any], _Gallery]:
        """Fresh health figures and gallery (version, epoch); never raises."""
        error: str | None = None
        raw: object = None
        if self._health is not None:
            try:
                raw = self._health()
            except Exception as exc:
                error = f"health() raised {type(exc).__name__}: {exc}"
                self._health_failed(error, exc)
        if raw is not None and not isinstance(raw, Mapping) and error is None:
            error = f"health() returned {type(raw).__name__}, not a mapping"
            self._health_failed(error, None)
            raw = None
        cleaned = clean_health(raw or {}, max_entries=limits.MAX_HEALTH_ENTRIES - _RESERVED_ENTRIES)
        tree = cleaned.tree
        if cleaned.dropped:
            tree[HEALTH_DROPPED_KEY] = cleaned.dropped
            with self._stats_lock:
                self._health_dropped += cleaned.dropped
        gallery = list(self._last_gallery)
        for i, (name, fn) in enumerate(
            (("gallery_version", self._gallery_version_fn), ("gallery_epoch", self._gallery_epoch_fn))
        ):
            if fn is None:
                continue
            try:
                value = fn()
                if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                    raise TypeError(f"returned {type(value).__name__}, not an integer or None")
                if value is not None and value < 0:
                    raise ValueError(f"returned {value}, a negative number")
                gallery[i] = None if value is None else int(value)
            except Exception as exc:
                detail = f"{name}() failed: {type(exc).__name__}: {exc}"
                error = detail if error is None else error
                self._health_failed(detail, exc)
        if error is None:
            if self._health_failing:
                log.info("status: health figures are available again")
            self._health_failing = False
        else:
            tree[HEALTH_ERROR_KEY] = error[: limits.MAX_HEALTH_STR_CHARS]
        return tree, (gallery[0], gallery[1])

    def _health_failed(self, what: str, exc: BaseException | None) -> None:
        with self._stats_lock:
            self._health_errors += 1
        if self._health_failing:
            log.debug("status: %s", what)
            return
        self._health_failing = True
        log.error("status: %s; statuses go out with `%s` until it recovers", what, HEALTH_ERROR_KEY, exc_info=exc)

    def _build_with(self, state: str, health: dict[str, Any], gallery: _Gallery) -> EdgeStatus:
        """The status; within the contract's size limit whatever the figures (strings, then figures, dropped)."""
        attempts: list[dict[str, Any]] = [health]
        if _has_strings(health):
            stripped = _without_strings(health)
            stripped[HEALTH_ERROR_KEY] = "health figures too large for a status: strings left out"
            attempts.append(stripped)
        attempts.append({HEALTH_ERROR_KEY: "health figures too large for a status: left out"})
        for tree in attempts:
            try:
                status = _status(state, self._device, self._site, self._agent_version, gallery, self._fingerprint, tree)
            except ContractError as exc:  # clean_health() should make this impossible; a bug must not stop statuses
                log.error("status: health figures refused by the contract (%s); leaving them out", exc)
                continue
            if len(status.to_json()) <= limits.MAX_STATUS_BYTES:
                if tree is not health:
                    log.warning(
                        "status: health figures exceed the %d byte status limit; %s",
                        limits.MAX_STATUS_BYTES,
                        tree[HEALTH_ERROR_KEY],
                    )
                return status
        return _status(state, self._device, self._site, self._agent_version, gallery, self._fingerprint, {})

    def _publish(self, status: EdgeStatus) -> PublishHandle | None:
        """Publish retained, QoS 1; remember the figures (for `stopped`). None when the link refused it."""
        try:
            handle = self._link.publish(self.topic, status.to_json(), qos=1, retain=True)
        except Exception as exc:  # MqttError (link stopped, bad topic) or worse: count it, keep the thread alive
            log.warning("status: %s status not published: %s", status.state, exc)
            with self._stats_lock:
                self._publish_errors += 1
            return None
        with self._stats_lock:
            self._published += 1
            self._last_state = status.state
            self._last_published_at = status.ts
            self._handles.append(handle)
            if len(self._handles) > _MAX_TRACKED_HANDLES:  # only while the broker is not answering
                del self._handles[0]
        self._last_health = {k: v for k, v in _plain(status.health).items() if k != HEALTH_DROPPED_KEY}
        self._last_gallery = (status.gallery_version, status.gallery_epoch)
        return handle

    def _settle_handles(self) -> None:
        with self._stats_lock:
            still: list[PublishHandle] = []
            for handle in self._handles:
                if handle.acknowledged and not handle.rejected:
                    self._acknowledged += 1
                elif handle.failed or handle.rejected:
                    self._publish_errors += 1
                else:
                    still.append(handle)
            self._handles = still


# ---- health figures ----


def clean_health(tree: Mapping[Any, Any], *, max_entries: int = limits.MAX_HEALTH_ENTRIES) -> CleanHealth:
    """A copy of `tree` within the status contract's health limits (see the module docstring); never raises."""
    counter = _Counter(max_entries)
    out = _clean_node(tree, 1, counter)
    if out is None:
        counter.dropped += 1
    return CleanHealth(tree=out or {}, dropped=counter.dropped, truncated=counter.truncated)


class _Counter:
    def __init__(self, max_entries: int) -> None:
        self.left = max_entries
        self.dropped = 0
        self.truncated = 0


def _clean_node(node: Mapping[Any, Any], depth: int, c: _Counter) -> dict[str, Any] | None:
    """The cleaned copy; None when the mapping cannot even be read."""
    out: dict[str, Any] = {}
    try:
        items = list(node.items())
    except Exception:  # a broken Mapping implementation
        return None
    for raw_key, raw_value in items:
        key = _clean_key(raw_key, c)
        if key is None or key in out:
            c.dropped += 1 + _size(raw_value)
            continue
        value = _plain_value(raw_value)
        if value is None:
            continue  # absent: the contract has no null figure
        if isinstance(value, Mapping):
            if depth >= limits.MAX_HEALTH_DEPTH or c.left <= 0:
                c.dropped += 1 + _size(value)
                continue
            c.left -= 1  # the contract counts the mapping's key before its children
            child = _clean_node(value, depth + 1, c)
            if child is None:
                c.left += 1
                c.dropped += 1
                continue
            out[key] = child
            continue
        leaf = _clean_leaf(value, c)
        if leaf is _DROP:
            c.dropped += 1
            continue
        if c.left <= 0:
            c.dropped += 1
            continue
        c.left -= 1
        out[key] = leaf
    return out


_DROP = object()


def _clean_key(key: object, c: _Counter) -> str | None:
    if isinstance(key, enum.Enum):
        key = key.value
    if not isinstance(key, str):
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            key = str(key)
        else:
            return None
    if not key:
        return None
    if len(key) > limits.MAX_HEALTH_KEY_CHARS:
        c.truncated += 1
        key = key[: limits.MAX_HEALTH_KEY_CHARS]
    return key


def _plain_value(value: Any) -> Any:
    """Unwrap enums, numpy scalars and dataclass instances into plain values / mappings."""
    for _ in range(3):  # an enum of a numpy scalar, ...
        if isinstance(value, enum.Enum):
            value = value.value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        elif type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        else:
            break
    return value


def _clean_leaf(value: Any, c: _Counter) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        number = int(value)
        return number if -(2**63) < number < 2**63 else _DROP
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except (OverflowError, ValueError, TypeError):
            return _DROP
        if not math.isfinite(number) or abs(number) >= 2**63:
            return _DROP
        return _round(number)
    if isinstance(value, str):
        if len(value) > limits.MAX_HEALTH_STR_CHARS:
            c.truncated += 1
            return value[: limits.MAX_HEALTH_STR_CHARS]
        return value
    return _DROP


def _round(number: float) -> float:
    if number == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(number)))
    decimals = min(_MAX_DECIMALS, max(_MIN_DECIMALS, _SIG_DIGITS - 1 - exponent))
    return round(number, decimals)


def _size(value: Any) -> int:
    """How many entries a dropped subtree held (for the dropped count), bounded so that a huge tree costs little."""
    if not isinstance(value, Mapping):
        return 0
    total, stack = 0, [value]
    while stack and total < 10_000:
        node = stack.pop()
        try:
            children = list(node.values())
        except Exception:
            continue
        total += len(children)
        stack.extend(v for v in children if isinstance(v, Mapping))
    return total


def _has_strings(tree: Mapping[str, Any]) -> bool:
    return any(isinstance(v, str) or (isinstance(v, Mapping) and _has_strings(v)) for v in tree.values())


def _without_strings(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _without_strings(v) if isinstance(v, Mapping) else v for k, v in tree.items() if not isinstance(v, str)}


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _status(
    state: str,
    device_id: str,
    site: str,
    agent_version: str,
    gallery: _Gallery,
    fingerprint: str,
    health: Mapping[str, Any],
) -> EdgeStatus:
    version, epoch = gallery
    return EdgeStatus(
        state=state,
        device_id=device_id,
        site=site,
        agent_version=agent_version,
        gallery_version=version,
        # an epoch only beside a version: a status says which release it holds, or none
        gallery_epoch=epoch if version is not None else None,
        fingerprint=fingerprint,
        ts=timestamps.utc_now(),
        health=dict(health),
    )
