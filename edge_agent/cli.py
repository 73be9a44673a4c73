"""`edge-agent`: check-config, run, build-engines, bench, bench-gallery, bench-door, make-video, demo.

Exit codes: 0 success; 1 the demo / bench ran but its ground-truth check failed; 2 bad input (configuration,
arguments, files); 3 a runtime failure (broker, camera, model, disk).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from models import extras
from models.errors import ConfigError, FaceAttendError, ImageError, MissingExtraError, VideoGenError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3

log = logging.getLogger("edge_agent")


def cmd_check_config(args: argparse.Namespace) -> int:
    from edge_agent.agent import check_files
    from edge_agent.capture import redact_source
    from edge_agent.config import load_config
    from models.face.encoders import encoder_spec, require_fetched

    cfg = load_config(args.config)
    check_files(cfg)
    require_fetched(encoder_spec(cfg.models.encoder))
    print(
        json.dumps(
            {
                "ok": True,
                "device_id": cfg.device_id,
                "site": cfg.site,
                "broker": cfg.mqtt.url,
                "cameras": {c.name: redact_source(c.source) for c in cfg.cameras},
                "backend": cfg.models.backend,
                "encoder": cfg.models.encoder,
                "alignment": cfg.models.alignment,
                "decision": cfg.rule.to_dict(),
                # without a decision section the site's calibrated rule, once a gallery brings one, replaces it
                "decision_source": "config" if cfg.decision is not None else "encoder default",
                "attendance_window_s": cfg.attendance.window_s,
                "state_dir": str(cfg.state_dir),
            }
        )
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import load_config
    from edge_agent.systemd_notify import notify

    cfg = load_config(args.config)
    logging.getLogger().setLevel(cfg.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = EdgeAgent(cfg)
    agent.start()
    try:
        agent.wait_for_gallery(cfg.gallery.wait_at_start_s)
        agent.start_cameras()
        notify("READY=1")
        while not stop.wait(1.0):
            agent.check()  # raises when the worker died: no more pings, systemd's watchdog restarts us
            notify("WATCHDOG=1")
        notify("STOPPING=1")
    finally:
        agent.stop()
    return EXIT_OK


def cmd_build_engines(args: argparse.Namespace) -> int:
    from edge_agent.config import load_config
    from models.face.encoders import DEFAULT_ENCODER, encoder_spec
    from models.face.engines import build_engines

    cfg = load_config(args.config) if args.config else None
    max_batch = cfg.models.max_batch if cfg else 32
    max_side = cfg.models.detector.max_side if cfg else 640
    encoder = encoder_spec(cfg.models.encoder if cfg else DEFAULT_ENCODER)
    for record in build_engines(precision=args.precision, max_batch=max_batch, max_side=max_side, encoder=encoder):
        print(json.dumps(record), flush=True)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.devtools.bench import BenchOptions, run_bench

    report = run_bench(
        BenchOptions(
            video=Path(args.video),
            backend=args.backend,
            threads=args.threads,
            seconds=args.seconds,
            people=Path(args.people) if args.people else None,
            broker=args.broker,
            pipeline_only=args.pipeline_only,
            encoder=args.encoder,
            accept_licence=args.accept_licence,
        )
    )
    print(json.dumps(report.to_json()) if args.json else report.describe(), flush=True)
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def cmd_bench_gallery(args: argparse.Namespace) -> int:
    from edge_agent.devtools.gallery_bench import describe, run, to_json

    if any(n < 1 for n in args.templates) or args.queries < 20:
        raise ConfigError("bench-gallery: --templates must be >= 1 and --queries >= 20")
    rows = run(args.templates, broker=args.broker, graph=not args.no_graph, queries=args.queries)
    print(json.dumps(to_json(rows)) if args.json else describe(rows), flush=True)
    return EXIT_OK if all(r.within_targets for r in rows) else EXIT_CHECK_FAILED


def _yaml_mapping(option: str, value: str) -> dict:
    """A mapping from a YAML file or inline YAML."""
    import yaml

    path = Path(value)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8") if path.is_file() else value)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{option}: neither a readable YAML file nor valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{option}: expected a mapping such as '{{quality: {{min_blur: 10}}}}', got {value!r}")
    return data


def _stop_on_sigterm() -> None:
    """SIGTERM as Ctrl-C: the demo's and the bench's clean-up (the server process, the agent) still runs."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)


def cmd_bench_door(args: argparse.Namespace) -> int:
    extras.require("server", "edge-agent bench-door (it runs the enrollment server beside the agent)")
    _stop_on_sigterm()
    from edge_agent.devtools.door_bench import DoorBenchOptions, run_door_bench, write_json

    decision = None
    if args.decision:
        from models.training.calibration import read_decision

        decision = read_decision(args.decision)
    if args.seeds < 1:
        raise ConfigError(f"--seeds: need at least 1, got {args.seeds}")
    enrollment = _yaml_mapping("--enrollment", args.enrollment) if args.enrollment else None
    options = DoorBenchOptions(
        people=Path(args.people),
        enrolled=args.enrolled,
        walk_ins=args.walk_ins,
        strangers=args.strangers,
        seeds=tuple(range(args.seed, args.seed + args.seeds)),
        broker=args.broker,
        realtime=not args.every_frame,
        decision=decision,
        enrollment=enrollment,
        peer=args.peer,
        peer_every=args.peer_every,
        enroll_tries=args.enroll_tries,
        workdir=Path(args.workdir) if args.workdir else None,
        cache=Path(args.cache) if args.cache else None,
        quiet=args.quiet,
    )
    report = run_door_bench(options, progress=sys.stderr)
    print(report.format(), flush=True)
    if args.json:
        write_json(report, Path(args.json))
        print(f"everything: {args.json}", flush=True)
    return EXIT_OK


def cmd_make_video(args: argparse.Namespace) -> int:
    from edge_agent.devtools.demo import make_video, plan_people
    from edge_agent.devtools.videogen import load_people

    plan = plan_people(load_people(Path(args.people)), all_enrolled=False)
    out = Path(args.out)
    truth = make_video(plan, out, args.seed, width=args.width, height=args.height, fps=args.fps)
    print(
        json.dumps(
            {
                "video": str(out),
                "frames": truth.frame_count,
                "appearances": len(truth.appearances),
                "enrolled": sorted(plan.enrolled),
                "strangers": list(plan.strangers),
                "enrollment_photos": {p: [str(x) for x in photos] for p, photos in plan.enrolled.items()},
            }
        )
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    extras.require("server", "edge-agent demo (it runs the enrollment server beside the agent)")
    _stop_on_sigterm()
    from edge_agent.devtools.demo import DEMO_PEOPLE, DemoOptions, run_demo

    result = run_demo(
        DemoOptions(
            people=Path(args.people) if args.people else DEMO_PEOPLE,
            video=Path(args.video) if args.video else None,
            broker=args.broker,
            json=args.json,
            workdir=Path(args.workdir) if args.workdir else None,
            seed=args.seed,
            stay=args.stay,
        )
    )
    return EXIT_OK if result.ok else EXIT_CHECK_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="faceattend edge agent (door camera)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="check a configuration file and the files it names")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("run", help="run the agent until SIGTERM / Ctrl-C")
    p.add_argument("config")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("build-engines", help="build (or find cached) TensorRT engines on this device; idempotent")
    p.add_argument("config", nargs="?", help="the agent's config (its batch and detector sizes)")
    p.add_argument("--precision", choices=("fp16", "fp32", "int8"), default="fp16")
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser("bench", help="end-to-end fps, stage latencies and event latency on a video")
    p.add_argument("video")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: the backend's)")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: the whole video)")
    p.add_argument("--people", help="photos to enroll, one folder per person (default: the shipped demo photos)")
    p.add_argument("--broker", help="an mqtt:// URL for the event pass (default: an embedded broker)")
    p.add_argument("--pipeline-only", action="store_true", help="throughput only: no agent, broker or events")
    p.add_argument("--encoder", default="dlib-resnet-v1", help="face encoder (models/face/encoders.py)")
    p.add_argument("--accept-licence", default="", help="the acknowledgement a non-commercial encoder needs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "bench-gallery", help="gallery publish -> in service, start-up and query latency for a few gallery sizes"
    )
    p.add_argument("--templates", type=int, nargs="+", default=[5_000, 50_000, 200_000])
    p.add_argument("--broker", help="an mqtt:// URL of a running broker (default: an embedded one)")
    p.add_argument("--no-graph", action="store_true", help="exact search only: no hnswlib build")
    p.add_argument("--queries", type=int, default=500, help="probes per latency figure")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_gallery)

    p = sub.add_parser(
        "bench-door",
        help="door videos from a folder of people, the real server and agent, events scored against the truth",
        description="Per seed: N people enrolled from one photo each, W of them walk in shown with another photo, "
        "S strangers walk in; the enrollment server enrolls, the agent watches the video, the events a consumer "
        "receives are scored: correct / wrong person / missed / strangers accepted; face_recognition beside it "
        "when installed.",
    )
    p.add_argument("people", help="one sub-folder of photos per person")
    p.add_argument("--enrolled", type=int, default=500, help="people enrolled from one photo each (default 500)")
    p.add_argument("--walk-ins", type=int, default=40, help="enrolled people who walk in (default 40)")
    p.add_argument("--strangers", type=int, default=20, help="people not enrolled who walk in (default 20)")
    p.add_argument("--seeds", type=int, default=1, help="runs, each with its own draw and video (default 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--broker", help="an mqtt:// URL of a running broker (default: an embedded one)")
    p.add_argument(
        "--every-frame", action="store_true", help="the agent takes every frame (default: real time, as a camera)"
    )
    p.add_argument("--decision", help="the edge's decision: a YAML file with a `decision` section, or inline YAML")
    p.add_argument(
        "--enrollment",
        help="the enrollment server's `enrollment` section (YAML file or inline), e.g. '{quality: {min_blur: 10}}' "
        "(default: the server's defaults)",
    )
    p.add_argument(
        "--enroll-tries",
        type=int,
        default=3,
        help="photos offered per person while the server refuses them, as an admin told why would (default 3; 1: "
        "the first photo only); each person keeps one template",
    )
    p.add_argument("--peer", choices=("auto", "on", "off"), default="auto", help="face_recognition beside ours")
    p.add_argument("--peer-every", type=int, default=1, help="the peer takes every n-th frame (default 1: all)")
    p.add_argument("--workdir", help="keep videos, databases and logs here (default: a temporary folder, removed)")
    p.add_argument("--cache", help="the peer's embedding cache folder (default: the faceattend cache)")
    p.add_argument("--json", help="write every figure, plan and event here")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_bench_door)

    p = sub.add_parser("make-video", help="render a door-camera test video from a folder of photos per person")
    p.add_argument("--people", required=True, help="one sub-folder of photos per person")
    p.add_argument("--out", required=True, help="video file (.avi or .mp4); ground truth goes beside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=float, default=15.0)
    p.set_defaults(func=cmd_make_video)

    p = sub.add_parser("demo", help="the local demo: broker, server, enrollment, a video, this agent, a consumer")
    p.add_argument("--people", help="one sub-folder of photos per person (default: the shipped demo photos)")
    p.add_argument("--video", help="your own video instead of a generated one (everyone in --people is enrolled)")
    p.add_argument("--broker", help="an mqtt:// URL of a running broker (default: an embedded one)")
    p.add_argument("--json", action="store_true", help="print each received event as a JSON line")
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary folder, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stay", action="store_true", help="after the video, keep the server and its web console up until Ctrl-C"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if args.command == "run" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        extras.require("edge", "edge-agent")
        return args.func(args)
    except MissingExtraError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except (ConfigError, ImageError, VideoGenError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FaceAttendError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
