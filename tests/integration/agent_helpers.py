"""Helpers for tests/integration/test_agent_e2e.py (not a test module).

- `Server`: the enrollment server as its own processes, driven through its CLI (`init`, `import`, `enroll`,
  `remove`, `publish`) and `serve` (waited for on /healthz), with its SQLite store readable by the test.
- `Tap`: an MQTT subscriber that keeps every delivery (duplicates and retained replays included).
- The people of the scenarios (the shipped `edge_agent/devtools/demo_people`) and the videos rendered from them.
- `edge_config`: an edge agent's configuration, as a mapping (for `config_from_dict`) or a YAML file (for
  `edge-agent run`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import yaml
from conftest import FAST_RECONNECT, free_port
from mjpeg import MjpegServer
from waiting import wait_until

from edge_agent.devtools.demo import DEMO_PEOPLE
from edge_agent.devtools.videogen import Appearance, GroundTruth, VideoSpec, generate_video, plan_appearances
from enrollment_server.store import Store, StoredEvent
from models.contract.events import AttendanceEvent
from models.contract.mqtt_link import InboundMessage, MqttConfig, PahoMqttLink

TOKEN = "agent-e2e-admin-token-0123456789"
SERVER_START_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 180.0


def photos(person: str) -> tuple[Path, ...]:
    return tuple(sorted(p for p in (DEMO_PEOPLE / person).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")))


def enrollment_photos(person: str) -> tuple[Path, ...]:
    """Every photo but the last: the last one is what the camera shows (recognition on an unseen photo)."""
    return photos(person)[:-1]


def shown_photo(person: str) -> Path:
    return photos(person)[-1]


def stage(folder: Path, people: Iterable[str], prefix: str = "") -> Path:
    """An import folder: one sub-folder per person, named `prefix + person` (the folder name is the person id),
    holding the person's enrolment photos."""
    for person in people:
        (folder / f"{prefix}{person}").mkdir(parents=True, exist_ok=True)
        for photo in enrollment_photos(person):
            shutil.copyfile(photo, folder / f"{prefix}{person}" / photo.name)
    return folder


# --- videos -------------------------------------------------------------------------------------------------------


def door_walk_ins(shown: Sequence[str], strangers: Sequence[str], *, seed: int) -> tuple[Appearance, ...]:
    """Everyone once, in groups side by side: `shown` people on their held-out photo, strangers on their only one."""
    return plan_appearances(
        {p: photos(p) for p in (*shown, *strangers)},
        enrolled=shown,
        strangers=strangers,
        enrollment_photos={p: enrollment_photos(p) for p in shown},
        seed=seed,
        appearance_s=2.0,
        gap_s=1.0,
    )


def side_by_side(people: Sequence[str], appearance_s: float = 2.0) -> tuple[Appearance, ...]:
    """`people` (at most 3) walk up side by side, each on their held-out photo."""
    return tuple(
        Appearance(p, shown_photo(p), 0.5 + 0.2 * i, 0.5 + 0.2 * i + appearance_s, True, i, len(people))
        for i, p in enumerate(people)
    )


def repeated(appearances: Sequence[Appearance], times: int, gap_s: float = 1.0) -> tuple[Appearance, ...]:
    """The same walk-ins again after the last one left (the same people coming back)."""
    period = max(a.end_s for a in appearances) + gap_s
    return tuple(
        replace(a, start_s=round(a.start_s + k * period, 3), end_s=round(a.end_s + k * period, 3))
        for k in range(times)
        for a in appearances
    )


def render(out: Path, appearances: Sequence[Appearance], *, seed: int) -> GroundTruth:
    """640 x 480 at 15 fps, the video generator's defaults."""
    return generate_video(VideoSpec(tuple(appearances), seed=seed), out)


# --- the enrollment server ------------------------------------------------------------------------------------------


class Server:
    """`extra`: more server.yaml sections (merged over the ones written here)."""

    def __init__(self, root: Path, broker_url: str, site: str, extra: Mapping[str, Any] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.site = site
        self.db = root / "server.db"
        self.key = root / "keys" / "gallery.pem"
        self.public_key = root / "keys" / "gallery.pub.pem"
        self.port = free_port()
        self.config = root / "server.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "site": site,
                    "database": {"url": str(self.db)},
                    "mqtt": {"url": broker_url, "client_id": f"e2e-server-{self.port}"},
                    "gallery": {"signing_key": str(self.key)},
                    "api": {"host": "127.0.0.1", "port": self.port},
                    **(extra or {}),
                }
            )
        )
        self.log = root / "server.log"
        self.env = {**os.environ, "FACEATTEND_ADMIN_TOKEN": TOKEN}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        self._store: Store | None = None

    # CLI commands (each its own process, as an admin runs them)
    def cli(self, *args: str, ok: Sequence[int] = (0,)) -> list[dict[str, Any]]:
        cmd = [sys.executable, "-m", "enrollment_server.cli", "-c", str(self.config), *args]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
        assert r.returncode in ok, f"{' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
        out = []
        for line in r.stdout.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def start(self) -> None:
        cmd = [sys.executable, "-m", "enrollment_server.cli", "-c", str(self.config), "serve"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        assert wait_until(self._healthy, timeout=SERVER_START_TIMEOUT_S, interval=0.2), self.log_tail()

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log_tail()
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict[str, Any]:
        return self.http.get("/healthz").json()["components"]

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        self.http.close()
        if self._store is not None:
            self._store.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # what the server stored
    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.db)
        return self._store

    def events(self, device: str) -> list[StoredEvent]:
        return self.store.events(device_id=device)

    def latest_version(self, site: str) -> int:
        latest = self.store.latest_gallery_version(site)
        return 0 if latest is None else latest.version


# --- MQTT -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.monotonic() when received


class Tap:
    """Subscribes to `filters` and keeps every delivery. `start()` returns once the subscriptions are in place (a
    probe message published after them came back), so nothing published afterwards can be missed."""

    def __init__(self, url: str, *filters: str) -> None:
        self._probe = f"faceattend-test/probe/{uuid.uuid4().hex}"
        self._link = PahoMqttLink(
            MqttConfig.from_url(url, client_id=f"e2e-tap-{uuid.uuid4().hex[:12]}", **FAST_RECONNECT)
        )
        self._lock = threading.Lock()
        self._got: list[Delivery] = []
        self._probed = threading.Event()
        for f in filters:
            self._link.subscribe(f, 1, self._on)
        self._link.subscribe(self._probe, 1, lambda _msg: self._probed.set())

    def _on(self, msg: InboundMessage) -> None:
        with self._lock:
            self._got.append(Delivery(msg.topic, msg.payload, msg.retain, time.monotonic()))

    def start(self, timeout: float = 15.0) -> Tap:
        self._link.start()
        assert self._link.wait_connected(timeout), "tap: no connection to the broker"
        # the link reports the connection before its on-connect SUBSCRIBE is sent: a probe published at once may
        # reach the broker first and go nowhere, so probe until one comes back (then every filter, subscribed in the
        # same SUBSCRIBE packet before it, is in place)
        deadline = time.monotonic() + timeout
        while not self._probed.is_set():
            assert time.monotonic() < deadline, "tap: the probe did not come back"
            self._link.publish(self._probe, b"probe", qos=1)
            self._probed.wait(0.2)
        return self

    def stop(self) -> None:
        self._link.stop()

    def deliveries(self, topic: str | None = None) -> list[Delivery]:
        with self._lock:
            return [d for d in self._got if topic is None or d.topic == topic]

    def events(self, topic: str | None = None) -> list[AttendanceEvent]:
        """Every event delivery, in arrival order (an event delivered twice is in the list twice)."""
        return [AttendanceEvent.from_json(d.payload) for d in self.deliveries(topic)]


# --- the edge agent's configuration ---------------------------------------------------------------------------------


def edge_config(
    *,
    device: str,
    site: str,
    state_dir: Path,
    broker_url: str,
    public_key: Path,
    cameras: Sequence[Mapping[str, Any]],
    window_s: float = 300.0,
    unknown_events: bool = False,
    **sections: Any,
) -> dict[str, Any]:
    return {
        "device_id": device,
        "site": site,
        "state_dir": str(state_dir),
        "mqtt": {"url": broker_url},
        "gallery": {"public_key": str(public_key)},
        "cameras": [dict(c) for c in cameras],
        "attendance": {"window_s": window_s, "unknown_events": unknown_events},
        "snapshots": {"mode": "face"},
        **sections,
    }


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


# --- a network camera -----------------------------------------------------------------------------------------------


def video_camera(video: Path, fps: float = 15.0) -> MjpegServer:
    """A network camera streaming the frames of a video file, looped at `fps`."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    jpegs: list[bytes] = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        jpegs.append(cv2.imencode(".jpg", image)[1].tobytes())
    cap.release()
    assert jpegs, f"no frames in {video}"
    return MjpegServer(lambda i: jpegs[i % len(jpegs)], period=1.0 / fps, path="/door.mjpg")
