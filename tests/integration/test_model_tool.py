"""model-tool end to end on real photos: every command, and every kind of bad input, through main()."""

from __future__ import annotations

import io
import json
import re
import zlib
from pathlib import Path

import facesets
import numpy as np
import pytest
from PIL import Image

from models.cli.model_tool import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL, EXIT_UNAVAILABLE, main


def _run(capsys, *argv: str) -> tuple[int, list[dict]]:
    code = main([*argv])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _save(img: Image.Image, path: Path, fmt: str = "PNG", **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = facesets.photos("Barack_Obama")[0].read_bytes()
    files = {
        "zero": d / "zero.jpg",
        "text": d / "notes.jpg",
        "truncated": d / "truncated.jpg",
        "corrupt": d / "corrupt.jpg",
        "huge": d / "huge.png",
    }
    files["zero"].write_bytes(b"")
    files["text"].write_text("not an image at all\n" * 50)
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["corrupt"].write_bytes(good[:200] + bytes(range(256)) * 40)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    files["huge"].write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )
    return files


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Valid but unusual encodings of one real face photo."""
    d = tmp_path_factory.mktemp("odd")
    rgb = Image.open(facesets.photos("Barack_Obama")[0]).convert("RGB")
    gray = rgb.convert("L")
    out = {
        "rgb": _save(rgb, d / "rgb.png"),
        "gray": _save(gray, d / "gray.png"),
        "rgba": _save(rgb.convert("RGBA"), d / "rgba.png"),
        "sixteen": _save(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), d / "sixteen.png"),
    }
    # stored rotated, with EXIF orientation 8 telling viewers to turn it back upright
    exif = Image.Exif()
    exif[0x0112] = 8
    out["exif"] = _save(rgb.rotate(-90, expand=True), d / "exif.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    out["noface"] = _save(Image.fromarray(np.full((480, 640, 3), 128, np.uint8)), d / "grey.png")
    # 30 faces: a 6 x 5 mosaic of different people's photos
    people = facesets.people()[:30]
    tiles = [Image.open(facesets.photos(p)[0]).convert("RGB").resize((200, 200)) for p in people]
    while len(tiles) < 30:
        tiles.append(tiles[len(tiles) - len(people)].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    mosaic = Image.new("RGB", (1200, 1000))
    for i, t in enumerate(tiles):
        mosaic.paste(t, ((i % 6) * 200, (i // 6) * 200))
    out["crowd"] = _save(mosaic, d / "crowd.png")
    return out


def test_detect_writes_json_and_an_annotated_png(capsys, tmp_path):
    out = tmp_path / "annotated.png"
    code, lines = _run(capsys, "detect", str(facesets.photos("Barack_Obama")[0]), "--out", str(out))
    assert code == EXIT_OK and len(lines) == 1
    (face,) = lines[0]["faces"]
    assert face["score"] > 0.9 and len(face["landmarks"]) == 5
    x1, y1, x2, y2 = face["bbox"]
    assert 0 <= x1 < x2 <= lines[0]["width"] and 0 <= y1 < y2 <= lines[0]["height"]
    assert Image.open(out).size == (lines[0]["width"], lines[0]["height"])


def test_embed_folder_and_list_every_face(capsys, tmp_path, test_faces):
    folder = test_faces / "Jeff_Bezos"
    listing = tmp_path / "list.txt"
    listing.write_text("# one path per line\n" + "\n".join(str(p) for p in facesets.photos("Joe_Biden")) + "\n")
    code, lines = _run(capsys, "embed", str(folder), "--list", str(listing), "--quiet")
    assert code == EXIT_OK
    assert len(lines) == len(facesets.photos("Jeff_Bezos")) + len(facesets.photos("Joe_Biden"))
    for line in lines:
        assert line["faces"], line["path"]
        emb = np.array(line["faces"][0]["embedding"])
        assert emb.shape == (128,) and 0.2 < np.linalg.norm(emb) < 2.0


def test_verify_same_and_different(capsys):
    a, b = facesets.photos("Barack_Obama")[:2]
    code, (same,) = _run(capsys, "verify", str(a), str(b))
    assert code == EXIT_OK and same["same_person"] and same["threshold"] == 0.6
    code, (diff,) = _run(capsys, "verify", str(a), str(facesets.photos("Angelina_Jolie")[0]))
    assert code == EXIT_OK and not diff["same_person"] and diff["distance"] > same["distance"]


def test_verify_without_a_face_is_a_clear_error(capsys, odd_images):
    code = main(["verify", str(odd_images["rgb"]), str(odd_images["noface"])])
    assert code == EXIT_FATAL
    assert "no face found" in capsys.readouterr().err


def test_identify_enrolled_and_stranger(capsys, tmp_path):
    gallery = tmp_path / "gallery"
    for person in ("Barack_Obama", "Angelina_Jolie", "Jennifer_Aniston", "Katy_Perry"):
        (gallery / person).mkdir(parents=True)
        (gallery / person / "a.jpg").write_bytes(facesets.photos(person)[0].read_bytes())
    (gallery / "Katy_Perry" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    probes = [
        facesets.photos("Barack_Obama")[1],
        facesets.photos("Jennifer_Aniston")[2],
        facesets.photos("Paul_Rudd")[0],
    ]
    code, lines = _run(capsys, "identify", "--gallery", str(gallery), *map(str, probes), "--rule", "distance")
    assert code == EXIT_PARTIAL  # the broken gallery photo is reported, the rest proceeds
    assert any("broken.jpg" in line.get("gallery_photo", "") for line in lines)
    by_path = {line["path"]: line for line in lines if "path" in line}
    assert by_path[str(probes[0])]["faces"][0]["identity"] == "Barack_Obama"
    assert by_path[str(probes[1])]["faces"][0]["identity"] == "Jennifer_Aniston"
    stranger = by_path[str(probes[2])]["faces"][0]
    assert stranger["identity"] == "unknown" and stranger["decision"]["candidate"] is not None


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("zero", "empty file"),
        ("text", "not a recognised image"),
        ("truncated", "truncated"),
        ("corrupt", "corrupt or truncated|not a recognised image"),
        ("huge", "too large"),
    ],
)
def test_bad_files_get_a_clear_error_line_and_the_rest_still_runs(capsys, bad_inputs, kind, message):
    good = facesets.photos("Barack_Obama")[0]
    code, lines = _run(capsys, "embed", str(bad_inputs[kind]), str(good), "--quiet")
    assert code == EXIT_PARTIAL
    bad, ok = lines
    assert re.search(message, bad["error"]) and "faces" not in bad
    assert len(ok["faces"]) == 1


def test_unusual_but_valid_images(capsys, odd_images):
    code, lines = _run(capsys, "embed", *(str(odd_images[k]) for k in ("rgb", "gray", "rgba", "sixteen", "exif")))
    assert code == EXIT_OK
    embs = {Path(line["path"]).stem: np.array(line["faces"][0]["embedding"]) for line in lines}
    for kind in ("rgba", "exif"):
        assert np.linalg.norm(embs[kind] - embs["rgb"]) < 0.1, kind  # same pixels, same person, same face
    # 16-bit scaled from 8-bit is the same picture as the grayscale one
    assert np.linalg.norm(embs["sixteen"] - embs["gray"]) < 0.05
    assert np.linalg.norm(embs["gray"] - embs["rgb"]) < 0.4


def test_no_face_and_thirty_faces(capsys, odd_images):
    code, (none, crowd) = _run(capsys, "embed", str(odd_images["noface"]), str(odd_images["crowd"]), "--quiet")
    assert code == EXIT_OK
    assert none["faces"] == []
    assert 27 <= len(crowd["faces"]) <= 30
    embs = np.array([f["embedding"] for f in crowd["faces"]])
    assert embs.shape[1] == 128 and np.isfinite(embs).all()


def test_missing_input_and_unreadable_list(capsys, tmp_path):
    code, (line,) = _run(capsys, "embed", str(tmp_path / "absent.jpg"))
    assert code == EXIT_PARTIAL and "no such file" in line["error"]
    assert main(["embed", "--list", str(tmp_path / "absent.txt")]) == EXIT_FATAL
    assert "cannot read" in capsys.readouterr().err
    assert main(["embed"]) == EXIT_FATAL


def test_inspect_reports_manifests_and_fingerprint(capsys):
    code, (info,) = _run(capsys, "inspect")
    assert code == EXIT_OK
    names = {m["name"]: m for m in info["models"]}
    assert names["retinaface_mnet025"]["source"]["sha256"].startswith("b7a7acab")
    assert names["dlib_resnet_v1"]["onnx"]["outputs"] == ["embedding"]
    assert info["encoder_fingerprint"].startswith("dlib_resnet_v1-")


def test_build_engine_without_tensorrt_says_so(capsys):
    from models.backends import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT is present: covered by tests/gpu")
    assert main(["build-engine"]) == EXIT_UNAVAILABLE
    assert "tensorrt" in capsys.readouterr().err.lower()


def test_eval_on_a_small_dataset_writes_json_and_png(capsys, tmp_path):
    data = tmp_path / "faces"
    for person in ("Barack_Obama", "Jack_Dorsey", "Jennifer_Aniston", "Elon_Musk", "Bradley_Cooper", "Paul_Rudd"):
        (data / person).mkdir(parents=True)
        for p in facesets.photos(person)[:3]:
            (data / person / p.name).write_bytes(p.read_bytes())
    summary, roc = tmp_path / "eval.json", tmp_path / "roc.png"
    code = main(["eval", str(data), "--pairs", "10", "--json", str(summary), "--roc", str(roc), "--peer", "off"])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert "verification accuracy" in printed and "ratio rule" in printed
    ours = json.loads(summary.read_text())["systems"][0]
    assert ours["system"] == "faceattend" and ours["reference"]["missing"] == 0
    assert ours["reference"]["verif_acc"] >= 0.9 and ours["rank1"] == 1.0
    assert Image.open(io.BytesIO(roc.read_bytes())).format == "PNG"

    # identify takes its threshold from that calibration, and refuses one made under another fingerprint
    gallery = tmp_path / "gallery" / "Barack_Obama"
    gallery.mkdir(parents=True)
    (gallery / "a.jpg").write_bytes(facesets.photos("Barack_Obama")[0].read_bytes())
    probe = str(facesets.photos("Barack_Obama")[1])
    argv = ["identify", "--gallery", str(gallery.parent), probe, "--rule", "distance", "--calibration", str(summary)]
    code, (line,) = _run(capsys, *argv)
    calibrated = next(
        p
        for p in ours["open_set"]
        if p["rule"] == "distance" and p["stranger_set"] == "loo_all" and p["target_fpir"] == 0.01
    )
    assert code == EXIT_OK and line["faces"][0]["decision"]["threshold"] == pytest.approx(calibrated["threshold"])
    data = json.loads(summary.read_text())
    data["fingerprint"] = "dlib_resnet_v1-0000000000000000"
    summary.write_text(json.dumps(data))
    assert main(argv) == EXIT_FATAL
    assert "fingerprint" in capsys.readouterr().err


def test_eval_rejects_a_file_as_dataset(capsys, tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("x")
    assert main(["eval", str(f)]) == EXIT_FATAL
    assert "not a folder" in capsys.readouterr().err
