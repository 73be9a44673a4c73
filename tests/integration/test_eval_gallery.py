"""`model-tool eval DATASET --gallery-size N` on the repository's test face set (22 people, 79 photos): every rule
calibrated on other strangers than it is measured on, the configured thresholds, our figures beside the peer's,
JSON and PNG, the embedding cache, and refusals."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from models.cli.model_tool import EXIT_FATAL, EXIT_OK, main

RULES = {"distance", "ratio", "ratio<=0.6", "ratio<=0.5", "margin", "margin<=0.6", "margin<=0.5"}


def test_eval_at_a_gallery_size_beside_the_peer_and_again_from_the_cache(
    test_faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, summary, plot = tmp_path / "cache", tmp_path / "eval.json", tmp_path / "dir.png"
    argv = ["eval", str(test_faces), "--gallery-size", "8", "--seeds", "2", "--cache", str(cache), "--quiet"]
    extra = ["--json", str(summary), "--roc", str(plot), "--decision", "{rule: distance, threshold: 0.5}"]
    assert main([*argv, "--peer", "on", *extra]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "thresholds calibrated on a disjoint split: 7 calibration strangers" in printed
    assert "shipped default: ratio 0.82, cap 0.5" in printed and "--decision: distance 0.5" in printed
    assert "faceattend" in printed and "face_recognition" in printed

    data = json.loads(summary.read_text())
    assert data["fingerprint"].startswith("dlib_resnet_v1-")
    assert [s["seed"] for s in data["splits"]] == [0, 1]
    for split in data["splits"]:
        # 18 people have two or more photos, 4 one: 8 enrolled, the other 14 strangers, 7 on each side
        assert (split["gallery_people"], split["mates"]) == (8, 8)
        assert (split["calibration_strangers"], split["test_strangers"]) == (7, 7)
    for system in ("faceattend", "face_recognition"):
        s = data["summary"][system]
        assert {c["variant"] for c in s["calibrated"]} == RULES
        assert 0.0 <= s["rank1"]["min"] <= s["rank1"]["mean"] <= s["rank1"]["max"] <= 1.0
        labels = [c["label"] for c in s["configured"]]
        assert labels[-2:] == ["shipped default", "--decision"]
        # 7 calibration strangers cannot resolve FPIR 1e-2: every calibrated point says so
        assert not any(c["resolvable"] for c in s["calibrated"])
    ours = data["summary"]["faceattend"]
    assert ours["rank1"]["mean"] >= 0.85  # the test set's photos are easy: nearly every mate is nearest its person
    shipped = next(c for c in ours["configured"] if c["label"] == "shipped default")
    assert shipped["dir"]["mean"] >= 0.75 and shipped["fpir"]["mean"] <= 0.2
    assert len(data["per_seed"]) == 4 and set(data["per_seed"][0]["curves"]) == RULES
    assert Image.open(io.BytesIO(plot.read_bytes())).format == "PNG"

    # again, several templates per person, from the cache: no embedding pass, the same people drawn
    started = time.monotonic()
    again = tmp_path / "again.json"
    assert main([*argv, "--photos-per-person", "2", "--peer", "on", "--json", str(again), "--roc", ""]) == EXIT_OK
    assert time.monotonic() - started < 20  # 79 photos take far longer to embed on a 2-core machine
    two = json.loads(again.read_text())
    assert two["splits"][0]["templates"] == 16 and two["summary"]["faceattend"]["rank1"]["mean"] >= 0.85
    capsys.readouterr()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gallery-size", "19"], "19 people with at least 2 photos are needed .* the dataset has 18"),
        (["--gallery-size", "8", "--calibration-gallery", "disjoint", "--photos-per-person", "2"], "16 people with"),
        (["--gallery-size", "8", "--decision", "{rule: median, threshold: 1}"], "unknown rule 'median'"),
        (["--gallery-size", "8", "--strangers", "1"], "--strangers: need at least 2"),
    ],
)
def test_eval_at_a_gallery_size_refuses_what_cannot_be_measured(
    test_faces: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["eval", str(test_faces), *args, "--peer", "off", "--cache", str(tmp_path), "--quiet", "--roc", ""])
    assert code == EXIT_FATAL
    err = capsys.readouterr().err
    assert err.startswith("model-tool: ") and re.search(message, err), err
