"""The edge's Prometheus endpoint (edge_agent/health/metrics.py) fetched over real HTTP and parsed as the text
exposition format; the health-figure cleaning it shares with the status reporter (edge_agent/health/status.py); the
latency EMA (edge_agent/recognition/latency.py)."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from edge_agent.health.metrics import CONTENT_TYPE, MetricsConfig, MetricsServer, metric_name
from edge_agent.health.status import StatusConfig, StatusReporter, clean_health, offline_will
from edge_agent.recognition.latency import LatencyEma
from models.contract import limits
from models.contract.status import EdgeStatus
from models.errors import ConfigError

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Series = tuple[str, frozenset]


def parse_exposition(text: str) -> tuple[dict[Series, float], dict[str, str]]:
    """A strict reader of the text format 0.0.4: one TYPE per family before its samples, valid names and labels,
    float values, no repeated series. Returns ({(name, labels): value}, {name: type})."""
    assert text.endswith("\n")
    samples: dict[Series, float] = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"second TYPE for {name}"
            assert kind in ("gauge", "counter"), line
            types[name] = kind
            continue
        assert not line.startswith("#") and line, f"unexpected line {line!r}"
        m = _SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name, label_text, value = m[1], m[2], m[3]
        assert name in types, f"sample {name} before its TYPE"
        labels: dict[str, str] = {}
        pos = 0
        while label_text and pos < len(label_text):
            lm = _LABEL.match(label_text, pos)
            assert lm, f"bad labels in {line!r}"
            assert lm[1] not in labels
            labels[lm[1]] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e[0]], lm[2])
            pos = lm.end()
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"repeated series {line!r}"
        samples[key] = float(value)
    return samples, types


def series(name: str, **labels: str) -> Series:
    return (name, frozenset(labels.items()))


class State(enum.Enum):
    STREAMING = "streaming"


@dataclasses.dataclass
class CameraStats:
    fps: float
    state: State
    frames_total: int


def good_health() -> dict[str, Any]:
    return {
        "uptime_s": 12.25,
        "connected": True,
        "gallery": {"version": 4, "people": 27},
        "outbox": {"depth": 2, "last_error": 'disk "full"\nretrying'},
        "cameras": {
            "front door": {"fps": np.float32(12.5), "state": State.STREAMING, "frames_total": np.int64(900)},
            "back": CameraStats(fps=0.0, state=State.STREAMING, frames_total=3),
        },
        "latency": {"detect": {"ema_ms": 8.5, "p95_ms": 11.0}},
    }


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[MetricsServer] = []

    def make(health: Any, **kwargs: Any) -> MetricsServer:
        server = MetricsServer(MetricsConfig(enabled=True, port=0), health, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_health_figures_over_http(serve):
    server = serve(
        good_health,
        info={"device_id": "door-1", "site": "hq", "agent_version": "0.1.0"},
        counters=lambda: {"status_published": 5, "events_acked_total": 7},
    )
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    code, content_type, text = fetch(server.url)
    assert code == 200 and content_type == CONTENT_TYPE
    samples, types = parse_exposition(text)

    assert samples[series("faceattend_edge_info", device_id="door-1", site="hq", agent_version="0.1.0")] == 1
    assert samples[series("faceattend_edge_health_ok")] == 1
    assert samples[series("faceattend_edge_health_dropped")] == 0
    assert samples[series("faceattend_edge_uptime_s")] == 12.25
    assert samples[series("faceattend_edge_connected")] == 1
    assert samples[series("faceattend_edge_gallery_version")] == 4
    assert samples[series("faceattend_edge_latency_detect_p95_ms")] == 11.0
    assert samples[series("faceattend_edge_outbox_last_error_info", value='disk "full"\nretrying')] == 1
    # per camera: one family, a `camera` label
    assert samples[series("faceattend_edge_camera_fps", camera="front door")] == 12.5
    assert samples[series("faceattend_edge_camera_fps", camera="back")] == 0.0
    assert samples[series("faceattend_edge_camera_state_info", camera="back", value="streaming")] == 1
    assert samples[series("faceattend_edge_camera_frames_total", camera="front door")] == 900
    assert types["faceattend_edge_camera_frames_total"] == "counter"
    assert types["faceattend_edge_camera_fps"] == "gauge"
    # counters of the agent's components
    assert samples[series("faceattend_edge_status_published_total")] == 5
    assert samples[series("faceattend_edge_events_acked_total")] == 7
    assert types["faceattend_edge_status_published_total"] == "counter"

    _, _, again = fetch(server.url)
    assert parse_exposition(again)[0][series("faceattend_edge_metrics_scrapes_total")] == 2


def test_dotted_keys_and_groups_at_any_depth(serve):
    # the worker's WorkerStats.to_dict() style: flat dotted keys
    def health() -> dict[str, Any]:
        return {
            "worker": {
                "fps": 10.0,
                "camera.front.fps": 9.5,
                "camera.front.frames_total": 30,
                "rejected.blurry": 2,
                "samples_rejected": 2,
            },
            "cameras": {"cam.1": {"fps": 4}},  # nested: the camera name is taken whole
        }

    samples, types = parse_exposition(fetch(serve(health).url)[2])
    assert samples[series("faceattend_edge_worker_fps")] == 10.0
    assert samples[series("faceattend_edge_worker_camera_fps", camera="front")] == 9.5
    assert samples[series("faceattend_edge_worker_camera_frames_total", camera="front")] == 30
    assert types["faceattend_edge_worker_camera_frames_total"] == "counter"
    assert samples[series("faceattend_edge_worker_rejected", reason="blurry")] == 2
    assert samples[series("faceattend_edge_worker_samples_rejected")] == 2
    assert samples[series("faceattend_edge_camera_fps", camera="cam.1")] == 4


def test_bad_health_values_never_break_the_page(serve):
    def health() -> dict[Any, Any]:
        return {
            "nan": float("nan"),
            "inf": -math.inf,
            "huge": 2**80,
            "none": None,
            "list": [1, 2, 3],
            "object": object(),
            7: "int key",
            "": 1,
            "a-b": 1,
            "a_b": 2,  # the same series once sanitised: the first wins
            "deep": {"a": {"b": {"c": 1}}},
            "cameras": {"x": 1, 'we"ird\\': {"fps": 3}},
            "many": {f"k{i}": i for i in range(300)},  # past the entry limit: the rest is dropped
        }

    server = serve(health)
    code, _, text = fetch(server.url)
    assert code == 200
    samples, _ = parse_exposition(text)
    names = {name for name, _ in samples}
    assert not any(n.split("faceattend_edge_")[1] in ("nan", "inf", "huge", "none", "list", "object") for n in names)
    assert samples[series("faceattend_edge_7_info", value="int key")] == 1
    assert samples[series("faceattend_edge_a_b")] == 1
    assert samples[series("faceattend_edge_camera", camera="x")] == 1
    assert samples[series("faceattend_edge_camera_fps", camera='we"ird\\')] == 3
    assert "faceattend_edge_deep_a_b_c" not in names
    dropped = samples[series("faceattend_edge_health_dropped")]
    assert dropped >= 9  # nan, inf, huge, list, object, "", a_b, deep.a.b + everything past 256 entries
    assert len([n for n in names if n.startswith("faceattend_edge_many_")]) < 256


@pytest.mark.parametrize("bad", [RuntimeError("boom"), ["not", "a", "mapping"]])
def test_a_failing_health_callable_is_counted_and_logged_once(serve, caplog, bad):
    def health() -> Any:
        if isinstance(bad, Exception):
            raise bad
        return bad

    server = serve(health, counters=lambda: 1 / 0)  # a broken counters callable too
    for _ in range(3):
        code, _, text = fetch(server.url)
        assert code == 200
    samples, _ = parse_exposition(text)
    assert samples[series("faceattend_edge_health_ok")] == 0
    assert samples[series("faceattend_edge_metrics_health_errors_total")] == 3
    assert samples[series("faceattend_edge_metrics_scrapes_total")] == 3
    errors = [r for r in caplog.records if r.name == "edge_agent.health.metrics" and r.levelname == "ERROR"]
    assert len(errors) == 2  # one for health(), one for counters(), not one per scrape


def test_other_paths_and_concurrent_scrapes(serve):
    server = serve(good_health)
    base = server.url.removesuffix("/metrics")
    assert fetch(base + "/")[0] == 200
    assert fetch(base + "/nope")[0] == 404
    assert fetch(server.url + "?x=1")[0] == 200
    results: list[int] = []

    def scrape() -> None:
        results.append(fetch(server.url)[0])

    threads = [threading.Thread(target=scrape) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * 16


def test_disabled_by_default_and_stop_frees_the_port():
    off = MetricsServer(MetricsConfig(), good_health)
    off.start()
    assert off.url is None and off.port is None
    off.stop()

    on = MetricsServer(MetricsConfig(enabled=True, port=0), good_health)
    on.start()
    port = on.port
    assert port
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        MetricsServer(MetricsConfig(enabled=True, port=port), good_health).start()  # in use
    on.stop()
    again = MetricsServer(MetricsConfig(enabled=True, port=port), good_health)
    again.start()
    try:
        assert fetch(again.url)[0] == 200
    finally:
        again.stop()


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"enabled": "yes"}, "metrics.enabled"),
        ({"host": ""}, "metrics.host"),
        ({"port": 70000}, "metrics.port"),
        ({"port": True}, "metrics.port"),
    ],
)
def test_metrics_config_names_the_bad_key(fields, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        MetricsConfig(**fields)


def test_bad_label_names_are_refused():
    with pytest.raises(ConfigError, match="label name"):
        MetricsServer(MetricsConfig(), good_health, info={"device-id": "x"})


def test_metric_names_are_sanitised():
    assert metric_name("cameras", "front door", "fps/s") == "faceattend_edge_cameras_front_door_fps_s"


# ---- health cleaning (edge_agent/health/status.py), shared by the status and the endpoint ----


def test_clean_health_fits_the_status_contract():
    tree = {
        "f": 0.000123456789,
        "big": 123456.789,
        "ts": 1_712_345_678.123456,
        "np": np.float64(2.5),
        "flag": np.bool_(True),
        "state": State.STREAMING,
        "cam": CameraStats(fps=1.0, state=State.STREAMING, frames_total=2),
        "long": "y" * 300,
        "k" * 70: 1,
        "nan": float("nan"),
        "none": None,
        "deep": {"a": {"b": {"c": 1}}},
        "many": {str(i): i for i in range(400)},
    }
    cleaned = clean_health(tree)
    h = cleaned.tree
    assert h["f"] == 0.000123457 and h["big"] == 123456.789 and h["ts"] == 1_712_345_678.123
    assert h["np"] == 2.5 and h["flag"] is True and h["state"] == "streaming"
    assert h["cam"] == {"fps": 1.0, "state": "streaming", "frames_total": 2}
    assert len(h["long"]) == limits.MAX_HEALTH_STR_CHARS and ("k" * limits.MAX_HEALTH_KEY_CHARS) in h
    assert "nan" not in h and "none" not in h and h["deep"] == {"a": {}}
    assert cleaned.truncated == 2 and cleaned.dropped > 150
    # the contract's own check accepts it
    EdgeStatus("online", "door-1", "hq", "0.1.0", None, "fp", "2026-01-01T00:00:00Z", h)


def test_clean_health_never_raises_on_odd_input():
    class Broken(dict):
        def items(self):  # type: ignore[override]
            raise RuntimeError("broken mapping")

    assert clean_health({"a": Broken(), "b": 1}).tree == {"b": 1}
    assert clean_health({None: 1, (1, 2): 2, 3.5: 3}).tree == {"3.5": 3}


def test_status_config_names_the_bad_key():
    for fields, key in [
        ({"interval_s": 0}, "status.interval_s"),
        ({"interval_s": float("nan")}, "status.interval_s"),
        ({"min_interval_s": 60.0, "interval_s": 30.0}, "status.min_interval_s"),
        ({"stop_timeout_s": "5"}, "status.stop_timeout_s"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            StatusConfig(**fields)
    assert StatusConfig().interval_s == 30.0


def test_status_ids_are_checked_at_construction():
    with pytest.raises(ConfigError, match="device"):
        offline_will("door/1", "hq", "0.1.0", "fp")

    class NoLink:
        def add_connection_listener(self, listener: Any) -> None:
            pass

    with pytest.raises(ConfigError, match="agent_version"):
        StatusReporter(NoLink(), "door-1", "hq", "v" * 100, "fp")  # type: ignore[arg-type]
    will = offline_will("door-1", "hq", "0.1.0", "fp", gallery_version=2)
    status = EdgeStatus.from_json(will.payload)
    assert (will.topic, will.qos, will.retain) == ("faceattend/v1/edge/door-1/status", 1, True)
    assert (status.state, status.gallery_version, dict(status.health)) == ("offline", 2, {})


# ---- latency EMA ----


def test_latency_ema_skips_warmup_and_tracks_percentiles():
    ema = LatencyEma(alpha=0.5, warmup=2, window=100)
    assert ema.figures() == {"count": 0}
    for sample in (5.0, 4.0):  # warm-up: a TensorRT engine load, say
        ema.add(sample)
    assert ema.count == 0 and ema.ema_s is None
    ema.add(0.010)
    assert ema.ema_s == pytest.approx(0.010)  # starts at the first sample, no bias towards zero
    ema.add(0.020)
    assert ema.ema_s == pytest.approx(0.015)
    for i in range(98):
        ema.add(0.001 * (i + 1))
    assert ema.count == 100
    assert ema.percentile(50) == pytest.approx(float(np.percentile(list(ema._recent), 50)))
    assert ema.percentile(95) == pytest.approx(float(np.percentile(list(ema._recent), 95)))
    ema.add(float("nan"))
    ema.add(-1.0)
    figures = ema.figures()
    assert figures["count"] == 100 and figures["rejected"] == 2
    assert set(figures) == {"count", "ema_ms", "p50_ms", "p95_ms", "max_ms", "rejected"}
    assert figures["max_ms"] == 98.0
    ema.reset()
    assert ema.figures() == {"count": 0}


def test_latency_ema_without_window_and_timer():
    ema = LatencyEma(alpha=0.2)
    with ema.time():
        pass
    with pytest.raises(ValueError), ema.time():
        raise ValueError("not counted")
    snap = ema.snapshot()
    assert snap.count == 1 and snap.p50_s is None and snap.max_s is not None and snap.ema_s >= 0
    for bad in ({"alpha": 0}, {"alpha": 1.5}, {"warmup": -1}, {"window": 10**6}):
        with pytest.raises(ConfigError, match="latency"):
            LatencyEma(**bad)
