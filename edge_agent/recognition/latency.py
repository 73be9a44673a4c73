"""A running latency figure for health and metrics: an exponential moving average, with warm-up samples left out
and optional percentiles over a window of recent samples.

    detect = LatencyEma(alpha=0.1, warmup=3, window=256)
    with detect.time():
        run_detector(frame)
    health["latency"] = {"detect": detect.figures()}  # {"count": ..., "ema_ms": ..., "p50_ms": ..., "p95_ms": ...}

- The first `warmup` samples are ignored: the first inferences of a backend (TensorRT engine deserialisation, CUDA
  context, ONNX Runtime arena growth) take many times the steady-state figure and would dominate an EMA for a
  long while.
- The EMA starts at the first counted sample (no bias towards zero) and then moves by `alpha` of each difference:
  about the last 2 / alpha samples weigh in.
- With `window` > 0 the last `window` samples are kept and `percentile(q)` interpolates linearly between the two
  nearest ranks (numpy's default); `figures()` then reports p50 and p95. Without a window there are no
  percentiles (None).
- Non-finite or negative samples (a clock that stepped, a bug upstream) are counted in `rejected`, never
  averaged.

Thread-safe: a worker adds samples while the status reporter or a metrics scrape reads the figures.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from models.errors import ConfigError

MAX_WINDOW = 65_536


@dataclass(frozen=True)
class LatencySnapshot:
    count: int  # samples counted (warm-up and rejected ones excluded)
    ema_s: float | None  # None before the first counted sample
    p50_s: float | None  # None without a window or before any sample
    p95_s: float | None
    max_s: float | None  # largest counted sample in the window (over everything without a window)
    rejected: int


class LatencyEma:
    def __init__(self, alpha: float = 0.1, *, warmup: int = 0, window: int = 0) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ConfigError(f"latency: alpha must be in (0, 1], got {alpha!r}")
        for name, value, top in (("warmup", warmup, None), ("window", window, MAX_WINDOW)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (top is not None and value > top):
                limit = f"in [0, {top}]" if top is not None else ">= 0"
                raise ConfigError(f"latency: {name} must be an integer {limit}, got {value!r}")
        self.alpha = float(alpha)
        self.warmup = warmup
        self.window = window
        self._lock = threading.Lock()
        self._seen = 0  # warm-up included
        self._count = 0
        self._rejected = 0
        self._ema: float | None = None
        self._max: float | None = None
        self._recent: deque[float] = deque(maxlen=window or None)

    def add(self, seconds: float) -> None:
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            raise TypeError(f"latency sample must be a number of seconds, got {type(seconds).__name__}")
        with self._lock:
            if not math.isfinite(seconds) or seconds < 0:
                self._rejected += 1
                return
            self._seen += 1
            if self._seen <= self.warmup:
                return
            self._count += 1
            value = float(seconds)
            self._ema = value if self._ema is None else self._ema + self.alpha * (value - self._ema)
            if self.window:
                self._recent.append(value)
            elif self._max is None or value > self._max:
                self._max = value

    @contextmanager
    def time(self) -> Iterator[None]:
        """Measure the block with `time.perf_counter()`; a block that raises is not counted."""
        start = time.perf_counter()
        yield
        self.add(time.perf_counter() - start)

    def reset(self) -> None:
        """Forget everything, warm-up included (e.g. after a backend was rebuilt)."""
        with self._lock:
            self._seen = self._count = self._rejected = 0
            self._ema = self._max = None
            self._recent.clear()

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def ema_s(self) -> float | None:
        with self._lock:
            return self._ema

    def percentile(self, q: float) -> float | None:
        """q in [0, 100]; None without a window or before any counted sample."""
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {q!r}")
        with self._lock:
            values = sorted(self._recent)
        return _interpolated(values, q)

    def snapshot(self) -> LatencySnapshot:
        with self._lock:
            values = sorted(self._recent)
            ema, count, rejected, top = self._ema, self._count, self._rejected, self._max
        if self.window:
            top = values[-1] if values else None
        return LatencySnapshot(
            count=count,
            ema_s=ema,
            p50_s=_interpolated(values, 50),
            p95_s=_interpolated(values, 95),
            max_s=top,
            rejected=rejected,
        )

    def figures(self) -> dict[str, float | int]:
        """For a health tree: `count`, and in milliseconds (3 decimals) `ema_ms`, `p50_ms`, `p95_ms`, `max_ms`
        where known (absent, not null: the status contract has no null figures)."""
        snap = self.snapshot()
        out: dict[str, float | int] = {"count": snap.count}
        for key, value in (
            ("ema_ms", snap.ema_s),
            ("p50_ms", snap.p50_s),
            ("p95_ms", snap.p95_s),
            ("max_ms", snap.max_s),
        ):
            if value is not None:
                out[key] = round(value * 1000.0, 3)
        if snap.rejected:
            out["rejected"] = snap.rejected
        return out


def _interpolated(values: list[float], q: float) -> float | None:
    if not values:
        return None
    pos = (len(values) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)
