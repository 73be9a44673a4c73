"""`edge-agent bench VIDEO` through its CLI: a short rendered door video (one face, then three side by side) with
ground truth, the shipped demo photos as the people to enroll, the embedded broker; and its refusals of bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.devtools.bench import (
    LATENCIES,
    BenchReport,
    EventLatency,
    EventRecord,
    Throughput,
    VideoInfo,
)
from edge_agent.devtools.demo import DEMO_PEOPLE
from edge_agent.devtools.videogen import GroundTruth, VideoSpec, generate_video, load_people, plan_appearances
from models.backends import tensorrt_available

ENROLLED = ("Barack_Obama", "Elon_Musk", "Mark_Zuckerberg")
STRANGERS = ("Sundar_Pichai",)
SEED = 3  # Sundar Pichai alone, then the three enrolled people side by side


def edge_agent(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    people = load_people(DEMO_PEOPLE)
    appearances = plan_appearances(
        people,
        enrolled=ENROLLED,
        strangers=STRANGERS,
        enrollment_photos={p: people[p][:-1] for p in ENROLLED},  # as make-video and the demo enroll
        seed=SEED,
        appearance_s=2.5,
        gap_s=0.8,
    )
    spec = VideoSpec(appearances, seed=SEED)  # 640 x 480 at 15 fps, about 7.5 s
    assert max(a.lanes for a in appearances) == 3
    out = tmp_path_factory.mktemp("bench") / "door.avi"
    return out, generate_video(spec, out)


@pytest.fixture(scope="module")
def report(video: tuple[Path, GroundTruth]) -> dict[str, Any]:
    proc = edge_agent("bench", str(video[0]), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_throughput_figures(report: dict[str, Any], video: tuple[Path, GroundTruth]) -> None:
    truth = video[1]
    assert report["video"]["ground_truth"] is True
    assert (report["video"]["width"], report["video"]["height"]) == (640, 480)
    assert report["gallery"]["people"] == len(ENROLLED)
    t = report["throughput"]
    assert t["frames"] == truth.frame_count  # read as fast as it goes: every frame processed
    assert t["fps"] > 0 and t["wall_s"] > 0
    assert 0 < t["faces_per_frame"] <= 3.5 and 0 < t["encodes_per_frame"] <= t["faces_per_frame"]
    assert t["decisions"] >= len(ENROLLED) + len(STRANGERS)
    assert t["peak_rss_mib"] > 50
    for stage in ("detect", "align", "encode", "cycle"):
        fig = t["stages_ms"][stage]
        assert fig["n"] > 0 and 0 < fig["p50"] <= fig["p95"] <= fig["max"], (stage, fig)
    for stage in ("detect", "track", "align", "encode", "match", "frame"):
        assert t["stages_ms"][stage]["ema"] > 0, stage


def test_event_latency_for_each_enrolled_person(report: dict[str, Any]) -> None:
    e = report["events"]
    assert e["broker"] == "embedded"
    assert e["frames"] > 0 and e["unmatched"] == 0
    assert e["received"] == e["stored"] >= len(ENROLLED) + len(STRANGERS)  # unknown visitors are events too
    assert e["problems"] == [] and report["ok"] is True
    for person in ENROLLED:
        info = e["people"][person]
        assert info["enrolled"] and info["recognised_as"] == person, (person, info)
        vote = info["vote_to_receipt_ms"]
        first = info["first_frame_to_receipt_ms"]
        assert vote is not None and 0 <= vote < 5_000, (person, info)
        assert first is not None and first >= vote, (person, info)  # the face came before its vote
    stranger = e["people"][STRANGERS[0]]
    assert not stranger["enrolled"] and stranger["recognised_as"] is None
    lat = e["latency_ms"]
    assert set(lat) == set(LATENCIES)
    for name in LATENCIES:  # with ground truth every figure is measured
        assert lat[name] is not None and lat[name]["n"] >= len(ENROLLED), name
    assert lat["vote_to_receipt"]["p95"] <= lat["decided_frame_to_receipt"]["max"] + 1.0
    for event in e["events"]:
        ms = event["latency_ms"]
        assert ms["vote_to_outbox"] >= 0 and ms["outbox_to_receipt"] >= 0
        assert abs(ms["vote_to_outbox"] + ms["outbox_to_receipt"] - ms["vote_to_receipt"]) < 0.1
    targets = report["targets"]
    assert targets["fps"]["value"] == report["throughput"]["fps"]
    assert targets["event_latency_p95_ms"]["value"] == lat["vote_to_receipt"]["p95"]


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    proc = edge_agent("bench", str(tmp_path / "nowhere.avi"), timeout=60)
    assert proc.returncode == 2
    assert "nowhere.avi: no such file" in proc.stderr and not proc.stdout


def test_not_a_video_is_bad_input(tmp_path: Path) -> None:
    fake = tmp_path / "door.avi"
    fake.write_text("this is not a video\n")
    proc = edge_agent("bench", str(fake), "--json", timeout=60)
    assert proc.returncode == 2
    assert "door.avi: not a video" in proc.stderr and not proc.stdout
    folder = edge_agent("bench", str(tmp_path), timeout=60)
    assert folder.returncode == 2 and "not a file" in folder.stderr


def test_tensorrt_without_tensorrt_fails_clearly(video: tuple[Path, GroundTruth]) -> None:
    ok, _ = tensorrt_available()
    if ok:
        pytest.skip("TensorRT is usable here")
    proc = edge_agent("bench", str(video[0]), "--backend", "tensorrt", timeout=60)
    assert proc.returncode == 3
    assert "TensorRT" in proc.stderr and "Traceback" not in proc.stderr and not proc.stdout


def test_describe_names_the_figures_and_targets() -> None:
    """The text report (no --json) from fixed figures: no models needed."""
    throughput = Throughput(
        frames=100,
        wall_s=5.0,
        faces=150,
        encodes=20,
        encode_batch=1.5,
        decisions=4,
        known=3,
        stages_ms={"detect": {"ema": 20.0, "n": 99, "p50": 19.0, "p95": 25.0, "max": 40.0, "mean": 20.0}},
        peak_rss_mib=300.0,
    )
    latency = dict.fromkeys(LATENCIES, 12.0)
    events = EventLatency(
        broker="embedded",
        frames=100,
        wall_s=6.7,
        frames_dropped=0,
        stored=1,
        events=(EventRecord("e1", 1, 1, "Elon_Musk", "Elon_Musk", "evidence", 3, latency),),
        unmatched=0,
        people={
            "Elon_Musk": {
                "enrolled": True,
                "events": 1,
                "recognised_as": "Elon_Musk",
                "first_frame_to_receipt_ms": 12.0,
                "vote_to_receipt_ms": 12.0,
            }
        },
        problems=(),
    )
    report = BenchReport(
        video=VideoInfo(Path("door.avi"), 640, 480, 15.0, 100),
        backend="onnxruntime",
        threads=None,
        machine={"cpus": 2, "load_before": [1.0], "load_after": [1.0]},
        gallery={"people": 1, "templates": 2},
        throughput=throughput,
        events=events,
    )
    text = report.describe()
    assert "100 frames in 5.00 s = 20.0 fps" in text
    assert "target fps: 20.0 (target >= 15): met" in text
    assert "vote_to_receipt" in text and "NOT met" not in text
    data = report.to_json()
    assert data["targets"]["event_latency_p95_ms"]["met"] is True
    assert json.loads(json.dumps(data)) == data
