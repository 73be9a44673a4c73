"""An optional Prometheus endpoint: the edge's health figures (the same tree its retained status carries) in the
text exposition format 0.0.4, served by the standard library's HTTP server on a daemon thread.

Off by default. `MetricsConfig(enabled=True)` listens on 127.0.0.1:9108 (`GET /metrics`); bind another address
only behind a firewall or on a management network: the endpoint has no authentication (it shows figures, never
images or names). No third-party client library: the format is a few lines of text and the edge already depends
on enough; what prometheus_client would add (process metrics, histograms) the health tree does not use.

Mapping of the health tree (`health()`, cleaned by `edge_agent.health.status.clean_health`, so the limits of the status
contract apply here too):

- a figure's path is its keys, nested or dotted alike (`{"a": {"b": 1}}` and `{"a.b": 1}` are the same figure);
  the path `a.b.c` becomes the gauge `faceattend_edge_a_b_c`, every character outside `[A-Za-z0-9_]` made `_`;
- per-item groups become labels (`LABEL_GROUPS`): where the path passes a group key, the next key is the item
  and becomes a label, at any depth:
      cameras.<name>.fps  or  camera.<name>.fps    -> faceattend_edge_camera_fps{camera="<name>"}
      worker.camera.<name>.fps                     -> faceattend_edge_worker_camera_fps{camera="<name>"}
      rejected.<reason>                            -> faceattend_edge_rejected{reason="<reason>"}
  In the nested form the item key is taken whole (a camera may be called "cam.1"); in the dotted form the item
  is the one segment after the group key;
- booleans are 1 / 0; a string becomes an info gauge `faceattend_edge_<path>_info{value="<string>"} 1` (keep
  strings to states and versions: each distinct value is a series of its own);
- a key ending in `_total` is exposed as a counter, everything else as a gauge;
- two paths that spell the same series after sanitising: the first one wins, the others are counted in
  `faceattend_edge_health_dropped`.

Besides the health figures, every scrape shows:

    faceattend_edge_info{device_id=..., site=..., agent_version=..., fingerprint=...} 1  (the `info` mapping)
    faceattend_edge_health_ok                     1 when health() answered this scrape, 0 when it raised
    faceattend_edge_health_dropped                health entries that could not be exposed in this scrape
    faceattend_edge_metrics_scrapes_total         scrapes served
    faceattend_edge_metrics_health_errors_total   scrapes whose health() raised or returned no mapping
    faceattend_edge_<name>_total                  each figure of the `counters` callable (e.g. the status reporter's)

`health()` and `counters()` are called on the HTTP server's request threads, concurrently with the rest of the
agent: they must be thread-safe and quick. A failure in them is logged (first time with its traceback) and the
scrape still answers with what it has.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.health.status import clean_health
from models.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "faceattend_edge"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# group key in a health path -> (what the metric name keeps of it, the label its next key becomes)
LABEL_GROUPS: Mapping[str, tuple[str, str]] = {
    "cameras": ("camera", "camera"),
    "camera": ("camera", "camera"),
    "rejected": ("rejected", "reason"),
}

_NAME_BAD = re.compile(r"[^A-Za-z0-9_]")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"  # an IPv6 address (e.g. "::1") works too
    port: int = 9108  # 0: any free port (tests); `MetricsServer.port` tells which

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"metrics.enabled: expected true or false, got {self.enabled!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError(f"metrics.host: expected an address to listen on, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics.port: expected an integer in [0, 65535], got {self.port!r}")


@dataclass
class _Family:
    kind: str  # "gauge" or "counter"
    help: str
    samples: dict[tuple[tuple[str, str], ...], float | int] = field(default_factory=dict)


class Exposition:
    """Families of samples in insertion order; a sample that would repeat a series or change a family's type is
    refused (`add` returns False), so the rendered text is always valid."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def add(
        self, name: str, value: float | int, labels: Iterable[tuple[str, str]] = (), *, kind: str = "gauge", help: str
    ) -> bool:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _Family(kind, help)
        elif family.kind != kind:
            return False
        key = tuple(labels)
        if key in family.samples:
            return False
        family.samples[key] = value
        return True

    def set(self, name: str, value: float | int, labels: Iterable[tuple[str, str]] = ()) -> None:
        """Overwrite the value of a series already added."""
        self._families[name].samples[tuple(labels)] = value

    def render(self) -> str:
        lines: list[str] = []
        for name, family in self._families.items():
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            for labels, value in family.samples.items():
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


def metric_name(*parts: str) -> str:
    """`faceattend_edge_<parts joined by _>`, every character outside [A-Za-z0-9_] replaced by `_`."""
    return "_".join([PREFIX, *(_NAME_BAD.sub("_", p) for p in parts)])


def add_health(
    out: Exposition, tree: Mapping[str, Any], label_groups: Mapping[str, tuple[str, str]] = LABEL_GROUPS
) -> tuple[int, int]:
    """Add a cleaned health tree's figures to `out` (mapping in the module docstring); returns (added, refused:
    clashing series, unusable keys)."""
    counts = [0, 0]

    def emit(path: list[str], value: Any) -> None:
        parts, labels, where = _series(path, label_groups)
        kind = "counter" if parts[-1].endswith("_total") else "gauge"
        if isinstance(value, str):
            parts = [*parts[:-1], f"{parts[-1]}_info"]
            labels = [*labels, ("value", value)]
            value, kind = 1, "gauge"
        elif isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            counts[1] += 1
            return
        ok = out.add(metric_name(*parts), value, labels, kind=kind, help=f"health figure {where}")
        counts[0 if ok else 1] += 1

    def walk(node: Mapping[str, Any], path: list[str], item_next: bool) -> None:
        for key, value in node.items():
            # an item key (right after a group key) is a label value, taken whole; any other key is a dotted path
            segments = [key] if item_next else [s for s in str(key).split(".") if s]
            if not segments:
                counts[1] += 1
                continue
            here = [*path, *segments]
            if isinstance(value, Mapping):
                walk(value, here, not item_next and segments[-1] in label_groups)
            else:
                emit(here, value)

    walk(tree, [], False)
    return counts[0], counts[1]


def _series(path: list[str], label_groups: Mapping[str, tuple[str, str]]) -> tuple[list[str], list, str]:
    """Name parts, labels and a readable path (items as <label>) of a health path."""
    parts: list[str] = []
    labels: list[tuple[str, str]] = []
    where: list[str] = []
    i = 0
    while i < len(path):
        segment = path[i]
        group = label_groups.get(segment)
        if group is not None and i + 1 < len(path) and group[1] not in dict(labels):
            name_part, label = group
            parts.append(name_part)
            labels.append((label, path[i + 1]))
            where += [segment, f"<{label}>"]
            i += 2
        else:
            parts.append(segment)
            where.append(segment)
            i += 1
    return parts, labels, ".".join(where)


HealthFn = Callable[[], "Mapping[str, Any] | None"]
CountersFn = Callable[[], "Mapping[str, float | int]"]


class MetricsServer:
    """`start()` (does nothing unless `config.enabled`), `stop()`. `render()` builds the page without HTTP."""

    def __init__(
        self,
        config: MetricsConfig,
        health: HealthFn | None = None,
        *,
        info: Mapping[str, str] | None = None,
        counters: CountersFn | None = None,
        label_groups: Mapping[str, tuple[str, str]] = LABEL_GROUPS,
    ) -> None:
        for name in list(info or ()) + [label for _, label in label_groups.values()]:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ConfigError(f"metrics: {name!r} is not a valid Prometheus label name")
        self.config = config
        self._health = health
        self._info = dict(info or {})
        self._counters = counters
        self._label_groups = dict(label_groups)
        self._lock = threading.Lock()
        self._scrapes = 0
        self._health_errors = 0
        self._failing: set[str] = set()  # which callables are failing (logged once until they recover)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port listened on (the real one when configured as 0); None when not serving."""
        return self._server.server_address[1] if self._server is not None else None

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def start(self) -> None:
        if not self.config.enabled:
            log.debug("metrics endpoint disabled")
            return
        if self._server is not None:
            raise ConfigError("metrics server already started")
        metrics = self

        class Handler(_Handler):
            server_metrics = metrics

        server_class = _Server6 if ":" in self.config.host else _Server
        try:
            server = server_class((self.config.host, self.config.port), Handler)
        except OSError as exc:
            raise ConfigError(f"metrics.port: cannot listen on {self.config.host}:{self.config.port}: {exc}") from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="faceattend-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics: serving %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has ended
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        self._server = self._thread = None

    def render(self) -> str:
        with self._lock:
            self._scrapes += 1
        out = Exposition()
        if self._info:
            labels = sorted((k, str(v)) for k, v in self._info.items())
            out.add(f"{PREFIX}_info", 1, labels, help="edge agent identity")
        raw, ok = self._call("health", self._health)
        if not ok:
            with self._lock:
                self._health_errors += 1
        cleaned = clean_health(raw or {})
        out.add(f"{PREFIX}_health_ok", int(ok), help="1 when health() answered this scrape")
        dropped_help = "health entries that could not be exposed in this scrape"
        # reserve the name before the tree's figures, then fill in the count (the dict keeps the order)
        out.add(f"{PREFIX}_health_dropped", 0, help=dropped_help)
        with self._lock:
            scrapes, errors = self._scrapes, self._health_errors
        out.add(f"{PREFIX}_metrics_scrapes_total", scrapes, kind="counter", help="scrapes served")
        out.add(
            f"{PREFIX}_metrics_health_errors_total",
            errors,
            kind="counter",
            help="scrapes whose health() raised or returned no mapping",
        )
        counters, _ = self._call("counters", self._counters)
        for name, value in (counters or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            full = metric_name(str(name))
            if not full.endswith("_total"):
                full += "_total"
            out.add(full, value, kind="counter", help=f"counter {name}")
        _, refused = add_health(out, cleaned.tree, self._label_groups)
        out.set(f"{PREFIX}_health_dropped", cleaned.dropped + refused)
        return out.render()

    def _call(self, what: str, fn: Callable[[], Any] | None) -> tuple[Mapping[Any, Any] | None, bool]:
        """fn()'s mapping (None: nothing to show) and whether it answered properly."""
        if fn is None:
            return None, True
        try:
            value = fn()
        except Exception as exc:
            self._failed(what, f"raised {type(exc).__name__}: {exc}", exc)
            return None, False
        if value is not None and not isinstance(value, Mapping):
            self._failed(what, f"returned {type(value).__name__}, not a mapping", None)
            return None, False
        with self._lock:
            recovered = what in self._failing
            self._failing.discard(what)
        if recovered:
            log.info("metrics: %s() answers again", what)
        return value, True

    def _failed(self, what: str, detail: str, exc: BaseException | None) -> None:
        with self._lock:
            first = what not in self._failing
            self._failing.add(what)
        if first:
            log.error("metrics: %s() %s; scrapes answer without its figures", what, detail, exc_info=exc)
        else:
            log.debug("metrics: %s() %s", what, detail)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_metrics: MetricsServer
    server_version = "faceattend-metrics"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = self.server_metrics.render().encode()
            except Exception:
                log.exception("metrics: rendering failed")
                self._reply(500, b"metrics rendering failed; see the edge log\n", "text/plain; charset=utf-8")
                return
            self._reply(200, body, CONTENT_TYPE)
        elif path == "/":
            self._reply(200, b"faceattend edge metrics: GET /metrics\n", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found; the metrics are at /metrics\n", "text/plain; charset=utf-8")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
