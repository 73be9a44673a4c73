"""model-tool calibrate / train-adapter / train-verifier on the test face set, and their bad inputs.

The set is embedded once (then served from the embedding cache); every command runs through main().
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import facesets
import numpy as np
import pytest
import yaml
from PIL import Image

from models.cli.model_tool import EXIT_FATAL, EXIT_OK, main
from models.decision.rules import DecisionRule
from models.face.fingerprint import encoder_fingerprint
from models.training.adapter import ADAPTER_ONNX, EmbeddingAdapter, adapter_fingerprint
from models.training.verifier import SiameseVerifier


def test_calibrate_writes_a_fragment_the_decision_loader_reads(capsys, tmp_path, test_faces) -> None:
    out, summary, plot = tmp_path / "decision.yaml", tmp_path / "cal.json", tmp_path / "cal.png"
    argv = ["calibrate", str(test_faces), "--far", "1e-2", "--out", str(out)]
    argv += ["--json", str(summary), "--plot", str(plot)]
    assert main([*argv, "--bootstrap", "200", "--quiet"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    rule = DecisionRule.from_dict(yaml.safe_load(printed)["decision"])
    data = json.loads(summary.read_text())
    assert data["fingerprint"] == encoder_fingerprint().value and data["fingerprint"] in printed
    sizes = [len(facesets.photos(person)) for person in facesets.people()]
    assert data["images"] == sum(sizes) and data["identities"] == len(sizes)
    distance = data["calibrations"][0]
    pairs = sum(sizes) * (sum(sizes) - 1) // 2
    assert distance["n_mates"] == sum(n * (n - 1) // 2 for n in sizes)  # every pair of one person's photos
    assert distance["basis"] == "pairs" and distance["n_strangers"] == pairs - distance["n_mates"]
    assert rule.rule == "distance" and rule.threshold == distance["threshold"]
    assert distance["fpir"] <= 1e-2 and distance["resolvable"]
    iv = distance["threshold_interval"]
    assert iv["low"] <= rule.threshold <= iv["high"] and iv["resamples"] == 200
    assert 0.4 < rule.threshold < 0.8  # dlib's metric: same person below ~0.6
    assert {c["rule"] for c in data["calibrations"]} == {"distance", "margin", "ratio"}
    assert Image.open(plot).format == "PNG"


@pytest.mark.parametrize("far", ["0", "1.5", "-1e-3", "nan"])
def test_calibrate_refuses_a_bad_rate(capsys, test_faces, far: str) -> None:
    assert main(["calibrate", str(test_faces), f"--far={far}", "--quiet"]) == EXIT_FATAL
    assert "--far must be a rate in (0, 1)" in capsys.readouterr().err


def _copy(people: dict[str, int], dest: Path) -> Path:
    for person, n in people.items():
        (dest / person).mkdir(parents=True)
        for p in facesets.photos(person)[:n]:
            (dest / person / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "not a folder"),
        ("empty", "no identity sub-folder with images"),
        ("one_person", "too few identities"),
        ("corrupt", r"corrupt image in the dataset: .*broken\.jpg"),
    ],
)
def test_calibrate_bad_datasets_get_a_clear_message(capsys, tmp_path, setup: str, message: str) -> None:
    root = tmp_path / "faces"
    if setup == "empty":
        (root / "nobody").mkdir(parents=True)
    elif setup == "one_person":
        _copy({"Barack_Obama": 3}, root)
    elif setup == "corrupt":
        _copy({"Barack_Obama": 2, "Joe_Biden": 2}, root)
        (root / "Joe_Biden" / "broken.jpg").write_bytes(facesets.photos("Joe_Biden")[0].read_bytes()[:500])
    code = main(["calibrate", str(root), "--far", "1e-2", "--quiet", "--no-cache", "--out", str(tmp_path / "d.yaml")])
    assert code == EXIT_FATAL
    err = capsys.readouterr().err
    assert err.startswith("model-tool: ") and re.search(message, err), err
    assert not (tmp_path / "d.yaml").exists()


def test_train_adapter_ships_only_what_helps_held_out_people(capsys, tmp_path, test_faces) -> None:
    out = tmp_path / "adapter"
    code = main(["train-adapter", str(test_faces), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    verdict = report["verdict"]
    before, after = report["systems"]
    assert (before["system"], after["system"]) == ("encoder", "encoder + adapter")
    split = report["split"]
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    assert before["n_images"] == after["n_images"] and before["reference"]["missing"] == 0
    base = encoder_fingerprint().value
    assert report["adapter_fingerprint"].startswith(base + "+adapter-")
    for change in verdict["changes"]:
        assert change["delta"] == pytest.approx(change["after"] - change["before"])
    worse = [c for c in verdict["changes"] if c["delta"] < -verdict["tolerance"]]
    better = [c for c in verdict["changes"] if c["delta"] > verdict["tolerance"]]
    assert verdict["ship"] == (not worse and bool(better))
    assert (out / "roc.png").is_file() and (out / "histograms.png").is_file()
    if verdict["ship"]:
        assert code == EXIT_OK
        with EmbeddingAdapter.load(out, base_fingerprint=base) as adapter:
            sha = adapter.manifest.onnx_sha256
            assert adapter.fingerprint == adapter_fingerprint(base, sha) == report["adapter_fingerprint"]
    else:  # the tool refuses and says why; nothing that could be deployed is left behind
        assert code == EXIT_FATAL
        assert "adapter refused, not written" in captured.err and verdict["reason"] in captured.err
        assert not (out / ADAPTER_ONNX).exists()
    assert ("SHIP" if verdict["ship"] else "REFUSE") in captured.out


def test_train_verifier_compares_with_the_distance_threshold(capsys, tmp_path, test_faces) -> None:
    out = tmp_path / "verifier"
    assert main(["train-verifier", str(test_faces), "--out", str(out), "--quiet", "--far", "1e-2"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "distance threshold" in printed and "siamese verifier (chi2)" in printed
    report = json.loads((out / "report.json").read_text())
    systems = {s["system"]: s for s in report["systems"]}
    assert set(systems) == {"distance threshold", "siamese verifier (abs)", "siamese verifier (chi2)"}
    n_pairs = {s["verification"]["n_genuine"] for s in systems.values()}
    assert len(n_pairs) == 1  # the very same protocol for all three
    for s in systems.values():
        assert 0.5 < s["reference"]["verif_acc"] <= 1.0 and not math.isnan(s["rank1"])
    verifier, manifest = SiameseVerifier.load(out, base_fingerprint=encoder_fingerprint().value)
    assert manifest.form == "abs" and manifest.target_far == 1e-2
    assert manifest.threshold == report["verifiers"]["abs"]["calibration"]["threshold"]
    e = np.random.default_rng(0).normal(0, 0.05, size=(3, 128)).astype(np.float32)
    decisions = verifier.decide(e, e, ["a", "b", "c"], manifest.threshold)
    assert [d.candidate for d in decisions] == ["a", "b", "c"]  # identical embeddings: the most probable match
    verifier.close()
