"""`enrollment-server reencode`: templates made before the encoder's space changed (issue 13: flip averaging) are
made again from what the server kept (the photo, else the aligned chip), on SQLite and PostgreSQL; what cannot be
made again is named, and its person stays out of the gallery."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import MosquittoBroker
from storedb import Db
from test_server_cli import SITE, Cli, photos

from enrollment_server import components as c
from enrollment_server import store as st
from enrollment_server.cli import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL
from enrollment_server.config import load_config
from models.face.encoder import FaceEncoder
from models.face.encoders import DLIB_RESNET
from models.face.fingerprint import encoder_fingerprint
from models.face.pipeline import FacePipeline
from models.imageio import encode_jpeg, load_image

UNFLIPPED = dataclasses.replace(DLIB_RESNET, flip_average=False)  # the dlib encoder before issue 13
OLD = encoder_fingerprint(UNFLIPPED).value


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], mosquitto: MosquittoBroker, db: Db) -> Cli:
    cli = Cli(tmp_path, capsys, mosquitto.url)
    cli.db = db.url  # type: ignore[assignment]  # SQLite file or PostgreSQL schema
    cli.write_config(mosquitto.url, enrollment={"keep_photos": True})
    code, _, err = cli.json("init")
    assert code == EXIT_OK, err
    return cli


@pytest.fixture(scope="module")
def pipeline() -> FacePipeline:
    return FacePipeline.create()


def old_template(pipeline: FacePipeline, path: str) -> tuple[bytes, np.ndarray, bytes]:
    """A photo, its embedding by the encoder before flip averaging, and its aligned chip as the server kept it."""
    data = Path(path).read_bytes()
    image = load_image(data)
    (face,) = pipeline.embed(image)
    chip = pipeline.aligner.align(image, [face.detection])
    old = FaceEncoder(pipeline.encoder.backend, UNFLIPPED).encode(chip)[0]
    return data, old, encode_jpeg(chip[0], 85)


def test_old_templates_are_made_again_from_photo_or_chip_and_the_rest_named(
    cli: Cli, pipeline: FacePipeline, caplog: pytest.LogCaptureFixture
):
    store = st.Store.open(cli.db, keep_photos=True)
    store.ensure_site(SITE)
    current = c.fingerprint(load_config(str(cli.config)))
    assert current == pipeline.fingerprint != OLD
    kept = {}
    for person, source, keep in (
        ("obama", "Barack_Obama", "photo"),  # enrolled with keep_photos on
        ("jolie", "Angelina_Jolie", "chip"),  # only the thumbnail chip
        ("damon", "Matt_Damon", "nothing"),  # enrolled before thumbnails existed
    ):
        store.add_person(person, SITE, source.replace("_", " "))
        data, old, chip = old_template(pipeline, photos(source)[0])
        store.add_template(
            person,
            old,
            encoder_fingerprint=OLD,
            image_sha256=f"{len(kept):064d}",
            photo=data if keep == "photo" else None,
            thumbnail=chip if keep != "nothing" else None,
        )
        kept[person] = (data, old)
    # a template of another model: its chip does not fit dlib's encoder
    store.add_person("other", SITE, "Other")
    store.add_template(
        "other",
        np.ones(192, np.float32) / np.sqrt(192),
        encoder_fingerprint="mobilefacenet_192-0123456789abcdef",
        image_sha256="f" * 64,
        thumbnail=kept["jolie"][0],
    )

    code, out, err = cli.json("reencode", "--dry-run")
    assert code == EXIT_PARTIAL, err
    report = out[0]["reencode"]
    assert report["dry_run"] and report["reencoded"] == {"photo": 1, "chip": 1} and report["foreign_templates"] == 4
    assert all(t.encoder_fingerprint != current for t in store.list_templates(site_id=SITE))  # nothing stored

    with caplog.at_level(logging.WARNING, logger="enrollment_server.gallery_publisher"):
        code, out, err = cli.json("reencode")
    assert code == EXIT_PARTIAL, err  # done, but two templates need their people enrolled again
    report, gallery = out[0]["reencode"], out[1]["gallery"]
    left = {x["person_id"]: x["reason"] for x in report["left"]}
    assert left.keys() == {"damon", "other"}
    assert "neither the photo nor the aligned chip was kept" in left["damon"]
    assert "made by model mobilefacenet_192" in left["other"] and "enroll the person again" in left["other"]
    assert "template" in err and "damon" in err
    # the gallery now holds the two made again; the publication says how many are still left out
    assert (gallery["people"], gallery["templates"]) == (2, 2)
    assert any("2 templates were made by another encoder" in r.getMessage() for r in caplog.records)

    by_person = {t.person_id: t for t in store.list_templates(site_id=SITE)}
    for person in ("obama", "jolie"):
        t = by_person[person]
        assert t.encoder_fingerprint == current
        data, old = kept[person]
        (fresh,) = pipeline.embed(load_image(data))
        row = t.embedding
        # from the photo: exactly what enrollment gives now; from the JPEG chip: within a few hundredths of it
        tolerance = 1e-5 if person == "obama" else 0.06
        assert float(np.linalg.norm(row - fresh.embedding)) < tolerance
        assert float(np.linalg.norm(row - old)) > 0  # really made again, not relabelled
    assert by_person["damon"].encoder_fingerprint == OLD  # untouched, still reported

    # a second run finds nothing more it can do, and changes nothing
    code, out, err = cli.json("reencode", "--no-publish")
    assert code == EXIT_PARTIAL and out[0]["reencode"]["reencoded"] == {"photo": 0, "chip": 0}


def test_an_unknown_site_is_a_clear_error(cli: Cli):
    code, _, err = cli("reencode", "--site", "nowhere")
    assert code == EXIT_FATAL and "nowhere" in err and "Traceback" not in err
