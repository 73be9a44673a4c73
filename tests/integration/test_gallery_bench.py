"""`edge-agent bench-gallery` through its CLI, on the embedded broker: one gallery served exact only, one just above
the hnswlib cutoff (built in the background, then loaded from disk at the restart); and its refusal of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

from edge_agent.gallery.index import IndexParams


def edge_agent(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_gallery_reports_each_size() -> None:
    above = IndexParams().exact_max_templates + 1000
    done = edge_agent("bench-gallery", "--templates", "300", str(above), "--queries", "40", "--json")
    assert done.returncode == 0, done.stderr
    small, big = json.loads(done.stdout)
    assert (small["templates"], big["templates"]) == (300, above)
    for row in (small, big):
        assert 0 < row["sign_send_s"] <= row["in_service_s"] and row["start_s"] > 0 and row["chunks"] >= 1
        assert 0 < row["exact_p50_ms"] <= row["exact_p95_ms"] and row["within_targets"]
    assert small["graph_s"] is None and small["graph_p50_ms"] is None and small["graph_load_s"] is None
    assert big["graph_s"] > 0 and big["graph_load_s"] > 0 and 0 < big["graph_p50_ms"] <= big["graph_p95_ms"]

    table = edge_agent("bench-gallery", "--templates", "300", "--queries", "20")
    assert table.returncode == 0 and "->in service s" in table.stdout and "targets at 50000" in table.stdout


def test_bench_gallery_refuses_bad_sizes() -> None:
    done = edge_agent("bench-gallery", "--templates", "0")
    assert done.returncode == 2 and "--templates" in done.stderr
