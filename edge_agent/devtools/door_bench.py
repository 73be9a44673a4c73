"""`edge-agent bench-door PEOPLE_DIR`: recognition at a door, scored against the truth, beside the peer.

Per seed, from a folder of people (one sub-folder of photos each):

1. **Plan** (`plan_door`, from the seed alone). `walk_ins` people with two or more photos walk in; each is enrolled
   from one photo and shown with a different one. `strangers` other people walk in, never enrolled, shown with one of
   their photos. The rest of the `enrolled` people are enrolled from one photo each and never appear (the gallery a
   real door holds).
2. **Video** (`edge_agent.devtools.videogen`): the walk-ins and strangers cross a door camera's view in a seeded
   order, one to three at a time (640x480, 15 fps by default), with the ground truth beside it.
3. **The real system** (`edge_agent.devtools.demo.run_door`): the enrollment server, in its own process and driven
   through its CLI, imports the enrollment photos (quality-gated; a rejected photo leaves its person out, and a
   walk-in left out can only be missed) and publishes the signed gallery over MQTT (an embedded broker, or
   `--broker`); an edge agent takes it and watches the video, by default at the video's own rate as a camera
   delivers it (frames the agent cannot keep up with are dropped, and counted); a consumer collects the events. The
   attendance window is 0 and unknown visitors are events, so every track's decision reaches the consumer.
4. **Scoring** (`edge_agent.devtools.door_score`): each event is attributed to the face it was about (the decision's
   box on its best frame against the ground truth's boxes, `edge_agent.devtools.bench.owner_of`), then each walk-in
   is correct, wrong (credited as someone else) or missed, each stranger accepted or not.
5. **The peer** (`edge_agent.devtools.door_peer`), when `face_recognition` is installed: the same video, frame by
   frame, against its own encodings of the same enrollment photos, scored by majority over each appearance's frames
   and by any frame.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from edge_agent.devtools.door_score import TABLE_HEAD, DoorScore, Verdict, Walk, score_door
from models.decision.rules import DecisionRule
from models.errors import ConfigError
from models.face.encoders import DEFAULT_ENCODER, encoder_spec

log = logging.getLogger(__name__)

OURS = "faceattend"
PEER = "face_recognition"
PEER_MODES = {"majority": "majority of frames", "any": "any frame"}
# issue 13's bar for a door: per run of 40 walk-ins and 20 strangers
TARGET = "at least 39 / 40 recognised, nobody credited as someone else, at most 1 / 20 strangers accepted"


class DoorBenchInputError(ConfigError):
    """The people folder cannot give the plan asked for, or an option is out of range."""


@dataclass(frozen=True)
class DoorBenchOptions:
    people: Path
    enrolled: int = 500
    walk_ins: int = 40
    strangers: int = 20
    seeds: tuple[int, ...] = (0,)
    broker: str | None = None  # an mqtt:// URL; None: an embedded broker
    realtime: bool = True  # False: the agent takes every frame, however long it needs
    decision: DecisionRule | None = None  # None: the edge's default
    enrollment: Mapping[str, Any] | None = None  # the enrollment server's `enrollment` section (None: defaults)
    peer: Literal["auto", "on", "off"] = "auto"
    peer_every: int = 1  # the peer processes every n-th frame
    # photos an admin offers per person, in turn, while the server refuses them (told why, as an admin is); each
    # person still ends with one template. 1: the first photo only
    enroll_tries: int = 3
    workdir: Path | None = None  # None: a temporary folder, removed
    cache: Path | None = None  # the peer's embedding cache (None: the faceattend cache)
    width: int = 640
    height: int = 480
    fps: float = 15.0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.walk_ins < 0 or self.strangers < 0 or self.walk_ins + self.strangers == 0:
            raise DoorBenchInputError("--walk-ins and --strangers: need >= 0 each and somebody walking in")
        if self.enrolled < max(1, self.walk_ins):
            raise DoorBenchInputError(f"--enrolled {self.enrolled}: must be >= 1 and >= --walk-ins ({self.walk_ins})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise DoorBenchInputError(f"seeds: need one or more distinct seeds, got {self.seeds}")
        if self.peer_every < 1:
            raise DoorBenchInputError(f"--peer-every: must be >= 1, got {self.peer_every}")
        if self.enroll_tries < 1:
            raise DoorBenchInputError(f"--enroll-tries: must be >= 1, got {self.enroll_tries}")

    @property
    def rule(self) -> DecisionRule:
        """The edge's decision: the one given, else the default of the encoder the enrollment section names."""
        return (
            self.decision or encoder_spec(str((self.enrollment or {}).get("encoder", DEFAULT_ENCODER))).default_decision
        )


# --- the plan -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoorPlan:
    seed: int
    enrolled: dict[str, tuple[Path, ...]]  # person -> the one enrollment photo (walk-ins and the never-appearing)
    walk_ins: dict[str, Path]  # person -> the photo shown (not the enrolled one)
    strangers: dict[str, Path]  # person -> the photo shown
    # person -> the photos offered next, in turn, if the server refuses the enrollment photo (never the shown one)
    spares: dict[str, tuple[Path, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "enrolled": {p: [str(x) for x in photos] for p, photos in self.enrolled.items()},
            "walk_ins": {p: str(x) for p, x in self.walk_ins.items()},
            "strangers": {p: str(x) for p, x in self.strangers.items()},
            "spares": {p: [str(x) for x in photos] for p, photos in self.spares.items()},
        }


def plan_door(
    people: Mapping[str, Sequence[Path]],
    *,
    enrolled: int,
    walk_ins: int,
    strangers: int,
    seed: int,
    enroll_tries: int = 1,
) -> DoorPlan:
    """Who is enrolled from which photo (and which are offered next if it is refused, up to `enroll_tries` photos
    in all), who walks in with which photo (see the module docstring). The draws do not depend on `enroll_tries`."""
    rng = np.random.default_rng(seed)
    multi = sorted(p for p, photos in people.items() if len(photos) >= 2)
    if walk_ins > len(multi):
        raise DoorBenchInputError(
            f"--walk-ins {walk_ins}: only {len(multi)} people have two photos (one to enroll, another to show)"
        )
    if enrolled + strangers > len(people):
        raise DoorBenchInputError(
            f"--enrolled {enrolled} + --strangers {strangers}: the people folder has {len(people)} people"
        )
    walkers = [multi[i] for i in rng.permutation(len(multi))[:walk_ins]]
    rest = sorted(set(people) - set(walkers))
    rest = [rest[i] for i in rng.permutation(len(rest))]
    strangers_chosen, others = rest[:strangers], rest[strangers : strangers + enrolled - walk_ins]

    def photos_of(person: str) -> list[Path]:
        return sorted(Path(p) for p in people[person])

    enrollment: dict[str, tuple[Path, ...]] = {}
    shown: dict[str, Path] = {}
    spares: dict[str, tuple[Path, ...]] = {}
    for person in walkers:
        photos = photos_of(person)
        pick = rng.permutation(len(photos))
        enrollment[person] = (photos[pick[0]],)
        shown[person] = photos[pick[1]]
        spares[person] = tuple(photos[i] for i in pick[2 : enroll_tries + 1])
    for person in others:
        photos = photos_of(person)
        first = int(rng.integers(len(photos)))
        enrollment[person] = (photos[first],)
        spares[person] = tuple(photos[(first + i) % len(photos)] for i in range(1, min(enroll_tries, len(photos))))
    visitors = {p: photos_of(p)[int(rng.integers(len(photos_of(p))))] for p in strangers_chosen}
    return DoorPlan(
        seed,
        dict(sorted(enrollment.items())),
        dict(sorted(shown.items())),
        dict(sorted(visitors.items())),
        {p: s for p, s in sorted(spares.items()) if s},
    )


# --- one seed -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SeedRun:
    seed: int
    plan: DoorPlan
    video: dict[str, Any]  # frames, seconds, appearances
    enrollment: dict[str, Any]  # photos, accepted, rejected (person -> reason)
    agent: dict[str, Any]  # frames processed / dropped, events received
    events: tuple[dict[str, Any], ...]  # every event with its attribution and figures
    scores: dict[str, DoorScore]  # "faceattend", "face_recognition (majority of frames)", ...
    peer: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "plan": self.plan.to_dict(),
            "video": self.video,
            "enrollment": self.enrollment,
            "agent": self.agent,
            "events": list(self.events),
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "on_enrolled_walk_ins": {k: dict(on_enrolled_walk_ins(self, k)) for k in self.scores},
            "peer": self.peer,
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True, eq=False)
class DoorBenchReport:
    options: DoorBenchOptions
    runs: tuple[SeedRun, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def totals(self) -> dict[str, DoorScore]:
        out: dict[str, DoorScore] = {}
        for run in self.runs:
            for system, score in run.scores.items():
                out[system] = out[system] + score if system in out else score
        return out

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "people": str(o.people),
            "enrolled": o.enrolled,
            "walk_ins": o.walk_ins,
            "strangers": o.strangers,
            "seeds": list(o.seeds),
            "video": {"width": o.width, "height": o.height, "fps": o.fps},
            "agent_reads": "real time (frames it cannot keep up with are dropped)" if o.realtime else "every frame",
            "decision": o.rule.to_dict(),
            "decision_is_default": o.decision is None,
            "enrollment_config": o.enrollment,
            "peer_every": o.peer_every,
            "target": TARGET,
            "totals": {k: v.counts() for k, v in self.totals().items()},
            "runs": [r.to_dict() for r in self.runs],
            "notes": list(self.notes),
        }

    def format(self) -> str:
        o = self.options
        rule = o.rule
        cap = "" if rule.max_distance is None else f", cap {rule.max_distance:g}"
        lines = [
            f"door benchmark on {o.people}: {o.enrolled} people enrolled from one photo each ({o.enrolled - o.walk_ins}"
            f" never appear), {o.walk_ins} walk in shown with another photo, {o.strangers} strangers; "
            f"{o.width}x{o.height} at {o.fps:g} fps, the agent reading "
            + ("in real time" if o.realtime else "every frame"),
            f"decision: {rule.rule} {rule.threshold:g}{cap}" + (" (the shipped default)" if o.decision is None else ""),
        ]
        if o.enrollment is not None:
            lines.append(f"the enrollment server's enrollment section: {json.dumps(o.enrollment)}")
        lines.append("")
        for run in self.runs:
            e, a, v = run.enrollment, run.agent, run.video
            refused = Counter(reason.split(":")[0] for reason in e["rejected"].values())
            enrolled = len(_enrolled_walk_ins(run))
            lines.append(
                f"seed {run.seed}: video {v['seconds']:.0f} s ({v['frames']} frames); agent {a['frames']} frames "
                f"({a['frames_dropped']} dropped), {a['events']} events"
                + (f"; peer {run.peer['frames']} frames" if run.peer else "")
            )
            lines.append(
                f"  the server's quality gate accepted {e['accepted']} of {e['photos']} enrollment photos"
                + (f", {e['another_photo']} people on another photo" if e.get("another_photo") else "")
                + (
                    f"; {len(e['rejected'])} people refused ({', '.join(f'{k} {n}' for k, n in refused.most_common())})"
                    if refused
                    else ""
                )
                + f"; {enrolled} of {run.scores[OURS].walk_ins} walk-ins enrolled"
            )
        width = max(len(s) for s in self.totals()) + 2
        lines += ["", f"{'':<9}{'':<{width}}{TABLE_HEAD}"]
        for run in self.runs:
            for system, score in run.scores.items():
                lines.append(f"{'seed ' + str(run.seed):<9}{system:<{width}}{score.line()}")
        if len(self.runs) > 1:
            for system, score in self.totals().items():
                lines.append(f"{'total':<9}{system:<{width}}{score.line()}")
        lines += ["", "on the walk-ins the server enrolled (the peer enrolls every photo: it has no quality gate):"]
        for system in self.totals():
            counts: Counter[str] = Counter()
            for run in self.runs:
                counts += on_enrolled_walk_ins(run, system)
            lines.append(
                f"  {system:<{width}}{counts['correct']} / {sum(counts.values())} correct, {counts['wrong']} wrong, "
                f"{counts['missed']} missed"
            )
        lines += ["", f"target (issue 13, per run): {TARGET}"]
        for run in self.runs:
            ours = run.scores[OURS]
            met = (
                ours.walk_ins - ours.correct <= ours.walk_ins / 40
                and ours.wrong == 0
                and ours.strangers_accepted + ours.unattributed_named <= ours.strangers / 20
            )
            lines.append(f"  seed {run.seed}: faceattend {'met' if met else 'NOT met'}")
        lines += ["", "faceattend's failures (distance, margin to the runner-up, vote share; candidate when unknown):"]
        for run in self.runs:
            lines += [f"  seed {run.seed}: {x}" for x in _failures(run)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _enrolled_walk_ins(run: SeedRun) -> set[int]:
    """The appearances of walk-ins whose enrollment photo the server accepted."""
    return {o.index for o in run.scores[OURS].outcomes if o.kind == "walk-in" and o.note is None}


def on_enrolled_walk_ins(run: SeedRun, system: str) -> Counter[str]:
    """`system`'s outcomes on the walk-ins the server enrolled (what the decision could recognise)."""
    enrolled = _enrolled_walk_ins(run)
    return Counter(o.outcome for o in run.scores[system].outcomes if o.index in enrolled)


def _failures(run: SeedRun) -> list[str]:
    by_appearance: dict[int, list[dict[str, Any]]] = {}
    for e in run.events:
        if e["appearance"] is not None:
            by_appearance.setdefault(e["appearance"], []).append(e)
    out = []
    for o in run.scores[OURS].outcomes:
        if o.outcome in ("correct", "rejected"):
            continue
        evs = by_appearance.get(o.index, [])
        what = "; ".join(_describe_event(e) for e in evs) or "no decision (no usable face sample)"
        note = f" [{o.note}]" if o.note else ""
        out.append(f"{o.outcome:<8} {o.person} ({o.kind}){note}: {what}")
    for e in run.events:
        if e["appearance"] is None:
            out.append(f"unattributed event: {_describe_event(e)}")
    return out


def _describe_event(e: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    who = e["person_id"] or f"unknown (candidate {e.get('candidate') or '-'}, {e.get('reason') or '-'})"
    return f"{who} d {f(e['distance'])} margin {f(e['margin'])} share {f(e.get('vote_share'))}"


def _video_people(plan: DoorPlan) -> tuple[dict[str, tuple[Path, ...]], dict[str, tuple[Path, ...]]]:
    """The photos videogen may choose from (exactly the planned one is not enrolled) and the enrollment photos."""
    people = {p: (*plan.enrolled[p], shown) for p, shown in plan.walk_ins.items()}
    people |= {p: (shown,) for p, shown in plan.strangers.items()}
    return people, {p: plan.enrolled[p] for p in plan.walk_ins}


def run_seed(
    options: DoorBenchOptions,
    plan: DoorPlan,
    workdir: Path,
    broker_url: str,
    peer_encodings: Mapping[str, np.ndarray | None] | None,
    say: Callable[[str], None],
) -> SeedRun:
    """Steps 2-5 of the module docstring for one seed."""
    from tqdm import tqdm

    from edge_agent.devtools.bench import AgentProbe, owner_of
    from edge_agent.devtools.demo import DoorSetup, run_door
    from edge_agent.devtools.videogen import VideoSpec, generate_video, plan_appearances
    from models.contract.events import AttendanceEvent

    started = time.monotonic()
    people, enrollment_photos = _video_people(plan)
    appearances = plan_appearances(
        people,
        enrolled=sorted(plan.walk_ins),
        strangers=sorted(plan.strangers),
        enrollment_photos=enrollment_photos,
        seed=plan.seed,
    )
    spec = VideoSpec(appearances, width=options.width, height=options.height, fps=options.fps, seed=plan.seed)
    video = workdir / "door.avi"
    say(f"seed {plan.seed}: a {spec.frame_count / spec.fps:.0f} s door video of {len(appearances)} walk-ins")
    with tqdm(total=spec.frame_count, unit="frame", desc="video", file=sys.stderr, disable=options.quiet) as bar:
        truth = generate_video(spec, video, progress=bar.update)

    device = f"door-{plan.seed}-{secrets.token_hex(3)}"
    received: list[tuple[AttendanceEvent, float]] = []

    def on_event(event: AttendanceEvent, at: float) -> None:
        if event.device_id == device:  # a shared broker may carry other doors' events
            received.append((event, at))

    probe = AgentProbe()
    bars: list[Any] = []

    def watch(agent: Any) -> None:
        probe.install(agent)
        bars.append(tqdm(total=truth.frame_count, unit="frame", desc="agent", file=sys.stderr, disable=options.quiet))

    def tick() -> None:
        for bar in bars:  # the file position the agent has reached, whether it took every frame or not
            bar.update(max(0, min(bar.total, round(probe.position * truth.fps) + 1) - bar.n))

    setup = DoorSetup(
        plan.enrolled,
        video,
        spare_photos=plan.spares,
        window_s=0.0,
        unknown_events=True,
        realtime=options.realtime,
        decision=options.decision,
        import_options=("--allow-duplicate-identity",),  # the folder's people are distinct by construction
        site=f"bench-door-{secrets.token_hex(3)}",
        device_id=device,
        enrollment=options.enrollment,
    )
    try:
        quiet = options.quiet
        door = run_door(setup, workdir, broker_url, on_event, say, show_progress=not quiet, on_agent=watch, tick=tick)
    finally:
        for bar in bars:
            bar.close()
    accepted = {line["person_id"] for line in door.enrollment if line.get("accepted")}
    rejected = {  # people none of whose photos the server took: the reason for the last one offered
        line["person_id"]: f"{line.get('reason')}: {line.get('message')}"
        for line in door.enrollment
        if not line.get("accepted") and line["person_id"] not in accepted
    }
    walks = [
        Walk(
            a.person,
            "walk-in" if a.enrolled else "stranger",
            None if not a.enrolled or a.person in accepted else f"not enrolled: {rejected.get(a.person, 'rejected')}",
        )
        for a in truth.appearances
    ]
    rule = options.rule
    events, verdicts = [], []
    for event, _ in sorted(received, key=lambda x: x[0].seq):
        d = probe.decided.get((event.camera, event.track_id))
        owner = owner_of(d, probe, truth) if d is not None else None
        index = None if owner is None else next(i for i, a in enumerate(truth.appearances) if a is owner)
        record = {
            "seq": event.seq,
            "track_id": event.track_id,
            "person_id": event.person_id,
            "appearance": index,
            "truth_person": None if owner is None else owner.person,
            "distance": event.distance,
            "margin": event.margin,
            "threshold": event.threshold,
            "rule": rule.to_dict(),
            "candidate": None if d is None else d.candidate,
            "reason": None if d is None else d.reason,
            "trigger": None if d is None else d.trigger,
            "samples": None if d is None else d.samples,
            "vote_share": None if d is None else d.vote_share,
        }
        events.append(record)
        verdicts.append(Verdict(index, event.person_id, record))
    scores = {OURS: score_door(walks, verdicts)}
    peer_info = None
    if peer_encodings is not None:
        from edge_agent.devtools.door_peer import run_peer

        names, encodings = peer_gallery(options, plan, peer_encodings)
        n_frames = -(-truth.frame_count // options.peer_every)
        say(f"seed {plan.seed}: {PEER} on the same video, frame by frame")
        with tqdm(total=n_frames, unit="frame", desc=PEER, file=sys.stderr, disable=options.quiet) as peer_bar:
            peer = run_peer(video, truth, names, encodings, every=options.peer_every, progress=peer_bar.update)
        peer_walks = [Walk(w.person, w.kind) for w in walks]  # the peer enrolls every photo: no gate
        for mode, label in PEER_MODES.items():
            scores[f"{PEER} ({label})"] = score_door(peer_walks, peer.verdicts(mode))
        peer_info = peer.to_dict()
    return SeedRun(
        seed=plan.seed,
        plan=plan,
        video={"frames": truth.frame_count, "seconds": truth.frame_count / truth.fps, "appearances": len(walks)},
        enrollment={
            "photos": len(door.enrollment),
            "accepted": len(accepted),
            "rejected": rejected,
            # people whose first photo was refused and who were enrolled from another one
            "another_photo": sum(
                1 for p, n in Counter(line["person_id"] for line in door.enrollment).items() if n > 1 and p in accepted
            ),
        },
        agent={"frames": door.frames, "frames_dropped": door.frames_dropped, "events": len(received)},
        events=tuple(events),
        scores=scores,
        peer=peer_info,
        seconds=time.monotonic() - started,
    )


# --- the whole bench ------------------------------------------------------------------------------------------------
def _peer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("face_recognition") is not None


def peer_encodings_of(options: DoorBenchOptions) -> dict[str, np.ndarray | None]:
    """face_recognition's encoding of every photo of the people folder (relative path -> vector; cached): each
    seed's peer gallery is its enrollment photos' rows, so the peer enrolls exactly the photos our server was given."""
    from tqdm import tqdm

    from models.evaluation.scoring import load_identities
    from models.training.dataset import embed_dataset_peer

    total = sum(len(v) for v in load_identities(options.people).values())
    with tqdm(total=total, unit="img", desc=f"{PEER} enrollment", file=sys.stderr, disable=options.quiet) as bar:
        return embed_dataset_peer(options.people, progress=bar.update, cache_root=options.cache).as_mapping()


def peer_gallery(
    options: DoorBenchOptions, plan: DoorPlan, encodings: Mapping[str, np.ndarray | None]
) -> tuple[list[str], np.ndarray]:
    """The peer's enrolled names and encodings for one plan: one row per enrollment photo it has an encoding of."""
    names, vectors = [], []
    for person, photos in plan.enrolled.items():
        for photo in photos:
            v = encodings.get(photo.relative_to(options.people).as_posix())
            if v is not None:
                names.append(person)
                vectors.append(np.asarray(v, dtype=np.float64))
    return names, np.stack(vectors) if vectors else np.empty((0, 128))


def run_door_bench(options: DoorBenchOptions, progress: TextIO | None = None) -> DoorBenchReport:
    """The whole bench; `progress` gets a line per step (the CLI passes stderr), bars go to stderr."""
    from edge_agent.devtools.demo import broker_url_for, workdir_for
    from edge_agent.devtools.videogen import load_people

    def say(text: str) -> None:
        if progress is not None and not options.quiet:
            print(f"== {text}", file=progress, flush=True)

    people = load_people(options.people)
    plans = [
        plan_door(
            people,
            enrolled=options.enrolled,
            walk_ins=options.walk_ins,
            strangers=options.strangers,
            seed=s,
            enroll_tries=options.enroll_tries,
        )
        for s in options.seeds
    ]
    notes = []
    with_peer = options.peer == "on" or (options.peer == "auto" and _peer_available())
    encodings = peer_encodings_of(options) if with_peer else None
    if options.peer == "auto" and not with_peer:
        notes.append(f"{PEER} is not installed: no peer figures")
    runs = []
    with workdir_for(options.workdir) as workdir, broker_url_for(options.broker) as broker_url:
        say(f"broker {broker_url}; working folder {workdir}")
        for i, plan in enumerate(plans):
            say(f"seed {plan.seed} ({i + 1} of {len(plans)})")
            seed_dir = workdir / f"seed-{plan.seed}"
            seed_dir.mkdir(parents=True, exist_ok=True)
            run = run_seed(options, plan, seed_dir, broker_url, encodings, say)
            say(f"seed {plan.seed}: faceattend {run.scores[OURS].line().strip()} ({run.seconds:.0f} s)")
            runs.append(run)
    if with_peer:
        notes.append(
            f"{PEER}: HOG detector upsampling once, tolerance 0.6, every {options.peer_every} frame(s); a face goes to "
            "the ground-truth face it overlaps most (IoU >= 0.3); per appearance, 'majority of frames' is the label "
            "most of its frames carry (a tie: unknown), 'any frame' credits everyone it named on any frame"
        )
    notes.append(
        "faceattend: every event goes to the ground-truth face its decision's box overlaps (IoU >= 0.3) on its best "
        "frame; the attendance window is 0, so every track's decision is an event"
    )
    return DoorBenchReport(options, tuple(runs), tuple(notes))


def write_json(report: DoorBenchReport, path: Path) -> None:
    from models.cache import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(report.to_dict(), indent=1) + "\n").encode("utf-8"))
