"""The README's first command: `edge-agent demo`, end to end in its own process (embedded broker, server process)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from edge_agent.devtools.demo import DEMO_PEOPLE
from enrollment_server.store import Store
from models.contract.events import AttendanceEvent


def run_demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_recognises_every_enrolled_person_once_and_no_stranger(tmp_path: Path) -> None:
    proc = run_demo("--json", "--workdir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    summary = json.loads(lines[-1])["summary"]
    events = [AttendanceEvent.from_json(line.encode()) for line in lines[:-1]]  # each line is a contract event
    print(f"\n[demo] {summary}")
    enrolled = sorted(p.name for p in DEMO_PEOPLE.iterdir() if p.is_dir() and len(list(p.glob("*.jpg"))) > 1)
    assert summary["ok"] and summary["checked_against_ground_truth"] and summary["problems"] == []
    assert sorted(e.person_id for e in events if e.person_id) == enrolled
    assert summary["unknown"] == len([e for e in events if e.person_id is None]) >= 1  # the strangers
    assert len({e.event_id for e in events}) == len(events)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    snapshots = tmp_path / "demo" / "edge" / "snapshots"
    assert all((snapshots / e.snapshot).is_file() for e in events if e.snapshot)
    # while it runs, the demo says where its web console is and how to sign in (stderr: stdout is JSON lines)
    console = re.search(
        r"web console: (http://127\.0\.0\.1:\d+/console) \(sign in with the admin token (\S+)\)", proc.stderr
    )
    assert console and len(console.group(2)) >= 16, proc.stderr[-2000:]
    # the demo's site shares its unknown visitors: the strangers' faces reached the server for the console
    store = Store.open(tmp_path / "demo" / "server.db")
    try:
        assert store.count_unknown_faces("demo") >= 1
    finally:
        store.close()


def test_demo_rejects_unusable_people_folders(tmp_path: Path) -> None:
    proc = run_demo("--people", str(tmp_path / "absent"), timeout=60)
    assert proc.returncode == 2 and "not a folder" in proc.stderr
    singles = tmp_path / "singles"
    for person in ("Jeff_Bezos", "Sundar_Pichai"):
        shutil.copytree(DEMO_PEOPLE / person, singles / person)
    proc = run_demo("--people", str(singles), timeout=60)
    assert proc.returncode == 2 and "nobody has two photos" in proc.stderr
