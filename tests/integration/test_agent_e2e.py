"""The edge agent end to end: a real Mosquitto, the enrollment server as its own processes (`init`, `import`, `enroll`,
`remove`, `publish` through its CLI, `serve` for ingest and gallery publication), the edge agent with the real models
on rendered door-camera videos, and MQTT subscribers watching the wire.

People are the shipped demo photos (edge_agent/devtools/demo_people): an enrolled person walks past the camera on a
photo the gallery never saw. Site `hq` has four people enrolled; Alex Lacamoire (enrolled nowhere) and two strangers
walk past too. Site `lab` holds a copy of Barack Obama (`lab-Barack_Obama`) and is the one whose gallery the tests
change (late enrolment, removal, forgeries), so `hq` stays as it is for the others. Each test has its own device id, so
the events each stored at the server are its own.

The scenarios print their key figures (visible with -s): events, duplicates on the wire and at the server, times
to recover. Waiting is on conditions, with generous timeouts; nothing is asserted about speed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_helpers import (
    Tap,
    door_walk_ins,
    edge_config,
    enrollment_photos,
    render,
    repeated,
    side_by_side,
    stage,
    video_camera,
    write_config,
)
from conftest import MosquittoBroker, mosquitto_binary
from server_process import Server
from storedb import Db
from waiting import wait_until

from edge_agent.agent import EdgeAgent
from edge_agent.capture import CameraState
from edge_agent.config import config_from_dict
from edge_agent.delivery.outbox import Outbox
from edge_agent.devtools.videogen import GroundTruth
from edge_agent.gallery.index import SAVED_FILE, GalleryStore
from enrollment_server.store import AttendanceEvent
from models.contract import topics
from models.contract.gallery import Gallery, GalleryPerson, build_publication, signed_bytes
from models.contract.signing import Signer, Verifier
from models.contract.status import EdgeStatus, GalleryAck
from models.contract.unknown_face import UnknownFace
from models.imageio import load_image

HQ = "hq"
LAB = "lab"
HQ_ENROLLED = ("Barack_Obama", "Elon_Musk", "Jack_Dorsey", "Mark_Zuckerberg")
HQ_UNENROLLED = ("Alex_Lacamoire", "Jeff_Bezos", "Sundar_Pichai")  # Alex has photos but is enrolled nowhere
LAB_PREFIX = "lab-"
LAB_CONTROL = "lab-Barack_Obama"  # enrolled at lab from the start
LAB_LATE = "lab-Jack_Dorsey"  # enrolled (and removed) while an agent runs
SEED = 2

GALLERY_TIMEOUT_S = 60.0
VIDEO_TIMEOUT_S = 240.0
DELIVERY_TIMEOUT_S = 60.0
# the agent reconnects with paho's backoff (1 s doubling up to 30 s): after an outage of a few seconds it is back
# within about as long again
RECONNECT_TIMEOUT_S = 90.0


# --- the world: broker, server, videos ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Video:
    path: Path
    truth: GroundTruth = dataclasses.field(repr=False)

    @property
    def frames(self) -> int:
        return self.truth.frame_count


@dataclasses.dataclass(frozen=True)
class World:
    broker: MosquittoBroker
    server: Server
    once: Video  # everyone at hq's door once
    twice: Video  # the same walk-ins twice in a row (within an attendance window)
    clip: Video  # Barack Obama and Jack Dorsey side by side, a few seconds


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, module_db: Db) -> Iterator[MosquittoBroker]:
    """The broker of one database's run of this module (a fresh one per database, so no retained status of the
    other run leaks in): tests may stop and restart it (each leaves it running; see `broker_running`)."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary (apt install mosquitto, or set FACEATTEND_MOSQUITTO)")
    b = MosquittoBroker(tmp_path_factory.mktemp("broker"), binary)
    b.start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def broker_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that failed while the broker was stopped or frozen must not take the next ones down with it."""
    yield
    if "broker" not in request.fixturenames:
        return
    b: MosquittoBroker = request.getfixturevalue("broker")
    if b.running:
        signal_broker(b, signal.SIGCONT)  # harmless unless a failed test left it frozen
    else:
        b.start()


def signal_broker(b: MosquittoBroker, sig: int) -> None:
    """SIGSTOP: the broker freezes with its connections open (publishes are sent, never acknowledged); SIGCONT."""
    proc = b._proc  # the fixture's handle; it has no pause of its own
    assert proc is not None and proc.poll() is None
    os.kill(proc.pid, sig)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, module_db: Db) -> Iterator[World]:
    """The server process on each database it supports (every test of the module runs against both)."""
    root = tmp_path_factory.mktemp(f"e2e-{module_db.backend}")
    started = time.monotonic()
    server = Server(root / "server", broker.url, HQ, database=module_db.url)
    try:
        server.cli("init")
        for site, people, prefix in ((HQ, HQ_ENROLLED, ""), (LAB, ["Barack_Obama"], LAB_PREFIX)):
            folder = stage(root / f"enroll-{site}", people, prefix)
            out = server.cli("import", str(folder), "--site", site, "--no-publish", "--quiet")
            summary = next(o["summary"] for o in out if "summary" in o)
            assert summary["people_created"] == len(people) and summary["rejected"] == 0, out
        server.start()  # publishes both sites' galleries (v1) as it connects
        walk_ins = door_walk_ins([*HQ_ENROLLED, "Alex_Lacamoire"], ["Jeff_Bezos", "Sundar_Pichai"], seed=SEED)
        videos = root / "videos"
        once = Video(videos / "once.avi", render(videos / "once.avi", walk_ins, seed=SEED))
        twice = Video(videos / "twice.avi", render(videos / "twice.avi", repeated(walk_ins, 2), seed=SEED))
        clip_people = side_by_side(["Barack_Obama", "Jack_Dorsey"])
        clip = Video(videos / "clip.avi", render(videos / "clip.avi", clip_people, seed=SEED))
        print(
            f"\n[e2e setup, {module_db.backend}] server initialised, {len(HQ_ENROLLED)} + 1 people imported, serving; "
            f"videos {once.frames} / {twice.frames} / {clip.frames} frames; {time.monotonic() - started:.1f} s"
        )
        yield World(broker, server, once, twice, clip)
    finally:
        server.stop()


# --- per-test helpers -----------------------------------------------------------------------------------------------


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], EdgeAgent]]:
    """`agents(config)`: an EdgeAgent in this process, started (cameras not yet); stopped at the end of the test."""
    started: list[EdgeAgent] = []

    def start(config: dict[str, Any]) -> EdgeAgent:
        agent = EdgeAgent(config_from_dict(config, tmp_path))
        started.append(agent)
        agent.start()
        return agent

    yield start
    for agent in reversed(started):
        agent.stop()


@pytest.fixture
def taps(broker: MosquittoBroker) -> Iterator[Callable[..., Tap]]:
    made: list[Tap] = []

    def make(*filters: str) -> Tap:
        tap = Tap(broker.url, *filters)
        made.append(tap)
        return tap.start()

    yield make
    for tap in made:
        tap.stop()


def agent_config(world: World, tmp_path: Path, device: str, site: str, cameras: Sequence[dict], **kw: Any) -> dict:
    return edge_config(
        device=device,
        site=site,
        state_dir=tmp_path / device,
        broker_url=world.broker.url,
        public_key=world.server.public_key,
        cameras=cameras,
        **kw,
    )


def file_camera(name: str, source: Path, **kw: Any) -> dict[str, Any]:
    return {"name": name, "source": str(source), "realtime": False, **kw}


def pending_camera(name: str, source: Path) -> dict[str, Any]:
    """A file camera whose file does not exist yet: it retries (quickly) until the test puts the video there."""
    return file_camera(name, source, reconnect_min_s=0.2, reconnect_max_s=0.5)


def show(video: Video, at: Path) -> None:
    """Put a video where a pending camera looks for it, in one rename (the camera never opens half a file)."""
    partial = at.with_name(f".{at.name}.partial{at.suffix}")
    shutil.copyfile(video.path, partial)
    os.replace(partial, at)


def quiescent(health: dict[str, Any]) -> bool:
    """No live track, and every decision the worker made has been through the attendance gate: suppressed, or
    its event in the outbox (works on `agent.health()` and on the health figures of a status message)."""
    p, gate, events = health["pipeline"], health["attendance"], health["events"]
    decided = p["decisions_known_total"] + p["decisions_unknown_total"]
    handled = gate["suppressed_repeat"] + gate["suppressed_unknown"] + events["stored_total"] + events["refused_total"]
    return p["tracks_live"] == 0 and decided == handled


def camera_done(agent: EdgeAgent, camera: str, video: Video) -> bool:
    figures = agent.worker.stats().cameras[camera]
    return figures.state == CameraState.ENDED.value and figures.frames >= video.frames and quiescent(agent.health())


def delivered(world: World, agent: EdgeAgent, device: str) -> list[AttendanceEvent]:
    """Once the agent is quiescent: wait until its outbox is empty and the server stored every event it made."""
    assert wait_until(lambda: quiescent(agent.health()), timeout=30.0)
    assert wait_until(lambda: agent.outbox_depth() == 0, timeout=DELIVERY_TIMEOUT_S), agent.health()["publisher"]
    made = agent.health()["events"]["stored_total"]
    assert wait_until(lambda: len(world.server.events(device)) >= made, timeout=DELIVERY_TIMEOUT_S), (
        made,
        world.server.health(),
    )
    return [s.event for s in world.server.events(device)]


def camera_events(world: World, agent: EdgeAgent, device: str, camera: str, video: Video) -> list[AttendanceEvent]:
    assert wait_until(lambda: camera_done(agent, camera, video), timeout=VIDEO_TIMEOUT_S), agent.worker.stats()
    return [e for e in delivered(world, agent, device) if e.camera == camera]


def wait_gallery(agent: EdgeAgent, version: int | None = None) -> int:
    def ready() -> bool:
        v = agent.gallery_version()
        return v is not None and (version is None or v == version)

    assert wait_until(ready, timeout=GALLERY_TIMEOUT_S), (agent.gallery_version(), version, agent.sync.status())
    v = agent.gallery_version()
    assert v is not None
    return v


def gallery_version_of(cli_output: list[dict]) -> int:
    return int(next(o["gallery"]["version"] for o in cli_output if "gallery" in o))


def utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def ids(events: Sequence[AttendanceEvent]) -> list[str | None]:
    return [e.person_id for e in events]


def check_seqs(events: Sequence[AttendanceEvent]) -> None:
    """Per-device seqs: each once, gap-free from 0 (the outbox's counter, kept across restarts)."""
    assert sorted(e.seq for e in events) == list(range(len(events))), sorted(e.seq for e in events)


def wire_duplicates(tap: Tap, topic: str | None = None) -> int:
    wire = tap.events(topic)
    return len(wire) - len({e.event_id for e in wire})


def server_duplicates(world: World, device: str) -> int:
    return sum(s.duplicates for s in world.server.events(device))


# --- 1. events per person per window ------------------------------------------------------------------------------


def test_each_enrolled_person_gives_one_event_per_window_and_unenrolled_people_unknown_ones(
    world: World, agents, taps, tmp_path: Path
) -> None:
    device = "door-events"
    tap = taps(topics.edge_events(device))
    config = agent_config(
        world, tmp_path, device, HQ, [file_camera("entrance", world.twice.path)], window_s=300.0, unknown_events=True
    )
    agent = agents(config)
    version = wait_gallery(agent)
    started = time.monotonic()
    agent.start_cameras()
    assert agent.cameras_finished(VIDEO_TIMEOUT_S)
    events = delivered(world, agent, device)
    elapsed = time.monotonic() - started

    # at the server: everyone enrolled exactly once although each walked in twice, nobody else recognised
    known = [e for e in events if e.person_id is not None]
    unknown = [e for e in events if e.person_id is None]
    assert Counter(ids(known)) == Counter(HQ_ENROLLED), ids(events)
    for e in known:
        assert e.name == e.person_id.replace("_", " ")
        assert e.distance is not None and e.distance <= e.threshold and e.margin is not None
    # each unenrolled walk-in gives an unknown event (a track split may give one more); none has a name
    assert 2 * len(HQ_UNENROLLED) <= len(unknown) <= 2 * len(HQ_UNENROLLED) + 4, ids(events)
    assert all(e.name is None for e in unknown)
    for e in events:
        assert (e.device_id, e.site_id, e.camera, e.gallery_version) == (device, HQ, "entrance", version)
        assert e.fingerprint == agent.pipeline.fingerprint and e.snapshot
    check_seqs(events)
    gate = agent.health()["attendance"]
    assert gate["suppressed_repeat"] >= len(HQ_ENROLLED)  # the second walk-ins, within the window

    # at a subscriber: the same events
    stored_ids = {e.event_id for e in events}
    assert wait_until(lambda: {e.event_id for e in tap.events()} == stored_ids, timeout=15.0)
    print(
        f"\n[events] {world.twice.frames} frames in {elapsed:.1f} s: {len(known)} recognised "
        f"({', '.join(sorted(ids(known)))}), {len(unknown)} unknown, {gate['suppressed_repeat']} repeats suppressed "
        f"within the window; subscriber got {len(tap.events())} deliveries ({wire_duplicates(tap)} duplicates), "
        f"server stored {len(events)} ({server_duplicates(world, device)} duplicates)"
    )


# --- 2. the gallery changes while the agent runs ------------------------------------------------------------------


def test_a_person_enrolled_while_the_agent_runs_is_recognised_and_a_removed_one_is_forgotten(
    world: World, agents, taps, tmp_path: Path
) -> None:
    device = "door-lab"
    server = world.server
    acks = taps(topics.gallery_ack(device))
    later = {name: tmp_path / f"{name}.avi" for name in ("after-enroll", "after-remove")}
    cameras = [file_camera("before", world.clip.path), *(pending_camera(n, p) for n, p in later.items())]
    agent = agents(agent_config(world, tmp_path, device, LAB, cameras, unknown_events=True))
    v0 = wait_gallery(agent)
    agent.start_cameras()

    before = camera_events(world, agent, device, "before", world.clip)
    assert LAB_CONTROL in ids(before) and None in ids(before) and LAB_LATE not in ids(before), ids(before)

    # enrolled through the server's CLI while the agent runs: a new version, applied without a restart
    t0 = time.monotonic()
    out = server.cli(
        "enroll", "--person-id", LAB_LATE, "--name", "Jack Dorsey", "--site", LAB,
        *map(str, enrollment_photos("Jack_Dorsey")),
    )  # fmt: skip
    v1 = gallery_version_of(out)
    assert v1 > v0
    wait_gallery(agent, v1)
    enroll_to_applied = time.monotonic() - t0
    late_vectors = [t.embedding for t in server.store.list_templates(person_id=LAB_LATE)]
    assert late_vectors
    show(world.clip, later["after-enroll"])
    after_enroll = [e for e in camera_events(world, agent, device, "after-enroll", world.clip) if e.person_id]
    assert sorted(ids(after_enroll)) == sorted([LAB_CONTROL, LAB_LATE]), ids(after_enroll)
    jack = next(e for e in after_enroll if e.person_id == LAB_LATE)
    assert (jack.name, jack.gallery_version) == ("Jack Dorsey", v1)

    # removed: a rebuilt gallery without him, in service and on disk; the server sees the edge applied it
    t0 = time.monotonic()
    v2 = gallery_version_of(server.cli("remove", LAB_LATE))
    assert v2 > v1
    wait_gallery(agent, v2)
    remove_to_applied = time.monotonic() - t0
    index = agent.holder.current
    assert index is not None and LAB_LATE not in index.labels and LAB_CONTROL in index.labels
    # the version is swapped in first, then saved, then acknowledged: once acknowledged it is on disk
    assert wait_until(ack_of(acks, device, v2, "ok"), timeout=30.0), acks.deliveries()
    saved_dir = agent.cfg.gallery_dir
    assert sorted(os.listdir(saved_dir)) == [SAVED_FILE]
    data = (saved_dir / SAVED_FILE).read_bytes()
    assert LAB_LATE.encode() not in data and b"Jack Dorsey" not in data and LAB_CONTROL.encode() in data
    assert not any(np.asarray(v, dtype=np.float32).tobytes() in data for v in late_vectors)
    saved = GalleryStore(saved_dir, Verifier.from_pem_file(server.public_key), agent.pipeline.fingerprint, LAB).load()
    assert saved is not None and saved.version == v2 and [p.person_id for p in saved.people] == [LAB_CONTROL]

    def server_shows_applied() -> bool:
        return any(d.device_id == device and d.gallery_version == v2 for d in server.store.list_devices(LAB))

    assert wait_until(server_shows_applied, timeout=30.0)

    show(world.clip, later["after-remove"])
    after_remove = camera_events(world, agent, device, "after-remove", world.clip)
    assert LAB_CONTROL in ids(after_remove) and None in ids(after_remove), ids(after_remove)
    assert LAB_LATE not in ids(after_remove)
    assert all(e.gallery_version == v2 for e in after_remove)
    print(
        f"\n[gallery changes] v{v0} -> enroll -> v{v1} in service {enroll_to_applied:.1f} s after the CLI started, "
        f"{LAB_LATE} recognised (distance {jack.distance:.3f}); remove -> v{v2} in service {remove_to_applied:.1f} s "
        f"after; then unknown; saved gallery {len(data)} bytes without him"
    )


# --- 3a. broker outage --------------------------------------------------------------------------------------------


def test_events_made_during_a_broker_outage_all_reach_the_server_once(
    world: World, broker: MosquittoBroker, agents, tmp_path: Path
) -> None:
    device = "door-outage"
    # at the file's own pace, like a camera: the walk-ins after the first are still to come when the broker stops
    config = agent_config(world, tmp_path, device, HQ, [file_camera("entrance", world.once.path, realtime=True)])
    agent = agents(config)  # unknown_events off: unenrolled people give no event at all
    wait_gallery(agent)
    agent.start_cameras()
    assert wait_until(lambda: len(world.server.events(device)) >= 1, timeout=VIDEO_TIMEOUT_S)
    before = len(world.server.events(device))
    broker.stop()
    down_at = time.monotonic()
    assert agent.cameras_finished(VIDEO_TIMEOUT_S)
    assert wait_until(lambda: quiescent(agent.health()), timeout=30.0)
    held = agent.outbox_depth()
    assert held >= 1, "no event was made during the outage"
    health = agent.health()
    made = health["events"]["stored_total"]
    assert not health["mqtt_connected"]
    # what is waiting shows in the status figures and the metrics: depth and the oldest unconfirmed event's age
    assert health["outbox"]["depth"] == held and health["outbox"]["oldest_unconfirmed_age_s"] > 0
    page = agent.metrics.render()
    assert f"faceattend_edge_outbox_depth {held}" in page and "faceattend_edge_outbox_oldest_unconfirmed_age_s " in page

    broker.start()
    up_at = time.monotonic()
    assert wait_until(lambda: agent.outbox_depth() == 0, timeout=RECONNECT_TIMEOUT_S), agent.health()["publisher"]
    drained_s = time.monotonic() - up_at
    assert wait_until(lambda: len(world.server.events(device)) >= made, timeout=RECONNECT_TIMEOUT_S)
    stored_s = time.monotonic() - up_at
    events = [s.event for s in world.server.events(device)]
    assert len(events) == made
    assert Counter(ids(events)) == Counter(HQ_ENROLLED), ids(events)  # once each, no unknown
    check_seqs(events)
    print(
        f"\n[broker outage] {before} event(s) before the broker stopped, {held} made during the "
        f"{up_at - down_at:.1f} s outage (held in the outbox); after the restart: outbox empty in {drained_s:.1f} s, "
        f"all {made} stored at the server in {stored_s:.1f} s, {server_duplicates(world, device)} duplicates counted"
    )


# --- 3b + 4. kill -9 of the agent process; the retained status ----------------------------------------------------

EVENT_LINE = re.compile(r"edge_agent\.agent: event (\S+) seq (\d+):")


def logged_events(log: Path) -> list[tuple[str, int]]:
    """(event_id, seq) of each event the agent logged as stored in its outbox."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [(m.group(1), int(m.group(2))) for m in EVENT_LINE.finditer(text)]


def statuses(tap: Tap, device: str) -> list[EdgeStatus]:
    return [EdgeStatus.from_json(d.payload) for d in tap.deliveries(topics.edge_status(device))]


def retained_status(broker: MosquittoBroker, device: str) -> EdgeStatus:
    """What a consumer that subscribes now is told (the retained message)."""
    tap = Tap(broker.url, topics.edge_status(device)).start()
    try:
        assert wait_until(lambda: bool(statuses(tap, device)), timeout=10.0)
        got = tap.deliveries()
        assert got[0].retain
        return EdgeStatus.from_json(got[0].payload)
    finally:
        tap.stop()


def ack_of(tap: Tap, device: str, version: int, status: str, prefix: str = "") -> Callable[[], GalleryAck | None]:
    """A predicate for wait_until: the device's first ack of `version` with `status` (and an error that starts
    with `prefix`) the tap received, else None."""

    def find() -> GalleryAck | None:
        for d in tap.deliveries(topics.gallery_ack(device)):
            ack = GalleryAck.from_json(d.payload)
            if ack.version == version and ack.status == status and (ack.error or "").startswith(prefix):
                return ack
        return None

    return find


def registry_state(world: World, device: str) -> str | None:
    """The device's state in the server's device registry (fed by the retained statuses and the last will)."""
    return next((d.state for d in world.server.store.list_devices(HQ) if d.device_id == device), None)


def transitions(states: Iterable[str]) -> list[str]:
    out: list[str] = []
    for state in states:
        if not out or out[-1] != state:
            out.append(state)
    return out


def edge_agent_command() -> list[str]:
    script = Path(sys.executable).with_name("edge-agent")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edge_agent.cli"]


def test_an_agent_killed_with_sigkill_and_restarted_loses_no_event_and_the_status_tells(
    world: World, broker: MosquittoBroker, taps, tmp_path: Path
) -> None:
    device = "door-kill"
    topic = topics.edge_events(device)
    config = agent_config(
        world,
        tmp_path,
        device,
        HQ,
        [file_camera("entrance", world.once.path, realtime=True)],  # the later walk-ins come after the freeze
        unknown_events=True,
        status={"interval_s": 1.0, "min_interval_s": 0.5},
    )
    path = write_config(tmp_path / "edge.yaml", config)
    tap = taps(topic, topics.edge_status(device))
    logs = [tmp_path / "run-1.log", tmp_path / "run-2.log"]
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen([*edge_agent_command(), "run", str(path)], stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    def last_state() -> str | None:
        got = statuses(tap, device)
        return got[-1].state if got else None

    try:
        # run 1: events flowing; the broker freezes (no PUBACK), a few more go into the outbox; kill -9
        first = spawn(logs[0])
        assert wait_until(lambda: last_state() == "online", timeout=60.0), logs[0].read_text()[-3000:]
        assert wait_until(lambda: len(world.server.events(device)) >= 1, timeout=VIDEO_TIMEOUT_S)
        signal_broker(broker, signal.SIGSTOP)
        try:
            frozen_at = len(logged_events(logs[0]))
            assert wait_until(lambda: len(logged_events(logs[0])) >= frozen_at + 2, timeout=VIDEO_TIMEOUT_S)
            first.send_signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
        finally:
            signal_broker(broker, signal.SIGCONT)
        killed_at = time.monotonic()
        run1 = logged_events(logs[0])
        unacked = run1[frozen_at:]

        # the broker publishes the last will: `offline`, retained
        assert wait_until(lambda: last_state() == "offline", timeout=30.0), [s.state for s in statuses(tap, device)]
        will_s = time.monotonic() - killed_at
        assert retained_status(broker, device).state == "offline"
        assert wait_until(lambda: registry_state(world, device) == "offline", timeout=15.0)

        # run 2, same config and state: resends what run 1 left, plays the video again, then SIGTERM
        second = spawn(logs[1])
        restarted_at = time.monotonic()

        def run2_quiet() -> bool:
            got = [s for s in statuses(tap, device) if s.state == "online"]
            if not got or not logged_events(logs[1]):
                return False
            h = got[-1].health
            p = h["pipeline"]
            read = sum(p.get(f"camera.entrance.{k}_total", 0) for k in ("frames", "dropped", "skipped"))
            return read >= world.once.frames and quiescent(h) and h["outbox"]["depth"] == 0

        assert wait_until(run2_quiet, timeout=VIDEO_TIMEOUT_S), logs[1].read_text()[-3000:]
        run2_s = time.monotonic() - restarted_at
        online = [s for s in statuses(tap, device) if s.state == "online"][-1]
        health = online.health
        assert online.gallery_version == world.server.latest_version(HQ)
        assert health["pipeline"]["fps"] > 0 and health["pipeline"]["frames_total"] > 0
        assert health["outbox"]["depth"] == 0 and health["gallery"]["version"] == online.gallery_version
        assert health["outbox"]["awaiting_confirmation"] == 0 and health["outbox"]["oldest_unconfirmed_age_s"] == 0
        assert health["publisher"]["confirmed"] >= 1 and health["publisher"]["confirm_by"] == "server"
        assert health["mqtt_connected"] is True
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, logs[1].read_text()[-3000:]
        assert wait_until(lambda: last_state() == "stopped", timeout=15.0)
        assert retained_status(broker, device).state == "stopped"
        assert transitions(s.state for s in statuses(tap, device)) == ["online", "offline", "online", "stopped"]
        assert wait_until(lambda: registry_state(world, device) == "stopped", timeout=15.0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    run2 = logged_events(logs[1])
    logged = run1 + run2
    assert run2 and min(s for _, s in run2) > max(s for _, s in run1)  # the seq goes on across the restart
    outbox = Outbox.open(tmp_path / device / "outbox.db")
    try:
        assert outbox.depth() == 0
    finally:
        outbox.close()
    # every event either run stored in its outbox is at the server, once; the seqs have no gap and no repeat
    assert wait_until(lambda: {i for i, _ in logged} <= {s.event.event_id for s in world.server.events(device)}, 30)
    stored = world.server.events(device)
    events = [s.event for s in stored]
    check_seqs(events)
    assert {e.event_id: e.seq for e in events}.items() >= dict(logged).items()
    assert {e.event_id for e in events} >= {i for i, _ in unacked}
    # one event at most can have been stored in run 1's outbox and not yet logged when the kill came
    assert len(events) <= len(logged) + 1
    wire = tap.events(topic)
    print(
        f"\n[kill -9] run 1 logged {len(run1)} events, {len(unacked)} of them while the broker was frozen "
        f"(no PUBACK) before SIGKILL; `offline` will {will_s:.1f} s after the kill; run 2 (started, resent, "
        f"played the video, outbox empty in {run2_s:.1f} s) logged {len(run2)} more (seq {run2[0][1]}..{run2[-1][1]}); "
        f"server stored "
        f"{len(events)} (seq 0..{len(events) - 1}, no gap), counted {sum(s.duplicates for s in stored)} duplicate "
        f"deliveries; the subscriber saw {len(wire)} deliveries, {wire_duplicates(tap, topic)} duplicates; statuses "
        f"{' -> '.join(transitions(s.state for s in statuses(tap, device)))}; "
        f"run 2 status: fps {health['pipeline']['fps']:.1f}, outbox {health['outbox']['depth']}, "
        f"gallery v{online.gallery_version}"
    )


# --- 3c. forged galleries ---------------------------------------------------------------------------------------


def test_forged_tampered_and_foreign_galleries_are_refused_and_recognition_goes_on(
    world: World, agents, taps, mqtt_links, tmp_path: Path
) -> None:
    device = "door-forge"
    server = world.server
    acks = taps(topics.gallery_ack(device))
    later = tmp_path / "after-forgeries.avi"
    agent = agents(agent_config(world, tmp_path, device, LAB, [pending_camera("door", later)], unknown_events=True))
    v = wait_gallery(agent)
    assert wait_until(ack_of(acks, device, v, "ok"), timeout=30.0)  # saved (then acknowledged): safe to read
    agent.start_cameras()  # its file is not there yet
    fp = agent.pipeline.fingerprint
    genuine = GalleryStore(agent.cfg.gallery_dir, Verifier.from_pem_file(server.public_key), fp, LAB).load()
    assert genuine is not None and genuine.version == v and LAB_CONTROL in [p.person_id for p in genuine.people]
    # the attack: the control person's vectors relabelled as somebody else, in a "newer" version
    people = tuple(GalleryPerson("mallory", "Mallory") if p.person_id == LAB_CONTROL else p for p in genuine.people)

    def fake(fingerprint: str = fp) -> Gallery:
        g = genuine
        # the release right after the genuine one: what an attacker claims to be applied
        return Gallery(LAB, v + 1, fingerprint, g.metric, g.dtype, g.embeddings, g.labels, people, epoch=g.epoch)

    real_key = Signer.load(server.key)
    rogue = mqtt_links(world.broker)

    def publish(items: list[tuple[str, bytes]]) -> None:
        for topic, payload in items:
            assert rogue.publish(topic, payload, qos=1, retain=True).wait(10.0)

    def still_genuine() -> None:
        index = agent.holder.current
        assert index is not None and index.version == v
        assert LAB_CONTROL in index.labels and "mallory" not in index.labels

    # 1. forged: signed by an attacker's key that claims to be the server's (one chunk: its chunks must not fit
    #    the genuinely signed manifest of step 2, or they would complete it)
    attacker = Signer.generate()
    manifest, chunks = build_publication(fake(), attacker)
    assert len(chunks) == 1
    draft = dataclasses.replace(manifest, key_id=real_key.key_id, signature="")
    forged = dataclasses.replace(draft, signature=attacker.sign_b64(signed_bytes(draft.to_object())))
    publish([(topics.gallery_blob(LAB, i), c) for i, c in enumerate(chunks)])
    publish([(topics.gallery_manifest(LAB), forged.to_json())])
    assert wait_until(ack_of(acks, device, v + 1, "error", "SignatureError"), timeout=30.0), acks.deliveries()
    still_genuine()

    # 2. tampered: a genuinely signed manifest, one chunk altered on the way
    manifest, chunks = build_publication(fake(), real_key, chunk_size=512)
    assert len(chunks) >= 2
    bad = bytearray(chunks[1])
    bad[10] ^= 0x01
    publish([(topics.gallery_manifest(LAB), manifest.to_json())])
    publish([(topics.gallery_blob(LAB, i), bytes(bad) if i == 1 else c) for i, c in enumerate(chunks)])
    assert wait_until(ack_of(acks, device, v + 1, "error", "IntegrityError"), timeout=30.0), acks.deliveries()
    assert "chunk 1" in ack_of(acks, device, v + 1, "error", "IntegrityError")().error
    still_genuine()

    # 3. foreign: genuinely signed, but built under another encoder (other chunk boundaries: the same bytes at the
    #    same place would be the missing chunk 1 of step 2's genuinely signed manifest, and complete it)
    manifest, chunks = build_publication(fake("another_encoder-0123456789abcdef"), real_key, chunk_size=700)
    publish([(topics.gallery_blob(LAB, i), c) for i, c in enumerate(chunks)])
    publish([(topics.gallery_manifest(LAB), manifest.to_json())])
    assert wait_until(ack_of(acks, device, v + 1, "error", "FingerprintMismatchError"), timeout=30.0)
    still_genuine()
    assert agent.sync.status().last_error
    saved = GalleryStore(agent.cfg.gallery_dir, Verifier.from_pem_file(server.public_key), fp, LAB).load()
    assert saved is not None and saved.version == v

    # the server recorded the refusals (acks are how it knows which edge runs what)
    def server_saw_refusals() -> bool:
        errors = [a for a in server.store.list_acks(device_id=device) if a.status == "error"]
        return {a.error.split(":")[0] for a in errors if a.error} >= {
            "SignatureError",
            "IntegrityError",
            "FingerprintMismatchError",
        }

    assert wait_until(server_saw_refusals, timeout=30.0), server.store.list_acks(device_id=device)

    # recognition goes on with the genuine gallery
    show(world.clip, later)
    events = camera_events(world, agent, device, "door", world.clip)
    assert LAB_CONTROL in ids(events) and "mallory" not in ids(events), ids(events)
    assert all(e.gallery_version == v for e in events)

    # and the next genuine publication (which replaces the forged retained messages) is applied
    t0 = time.monotonic()
    v_next = gallery_version_of(server.cli("publish", "--site", LAB))
    assert v_next > v
    wait_gallery(agent, v_next)
    assert "mallory" not in agent.holder.current.labels
    all_acks = [GalleryAck.from_json(d.payload) for d in acks.deliveries()]
    assert (all_acks[-1].version, all_acks[-1].status) == (v_next, "ok")
    print(
        f"\n[forged galleries] v{v + 1} forged / tampered / foreign: error acks "
        f"{[(a.version, (a.error or '').split(':')[0]) for a in all_acks if a.status == 'error']}; "
        f"v{v} stayed in service and recognised {LAB_CONTROL}; genuine v{v_next} applied "
        f"{time.monotonic() - t0:.1f} s after `publish` started"
    )


# --- 3d. the camera source goes away and comes back ----------------------------------------------------------------


def test_a_network_camera_that_disappears_is_reconnected_and_recognition_goes_on(
    world: World, agents, tmp_path: Path
) -> None:
    device = "door-mjpeg"
    camera = video_camera(world.clip.path)
    camera.start()
    try:
        cam = {"name": "door", "source": camera.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
        # window 0: every pass of the looping clip is an event, so recognition after the outage is visible
        agent = agents(agent_config(world, tmp_path, device, HQ, [cam], window_s=0.0))
        wait_gallery(agent)
        agent.start_cameras()

        def known_since(after: datetime | None = None) -> list[AttendanceEvent]:
            """Recognised people, decided after `after`."""
            return [
                s.event
                for s in world.server.events(device)
                if s.event.person_id is not None and (after is None or utc(s.event.ts) > after)
            ]

        assert wait_until(lambda: known_since() != [], timeout=VIDEO_TIMEOUT_S)

        def state() -> CameraState:
            return agent.cameras.stats()["door"].state

        camera.stop()
        lost_at = time.monotonic()
        assert wait_until(lambda: state() is CameraState.RECONNECTING, timeout=30.0)
        detected_s = time.monotonic() - lost_at
        # the tracks alive when the stream broke are decided (they age out): later events come from new frames
        assert wait_until(lambda: quiescent(agent.health()), timeout=30.0)
        assert state() is CameraState.RECONNECTING
        camera.start()  # same port
        back_wall = datetime.now(timezone.utc)
        back_at = time.monotonic()
        assert wait_until(lambda: state() is CameraState.CONNECTED, timeout=RECONNECT_TIMEOUT_S)
        connected_s = time.monotonic() - back_at
        assert wait_until(lambda: known_since(back_wall) != [], timeout=VIDEO_TIMEOUT_S)
        recognised_s = time.monotonic() - back_at
        stats = agent.cameras.stats()["door"]
        assert stats.reconnects >= 1 and camera.connections >= 2
        after = known_since(back_wall)
        assert {e.person_id for e in after} <= {"Barack_Obama", "Jack_Dorsey"}
    finally:
        camera.stop()
    print(
        f"\n[camera lost] stream stopped: camera reconnecting after {detected_s:.1f} s; stream back: connected "
        f"after {connected_s:.1f} s, {after[0].person_id} recognised {recognised_s:.1f} s after; "
        f"{stats.reconnects} reconnect(s)"
    )


# --- 5. check-config ------------------------------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*edge_agent_command(), "check-config", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_check_config_accepts_a_good_config_and_names_what_is_wrong_in_bad_ones(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    Signer.generate().save_public(tmp_path / "keys" / "gallery.pub.pem")
    good = {
        "device_id": "door-1",
        "site": HQ,
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "gallery": {"public_key": "keys/gallery.pub.pem"},  # relative to the config file's folder
        "cameras": [{"name": "front", "source": "door.avi"}],
        "attendance": {"window_s": 60},
    }
    r = check_config(write_config(tmp_path / "good.yaml", good))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and (report["device_id"], report["site"]) == ("door-1", HQ)
    assert report["cameras"] == {"front": str(tmp_path / "door.avi")} and report["attendance_window_s"] == 60

    typo = {**good, "attendance": {"window_s": 60, "windw_s": 5}}
    typo_r = check_config(write_config(tmp_path / "typo.yaml", typo))
    assert typo_r.returncode == 2, typo_r.stderr
    assert "attendance.windw_s" in typo_r.stderr and "unknown key" in typo_r.stderr and "window_s" in typo_r.stderr

    no_key = {**good, "gallery": {"public_key": "keys/missing.pem"}}
    no_key_r = check_config(write_config(tmp_path / "nokey.yaml", no_key))
    assert no_key_r.returncode == 2, no_key_r.stderr
    assert "gallery.public_key" in no_key_r.stderr and str(tmp_path / "keys" / "missing.pem") in no_key_r.stderr
    for bad in (typo_r, no_key_r):
        assert "Traceback" not in bad.stderr and not bad.stdout
    print(
        f"\n[check-config] good config: exit 0; unknown key: exit 2, {typo_r.stderr.strip()!r}; "
        f"missing public key: exit 2, {no_key_r.stderr.strip()!r}"
    )


# --- 6. unknown visitors' faces: sent only where the site shares them ----------------------------------------------


def test_unknown_visitors_faces_are_sent_only_when_the_site_shares_them(
    world: World, agents, taps, tmp_path: Path
) -> None:
    """A door with `unknown_faces.share` off (the default) publishes no face at all, whatever it sees; one with it on
    sends each unknown track's best face and embedding to the server, which stores nothing for a site that did not
    opt in (this module's server lists no site under unknown_visitors)."""
    tap = taps(topics.ALL_EDGE_UNKNOWN)
    clip = tmp_path / "alex.avi"
    render(clip, side_by_side(["Alex_Lacamoire"]), seed=SEED)  # enrolled nowhere

    def play(device: str, **sections: Any) -> EdgeAgent:
        agent = agents(agent_config(world, tmp_path, device, HQ, [file_camera("door", clip)], **sections))
        wait_gallery(agent)
        agent.start_cameras()
        assert agent.cameras_finished(VIDEO_TIMEOUT_S)
        assert wait_until(lambda: quiescent(agent.health()), timeout=30.0)
        return agent

    private = play("door-private")
    assert private.health()["pipeline"]["decisions_unknown_total"] >= 1
    assert private.unknown_faces is None and "unknown_faces" not in private.health()
    sharing = play("door-sharing", unknown_faces={"share": True})
    unknown_decisions = sharing.health()["pipeline"]["decisions_unknown_total"]
    assert unknown_decisions >= 1
    assert wait_until(lambda: sharing.health()["unknown_faces"]["acknowledged"] >= unknown_decisions, timeout=30.0)
    # the private door's run came first: had it sent anything, it would have arrived before the sharing door's faces
    got = [UnknownFace.from_json(d.payload) for d in tap.deliveries()]
    assert {f.device_id for f in got} == {"door-sharing"}, [d.topic for d in tap.deliveries()]
    assert len(got) == unknown_decisions == sharing.health()["unknown_faces"]["sent"]
    pipeline = sharing.pipeline
    for face in got:
        assert face.site == HQ and face.camera == "door" and len(face.embedding) == 128 and 0 < face.quality <= 1
        assert face.fingerprint == pipeline.fingerprint and face.gallery_version == world.server.latest_version(HQ)
        assert face.distance is None or face.distance > 0.4
        crop = load_image(face.jpeg_bytes())
        assert max(crop.shape[:2]) <= 320 and len(pipeline.embed(crop)) == 1  # the face, with its head around it
    time.sleep(1.0)
    assert world.server.store.count_unknown_faces() == 0  # this server's sites did not opt in
    print(
        f"\n[unknown faces] share off: {private.health()['pipeline']['decisions_unknown_total']} unknown decision(s), "
        f"nothing published; share on: {len(got)} face(s) sent ({sum(len(f.crop_jpeg) for f in got) // len(got)} "
        f"base64 bytes each on average), none stored by a server whose site did not opt in"
    )
