"""The local demo: broker, enrollment server, enrollment, a door-camera video, an edge agent and a consumer.

Everything runs on this machine with embedded defaults: an in-process MQTT broker (or Mosquitto when a URL is
given), the enrollment server as its own process on SQLite (driven through its CLI: the edge never imports the
server), the edge agent in this process, and an MQTT consumer that prints each attendance event as it arrives.

People: one folder of photos per person. Whoever has two or more photos is enrolled from all but one of them and
walks past the camera with the one held back (recognition is tested on an unseen photo); whoever has one photo is
a stranger who walks past without being enrolled. With `--video`, everyone is enrolled from every photo and the
video is the user's own; its ground truth, when a `.truth.json` lies beside it, is checked as for a generated one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from models.contract import topics
from models.contract.events import AttendanceEvent
from models.contract.mqtt_link import InboundMessage, MqttConfig, PahoMqttLink
from models.decision.rules import DecisionRule
from models.errors import ConfigError, ContractError, FaceAttendError

if TYPE_CHECKING:
    from edge_agent.devtools.videogen import GroundTruth

log = logging.getLogger(__name__)

DEMO_PEOPLE = Path(__file__).with_name("demo_people")
SITE = "demo"
DEVICE = "door-1"
CAMERA = "entrance"
SERVER_START_TIMEOUT_S = 60.0
GALLERY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 30.0


class DemoError(FaceAttendError):
    """A step of the demo failed (server would not start, no gallery arrived, bad people folder)."""


@dataclass(frozen=True)
class DemoOptions:
    people: Path = DEMO_PEOPLE
    video: Path | None = None
    broker: str | None = None  # an mqtt:// URL (e.g. a local Mosquitto); None = the embedded broker
    json: bool = False
    workdir: Path | None = None  # None = a temporary folder, removed at the end
    seed: int = 0
    window_s: float = 300.0
    unknown_events: bool = True
    stay: bool = False  # after the video, keep the server (and its web console) and the agent up until Ctrl-C


@dataclass(frozen=True)
class DoorSetup:
    """One run at the door: who is enrolled (from which photos), the video, and the edge's settings."""

    enrolled: Mapping[str, tuple[Path, ...]]
    video: Path
    window_s: float = 300.0
    unknown_events: bool = True
    # read the file at its own rate, as a camera delivers (False: every frame, however slow, on the video's clock)
    realtime: bool = True
    decision: DecisionRule | None = None  # None: the edge's default
    import_options: tuple[str, ...] = ()  # for `enrollment-server import`
    site: str = SITE  # another site per run keeps runs on one broker apart (the gallery is retained per site)
    device_id: str = DEVICE
    enrollment: Mapping[str, Any] | None = None  # the server config's `enrollment` section (None: its defaults)
    share_unknown: bool = False  # the site opts in: doors send unknown visitors' faces to the server's console
    # person -> photos offered in turn while the server refuses the person's photo (an admin told why takes another)
    spare_photos: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class DoorRun:
    """What a door run leaves besides the events: the server's verdict on every enrollment photo, the agent's
    worker figures."""

    enrollment: tuple[dict[str, Any], ...]  # `enrollment-server import` output, one JSON object per photo
    frames: int
    frames_dropped: int


@dataclass(frozen=True)
class PeoplePlan:
    enrolled: dict[str, tuple[Path, ...]]  # person -> enrollment photos
    shown: dict[str, Path]  # person -> the photo that walks past the camera (enrolled: held back)
    strangers: tuple[str, ...]


@dataclass
class DemoResult:
    events: list[AttendanceEvent] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # event ts -> received by the consumer
    expected: dict[str, int] = field(default_factory=dict)  # person -> events the ground truth expects
    strangers: tuple[str, ...] = ()
    ok: bool = True
    problems: list[str] = field(default_factory=list)


def plan_people(people: dict[str, tuple[Path, ...]], *, all_enrolled: bool) -> PeoplePlan:
    if all_enrolled:
        return PeoplePlan(dict(people), {}, ())
    enrolled = {p: photos[:-1] for p, photos in people.items() if len(photos) >= 2}
    if not enrolled:
        raise ConfigError(
            "--people: nobody has two photos; people are enrolled from all but one photo and shown with the other"
        )
    shown = {p: photos[-1] for p, photos in people.items()}
    strangers = tuple(sorted(p for p, photos in people.items() if len(photos) == 1))
    return PeoplePlan(enrolled, shown, strangers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """The enrollment server driven through its own CLI, in its own processes, with its own config file."""

    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        site: str = SITE,
        enrollment: Mapping[str, Any] | None = None,
        *,
        share_unknown: bool = False,
    ) -> None:
        self.workdir = workdir
        self.config = workdir / "server.yaml"
        self.public_key = workdir / "keys" / "gallery-signing.pub.pem"
        self.log_path = workdir / "server.log"
        self.token = secrets.token_urlsafe(24)  # printed by the demo: the console's sign-in
        self._env = os.environ | {"FACEATTEND_ADMIN_TOKEN": self.token}
        self._proc: subprocess.Popen[bytes] | None = None
        self.api_port = free_port()
        import yaml

        config: dict[str, Any] = {
            "site": site,
            "database": {"url": str(workdir / "server.db")},
            # 3.1.1: the embedded broker speaks nothing else
            "mqtt": {"url": broker_url, "client_id": "demo-enrollment-server", "protocol": "3.1.1"},
            "gallery": {"signing_key": str(workdir / "keys" / "gallery-signing.pem")},
            "api": {"host": "127.0.0.1", "port": self.api_port},
        }
        if share_unknown:  # the site's doors send the faces of unknown visitors to the console
            config["unknown_visitors"] = {"sites": [site]}
        if enrollment is not None:
            config["enrollment"] = dict(enrollment)  # the server's own strict loader checks it
        self.config.write_text(yaml.safe_dump(config), encoding="utf-8")

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/console"

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "enrollment_server.cli", "-c", str(self.config), *args]

    def run(self, *args: str, show_progress: bool = False) -> str:
        """One CLI command to completion; its JSON lines on stdout are returned."""
        proc = subprocess.run(
            self._command(*args),
            cwd=self.workdir,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=None if show_progress else subprocess.PIPE,
            check=False,
        )
        out = proc.stdout.decode("utf-8", "replace")
        if proc.returncode not in (0, 1):  # 1: some photos were rejected (reported per photo), the rest enrolled
            err = proc.stderr.decode("utf-8", "replace").strip() if proc.stderr else ""
            raise DemoError(f"enrollment-server {args[0]} failed (exit {proc.returncode}): {err or out.strip()}")
        return out

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                self._command("serve"), cwd=self.workdir, env=self._env, stdout=log_file, stderr=log_file
            )

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise DemoError(f"the enrollment server exited with {self._proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class Consumer:
    """What a team's program does: subscribe to every edge's events, de-duplicate on event_id, print."""

    def __init__(self, broker_url: str, on_event: Callable[[AttendanceEvent, float], None]) -> None:
        self._link = PahoMqttLink(MqttConfig.from_url(broker_url, client_id=f"demo-consumer-{os.getpid()}"))
        self._on_event = on_event
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def start(self, timeout: float = 15.0) -> None:
        self._link.subscribe(topics.ALL_EDGE_EVENTS, 1, self._handle)
        self._link.start()
        if not self._link.wait_connected(timeout):
            raise DemoError(f"the consumer could not reach the broker within {timeout:.0f} s")

    def stop(self) -> None:
        self._link.stop()

    def _handle(self, msg: InboundMessage) -> None:
        received = time.time()
        try:
            event = AttendanceEvent.from_json(msg.payload)
        except ContractError as exc:
            log.warning("consumer: rejected a payload on %s: %s", msg.topic, exc)
            return
        with self._lock:
            if event.event_id in self._seen:
                return
            self._seen.add(event.event_id)
        self._on_event(event, received)


@contextmanager
def workdir_for(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    tmp = Path(tempfile.mkdtemp(prefix="faceattend-demo-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def broker_url_for(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from edge_agent.devtools.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.url


def _import(
    server: ServerProcess,
    enrolled: Mapping[str, tuple[Path, ...]],
    folder: Path,
    options: Sequence[str],
    show_progress: bool,
) -> tuple[dict[str, Any], ...]:
    """`enrollment-server import` of these people's photos (staged in `folder`): its verdict on each photo."""
    for person, photos in enrolled.items():
        (folder / person).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            shutil.copyfile(photo, folder / person / photo.name)
    printed = server.run("import", str(folder), "--no-publish", *options, show_progress=show_progress)
    return tuple(
        line for line in (json.loads(x) for x in printed.splitlines() if x.startswith("{")) if "summary" not in line
    )


def make_video(
    plan: PeoplePlan, out: Path, seed: int, say: Callable[[str], None] = lambda _: None, **spec_options: Any
) -> GroundTruth:
    """The plan's people walking past a door camera (enrolled people on their held-back photo), with a progress bar;
    `spec_options`: VideoSpec's frame size and rate."""
    from tqdm import tqdm

    from edge_agent.devtools.videogen import VideoSpec, generate_video, plan_appearances

    people = {p: (*plan.enrolled.get(p, ()), photo) for p, photo in plan.shown.items()}
    appearances = plan_appearances(
        people,
        enrolled=sorted(plan.enrolled),
        strangers=plan.strangers,
        enrollment_photos=plan.enrolled,
        seed=seed,
    )
    spec = VideoSpec(appearances, seed=seed, **spec_options)
    say(f"generating a {spec.frame_count / spec.fps:.0f} s door-camera video of {len(appearances)} walk-ins")
    with tqdm(total=spec.frame_count, unit="frame", desc="video", file=sys.stderr) as bar:
        return generate_video(spec, out, progress=bar.update)


def _expected_events(video: Path, window_s: float) -> dict[str, int] | None:
    """person -> attendance events the ground truth calls for (one per window), None without ground truth."""
    from edge_agent.devtools.videogen import GroundTruth, truth_path

    path = truth_path(video)
    if not path.is_file():
        return None
    truth = GroundTruth.load(path)
    expected: dict[str, int] = {}
    last: dict[str, float] = {}
    for a in sorted(truth.appearances, key=lambda a: a.start_s):
        if not a.enrolled:
            continue
        if a.person not in last or a.start_s - last[a.person] >= window_s:
            expected[a.person] = expected.get(a.person, 0) + 1
            last[a.person] = a.start_s
    for a in truth.appearances:
        expected.setdefault(a.person, 0)
    return expected


def _edge_config(workdir: Path, broker_url: str, public_key: Path, setup: DoorSetup) -> Any:
    from edge_agent.config import config_from_dict

    data: dict[str, Any] = {
        "device_id": setup.device_id,
        "site": setup.site,
        "state_dir": str(workdir / "edge"),
        "mqtt": {"url": broker_url},
        "gallery": {"public_key": str(public_key)},
        "cameras": [{"name": CAMERA, "source": str(setup.video), "realtime": setup.realtime}],
        "attendance": {"window_s": setup.window_s, "unknown_events": setup.unknown_events},
        "snapshots": {"mode": "face"},
        "unknown_faces": {"share": setup.share_unknown},
    }
    if not setup.realtime:  # every frame, however slow: tracks then run on the video's clock, not this machine's
        data["worker"] = {"clock": "media"}
    enrollment = setup.enrollment or {}
    if "encoder" in enrollment:  # the door runs the server's encoder, as provisioning configures it
        data["models"] = {k: enrollment[k] for k in ("encoder", "accept_licence") if k in enrollment}
    if setup.decision is not None:
        data["decision"] = setup.decision.to_dict()
    return config_from_dict(data, workdir)


def _format_event(event: AttendanceEvent, latency_s: float) -> str:
    who = f"{event.name or event.person_id} ({event.person_id})" if event.person_id else "unknown visitor"
    distance = "-" if event.distance is None else f"{event.distance:.3f}"
    return (
        f"{event.ts}  {event.device_id}/{event.camera}  track {event.track_id:<3d}  {who:<36s} "
        f"distance {distance}  seq {event.seq}  (+{latency_s * 1000:.0f} ms)"
    )


def run_door(
    setup: DoorSetup,
    workdir: Path,
    broker_url: str,
    on_event: Callable[[AttendanceEvent, float], None],
    say: Callable[[str], None] = lambda _: None,
    *,
    show_progress: bool = True,
    on_agent: Callable[[Any], None] | None = None,
    tick: Callable[[], None] | None = None,
    on_server: Callable[[ServerProcess], None] | None = None,
    stay: bool = False,
) -> DoorRun:
    """The enrollment server (its own process, driven through its CLI) enrolls `setup.enrolled` and publishes the
    gallery; an edge agent takes it and watches `setup.video`; a consumer hands each event it receives to
    `on_event(event, received_at)`. `on_agent(agent)` runs once the gallery is in service, before the camera
    starts (to observe the agent); `tick()` about five times a second while the video plays; `on_server(server)` once
    the server serves (its console is up); `stay`: after the video, keep everything up until Ctrl-C."""
    from edge_agent.agent import EdgeAgent

    server = ServerProcess(workdir, broker_url, setup.site, setup.enrollment, share_unknown=setup.share_unknown)
    server.run("init")
    say(f"enrolling {len(setup.enrolled)} people ({sum(map(len, setup.enrolled.values()))} photos)")
    enrollment = _import(server, setup.enrolled, workdir / "enroll", setup.import_options, show_progress)
    for attempt in range(max(map(len, setup.spare_photos.values()), default=0)):
        taken = {line["person_id"] for line in enrollment if line.get("accepted")}
        retry = {
            person: (spares[attempt],)
            for person, spares in setup.spare_photos.items()
            if person in setup.enrolled and person not in taken and len(spares) > attempt
        }
        if not retry:
            break
        say(f"{len(retry)} people refused: another photo of each")
        folder = workdir / f"enroll-{attempt + 2}"
        enrollment += _import(server, retry, folder, setup.import_options, show_progress)
    consumer = Consumer(broker_url, on_event)
    consumer.start()
    server.start()
    if on_server is not None:
        on_server(server)
    agent = EdgeAgent(_edge_config(workdir, broker_url, server.public_key, setup))
    try:
        agent.start()
        deadline = time.monotonic() + GALLERY_TIMEOUT_S
        while agent.gallery_version() is None:
            server.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"no gallery reached the edge within {GALLERY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        if on_agent is not None:
            on_agent(agent)
        say(f"gallery version {agent.gallery_version()} in service; the camera starts")
        agent.start_cameras()
        while not agent.cameras_finished(0.2):
            server.check_alive()
            if tick is not None:
                tick()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while agent.outbox_depth() > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the last confirmed events are on their way to the consumer
        stats = agent.worker.stats()
        if stay:
            _stay(server, say)
    finally:
        agent.stop()
        consumer.stop()
        server.stop()
    return DoorRun(enrollment, stats.frames, stats.frames_dropped)


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    from edge_agent.devtools.videogen import load_people

    def say(text: str) -> None:
        if not options.json:
            print(f"== {text}", file=out, flush=True)

    result = DemoResult()
    people = load_people(options.people)
    plan = plan_people(people, all_enrolled=options.video is not None)
    result.strangers = plan.strangers
    lock = threading.Lock()

    def on_event(event: AttendanceEvent, received: float) -> None:
        from datetime import datetime

        latency = max(0.0, received - datetime.fromisoformat(event.ts.replace("Z", "+00:00")).timestamp())
        with lock:
            result.events.append(event)
            result.latencies_s.append(latency)
            line = event.to_json().decode("utf-8") if options.json else _format_event(event, latency)
            print(line, file=out, flush=True)

    with workdir_for(options.workdir) as workdir, broker_url_for(options.broker) as broker_url:
        say(f"broker {broker_url}; working folder {workdir}")
        video = options.video
        if video is None:
            video = workdir / "door.avi"
            make_video(plan, video, options.seed, say)
        expected = _expected_events(video, options.window_s)
        setup = DoorSetup(
            plan.enrolled,
            video,
            window_s=options.window_s,
            unknown_events=options.unknown_events,
            share_unknown=True,  # the demo site opted in: its strangers appear on the console's Unknown visitors page
        )

        def console(server: ServerProcess) -> None:
            # the console's address and token, on stderr in --json mode (stdout stays one event per line)
            print(
                f"== web console: {server.console_url} (sign in with the admin token {server.token})",
                file=sys.stderr if options.json else out,
                flush=True,
            )

        run_door(
            setup,
            workdir,
            broker_url,
            on_event,
            say,
            show_progress=not options.json,
            on_server=console,
            stay=options.stay,
        )
    _check(result, expected)
    _summary(result, options, out)
    return result


def _stay(server: ServerProcess, say: Callable[[str], None]) -> None:
    say(f"the video is over; the console stays up at {server.console_url} until Ctrl-C")
    try:
        while True:
            server.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("stopping")


def _check(result: DemoResult, expected: dict[str, int] | None) -> None:
    if expected is None:
        return
    result.expected = expected
    got: dict[str, int] = {}
    for e in result.events:
        if e.person_id is not None:
            got[e.person_id] = got.get(e.person_id, 0) + 1
    for person in sorted(set(expected) | set(got)):
        want, have = expected.get(person, 0), got.get(person, 0)
        if want != have:
            kind = "a stranger" if person in result.strangers else "enrolled"
            result.problems.append(f"{person} ({kind}): expected {want} event(s), got {have}")
    result.ok = not result.problems


def _summary(result: DemoResult, options: DemoOptions, out: TextIO) -> None:
    import numpy as np

    known = [e for e in result.events if e.person_id is not None]
    lat = np.asarray(result.latencies_s) * 1000 if result.latencies_s else np.zeros(1)
    summary = {
        "events": len(result.events),
        "recognised": len(known),
        "unknown": len(result.events) - len(known),
        "people": sorted({e.person_id for e in known if e.person_id}),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p95": round(float(np.percentile(lat, 95)), 1)},
        "checked_against_ground_truth": bool(result.expected),
        "ok": result.ok,
        "problems": result.problems,
    }
    if options.json:
        print(json.dumps({"summary": summary}), file=out, flush=True)
        return
    print("== summary", file=out)
    print(
        f"   {summary['events']} events: {summary['recognised']} recognised ({', '.join(summary['people']) or '-'}), "
        f"{summary['unknown']} unknown visitors",
        file=out,
    )
    print(
        f"   event ts -> consumer: p50 {summary['latency_ms']['p50']} ms, p95 {summary['latency_ms']['p95']} ms",
        file=out,
    )
    if result.expected:
        verdict = "every enrolled person once, no stranger recognised" if result.ok else "; ".join(result.problems)
        print(f"   ground truth: {verdict}", file=out, flush=True)
