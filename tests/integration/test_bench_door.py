"""`edge-agent bench-door` on the repository's test face set: the real enrollment server (its own process), the
embedded broker, the real agent on a rendered door video, the events a consumer receives scored against the
video's ground truth; the face_recognition peer on a short video; refusals of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_agent.devtools.demo import DEMO_PEOPLE
from edge_agent.devtools.door_peer import run_peer
from edge_agent.devtools.door_score import Walk, score_door
from edge_agent.devtools.videogen import VideoSpec, generate_video, load_people, plan_appearances
from models.evaluation.embed import embed_peer


def edge_agent(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_door_scores_the_agents_events_against_the_truth(test_faces: Path, tmp_path: Path) -> None:
    """15 enrolled from one photo each, 5 of them walk in with another photo, 3 strangers; every frame taken, so the
    outcome does not depend on how busy the machine is. On these easy photos every walk-in the server enrolled is
    recognised, nobody is credited as someone else and no stranger is let in; a walk-in whose only enrollment
    photo the quality gate refused cannot be, and is reported as such."""
    out = tmp_path / "door.json"
    args = ["--enrolled", "15", "--walk-ins", "5", "--strangers", "3", "--every-frame", "--peer", "off", "--quiet"]
    proc = edge_agent("bench-door", str(test_faces), *args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "correct  wrong  missed  strangers accepted" in proc.stdout and "seed 0   faceattend" in proc.stdout
    data = json.loads(out.read_text())
    assert data["decision"] == {"rule": "ratio", "threshold": 0.82, "max_distance": 0.5}
    assert data["decision_is_default"] and data["agent_reads"] == "every frame"
    (run,) = data["runs"]
    plan = run["plan"]
    assert len(plan["enrolled"]) == 15 and len(plan["walk_ins"]) == 5 and len(plan["strangers"]) == 3
    for person, shown in plan["walk_ins"].items():
        assert shown not in plan["enrolled"][person]  # shown with another photo than the enrolled one
    assert run["agent"]["frames"] == run["video"]["frames"] and run["agent"]["frames_dropped"] == 0
    rejected = run["enrollment"]["rejected"]
    assert run["enrollment"]["accepted"] == 15 - len(rejected)

    score = run["scores"]["faceattend"]
    for o in score["appearances"]:
        if o["kind"] == "stranger":
            assert o["outcome"] == "rejected", o
        elif o["person"] in rejected:
            assert o["outcome"] == "missed" and o["note"].startswith("not enrolled"), o
        else:
            assert o["outcome"] == "correct" and o["named"] == [o["person"]], o
    assert score["walk_ins"] == 5 and score["strangers"] == 3
    assert score["correct"] == 5 - sum(1 for p in plan["walk_ins"] if p in rejected) >= 3
    assert score["wrong"] == score["strangers_accepted"] == score["unattributed"] == 0
    assert data["totals"]["faceattend"] == {k: v for k, v in score.items() if k != "appearances"}
    assert run["on_enrolled_walk_ins"]["faceattend"] == {"correct": 5 - len(set(plan["walk_ins"]) & set(rejected))}
    assert f"{5 - len(set(plan['walk_ins']) & set(rejected))} of 5 walk-ins enrolled" in proc.stdout

    events = run["events"]
    assert len(events) == run["agent"]["events"] >= 8  # each appearance decided (unknown visitors are events)
    for e in events:
        assert e["appearance"] is not None and e["rule"] == data["decision"]
        assert e["person_id"] in (None, e["truth_person"]), e
        if e["person_id"] is not None:
            d1, d2 = e["distance"], e["distance"] + e["margin"]
            assert d1 <= 0.5 and d1 / d2 <= 0.82 and e["reason"] == "accepted", e


def test_the_peer_on_a_door_video_names_the_enrolled_walk_in(tmp_path: Path) -> None:
    people = load_people(DEMO_PEOPLE)
    enrolled, shown = people["Barack_Obama"][0], people["Barack_Obama"][1]
    appearances = plan_appearances(
        {"Barack_Obama": (enrolled, shown), "Sundar_Pichai": people["Sundar_Pichai"]},
        enrolled=["Barack_Obama"],
        strangers=["Sundar_Pichai"],
        enrollment_photos={"Barack_Obama": (enrolled,)},
        max_together=1,
        appearance_s=1.6,
        gap_s=0.6,
    )
    video = tmp_path / "door.avi"
    truth = generate_video(VideoSpec(appearances, seed=1), video)
    encoding = embed_peer(DEMO_PEOPLE, [enrolled.relative_to(DEMO_PEOPLE).as_posix()])
    row = next(iter(encoding.values()))
    assert row is not None
    peer = run_peer(video, truth, ["Barack_Obama"], np.stack([row]), every=2)
    assert peer.frames == (truth.frame_count + 1) // 2 and peer.faces > 0
    index = next(i for i, a in enumerate(truth.appearances) if a.person == "Barack_Obama")
    assert index in peer.calls and peer.unattributed <= peer.faces // 4
    walks = [Walk(a.person, "walk-in" if a.enrolled else "stranger") for a in truth.appearances]
    score = score_door(walks, peer.verdicts("majority"))
    assert score.correct == 1 and score.wrong == 0


def test_bench_door_refuses_what_it_cannot_plan(test_faces: Path, tmp_path: Path) -> None:
    proc = edge_agent("bench-door", str(tmp_path / "absent"), "--peer", "off", timeout=60)
    assert proc.returncode == 2 and "not a folder" in proc.stderr
    proc = edge_agent("bench-door", str(test_faces), "--walk-ins", "30", "--enrolled", "30", timeout=60)
    assert proc.returncode == 2 and "--walk-ins 30: only 18 people have two photos" in proc.stderr
    proc = edge_agent("bench-door", str(test_faces), "--decision", "{rule: margin}", "--enrolled", "5", timeout=60)
    assert proc.returncode == 2 and "missing key 'threshold'" in proc.stderr
    proc = edge_agent("bench-door", str(test_faces), "--enrollment", "[1, 2]", timeout=60)
    assert proc.returncode == 2 and "--enrollment: expected a mapping" in proc.stderr
