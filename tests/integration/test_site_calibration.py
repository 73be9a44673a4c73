"""`enrollment-server calibrate`: a site's own decision rule, fitted on its people and its unknown faces, stored
(schema 4) and carried by the next gallery manifest; on SQLite and PostgreSQL, with a real Mosquitto."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import MosquittoBroker
from storedb import Db
from test_server_cli import SITE, Cli, photos

from enrollment_server import components as c
from enrollment_server import store as st
from enrollment_server.cli import EXIT_FATAL, EXIT_OK
from enrollment_server.config import load_config
from models.contract.gallery import GalleryManifest, SiteDecision
from models.decision.rules import DecisionRule, Neighbours

DIM = 128


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], mosquitto: MosquittoBroker, db: Db) -> Cli:
    cli = Cli(tmp_path, capsys, mosquitto.url)
    cli.db = db.url  # type: ignore[assignment]  # SQLite file or PostgreSQL schema
    cli.write_config(mosquitto.url)
    code, _, err = cli.json("init")
    assert code == EXIT_OK, err
    return cli


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def generate_site(
    config: Path,
    database: str,
    *,
    people: int,
    second_photos: int,
    unknown: int,
    seed: int = 0,
    site: str = SITE,
    unknown_radius: float = 0.32,
) -> str:
    """Synthetic dlib-like faces: a person's photos lie about 0.25 apart, different people about 0.5 (their
    centres 0.32 from the origin in random directions), so strangers come under the encoder's 0.5 cap and the
    rule's threshold has to tell them apart. A larger `unknown_radius` puts the unknown faces beyond the cap, as
    the faces a door rejected are."""
    fingerprint = c.fingerprint(load_config(str(config)))
    rng = np.random.default_rng(seed)
    centres = np.concatenate([0.32 * _unit(rng, people), unknown_radius * _unit(rng, unknown)])
    store = st.Store.open(database)
    try:
        store.ensure_site(site)
        for i in range(people):
            person = f"p{i:03d}"
            store.add_person(person, site, f"Person {i}")
            for k in range(2 if i < second_photos else 1):
                face = centres[i] + 0.25 * _unit(rng, 1)[0] / np.sqrt(2)
                store.add_template(
                    person, face.astype(np.float32), encoder_fingerprint=fingerprint, image_sha256=f"{i:060d}{k:04d}"
                )
        t0 = datetime.now(timezone.utc) - timedelta(hours=1)
        for j in range(unknown):
            face = centres[people + j] + 0.25 * _unit(rng, 1)[0] / np.sqrt(2)
            store.add_unknown_face(
                st.UnknownFace(
                    face_id=str(uuid.uuid4()), site_id=site, device_id="door-1", camera="entrance", track_id=j,
                    ts=t0 + timedelta(seconds=j), embedding=face.astype(np.float32), fingerprint=fingerprint,
                    gallery_version=1, distance=0.8, quality=0.9,
                ),
                b"\xff\xd8 crop",
            )  # fmt: skip
    finally:
        store.close()
    return fingerprint


def stored_rule(cli: Cli) -> st.SiteRule | None:
    with st.Store.open(str(cli.db)) as store:
        return store.site_rule(SITE)


def latest_manifest(cli: Cli) -> GalleryManifest:
    with st.Store.open(str(cli.db)) as store:
        latest = store.latest_gallery_version(SITE)
    assert latest is not None
    # the recorded text is the manifest exactly as signed and sent (GalleryPublisher)
    return GalleryManifest.from_json(latest.manifest_json.encode())


def test_calibrate_refuses_too_little_data_and_says_what_is_missing(cli: Cli):
    generate_site(cli.config, str(cli.db), people=12, second_photos=5, unknown=30)
    code, out, err = cli("calibrate", "--apply")
    assert code == EXIT_FATAL and out == []
    assert "site hq cannot be calibrated" in err and "Traceback" not in err
    assert "10 genuine probes" in err and "at least 20 needed" in err  # both templates of each of 5 people
    assert "47 strangers (30 unknown faces from the doors + 17 leave-one-out; at least 100 needed at FPIR 0.01" in err
    assert stored_rule(cli) is None  # nothing stored
    # a stricter target needs more strangers, and says how many
    code, _, err = cli("calibrate", "--fpir", "0.001")
    assert code == EXIT_FATAL and "at least 1000 needed at FPIR 0.001" in err
    code, _, err = cli("calibrate", "--site", "nowhere")
    assert code == EXIT_FATAL and "no site 'nowhere'" in err
    code, _, err = cli("calibrate", "--fpir", "1.5")
    assert code == EXIT_FATAL and "the target FPIR must be a rate in (0, 1)" in err


def test_calibrate_apply_publish_and_reset(cli: Cli):
    fingerprint = generate_site(cli.config, str(cli.db), people=80, second_photos=40, unknown=60)
    code, out, err = cli.json("calibrate", "--rule", "ratio")
    assert code == EXIT_OK, err
    [fit] = out
    assert (fit["people"], fit["genuine_probes"], fit["strangers"]) == (80, 80, 60 + 120)
    assert (fit["unknown_faces"], fit["leave_one_out"], fit["fingerprint"]) == (60, 120, fingerprint)
    assert fit["decision"]["rule"] == "ratio" and fit["decision"]["max_distance"] == 0.5  # the encoder's cap kept
    assert 0 < fit["decision"]["threshold"] < 1 and fit["fpir"] <= 0.01 and fit["resolvable"] is True
    assert fit["strangers_accepted"] <= 1 and fit["dir"] > 0.8
    assert fit["applied"] is False and "run again with --apply" in err
    assert stored_rule(cli) is None

    code, out, err = cli.json("calibrate", "--rule", "ratio", "--apply", "--no-publish")
    assert code == EXIT_OK, err
    rule = stored_rule(cli)
    assert rule is not None and rule.fingerprint == fingerprint
    assert rule.decision.rule.to_dict() == out[0]["decision"] and rule.fpir == out[0]["fpir"]
    assert (rule.decision.people, rule.decision.probes, rule.decision.strangers) == (80, 80, 180)
    assert rule.decision.target_fpir == 0.01 and rule.dir == out[0]["dir"]

    code, out, err = cli.json("publish")
    assert code == EXIT_OK, err
    manifest = latest_manifest(cli)
    assert manifest.version == out[0]["gallery"]["version"] and manifest.site_decision == rule.decision

    # calibrating again on the same data and applying is a new publication carrying the new date
    code, out, err = cli.json("calibrate", "--rule", "ratio", "--apply")
    assert code == EXIT_OK, err
    again = latest_manifest(cli)
    assert again.version > manifest.version and again.site_decision is not None
    assert again.site_decision.rule == rule.decision.rule

    code, out, err = cli.json("calibrate", "--reset")
    assert code == EXIT_OK, err
    assert out[0] == {"site": SITE, "decision": "encoder default", "was_calibrated": True}
    assert stored_rule(cli) is None
    reset = latest_manifest(cli)
    assert reset.version > again.version and reset.site_decision is None
    assert "decision" not in json.loads(reset.to_json())
    code, out, _ = cli.json("calibrate", "--reset")  # nothing to reset: nothing published
    assert code == EXIT_OK and out[0]["was_calibrated"] is False and latest_manifest(cli).version == reset.version


def test_a_rule_of_another_encoder_is_not_published(cli: Cli):
    generate_site(cli.config, str(cli.db), people=80, second_photos=40, unknown=60)
    assert cli.json("calibrate", "--apply", "--no-publish")[0] == EXIT_OK
    with st.Store.open(str(cli.db)) as store:
        rule = store.site_rule(SITE)
        assert rule is not None
        store.set_site_rule(st.SiteRule(SITE, "another-encoder", rule.decision, rule.fpir, rule.dir))
    code, _, err = cli.json("publish")
    assert code == EXIT_OK, err
    assert latest_manifest(cli).site_decision is None  # the edges keep their encoder's default


def test_enrolment_flags_a_face_the_sites_rule_would_let_in_as_someone_else(cli: Cli):
    """Real photos: Angelina Jolie is not Barack Obama by the duplicate-identity distance, but a (deliberately
    lenient) site rule that would let her in as him at the door makes her a probable duplicate of him."""
    obama = photos("Barack_Obama")[0]
    code, _, err = cli.json("enroll", "--person-id", "obama", "--name", "Obama", obama, "--no-publish")
    assert code == EXIT_OK, err
    fingerprint = c.fingerprint(load_config(str(cli.config)))
    lenient = SiteDecision(DecisionRule.distance(0.99), 0.01, 2, 20, 100, "2026-12-06T10:00:00Z")
    with st.Store.open(str(cli.db)) as store:
        store.set_site_rule(st.SiteRule(SITE, fingerprint, lenient, 0.01, 0.9))
    jolie = ("enroll", "--person-id", "jolie", "--name", "Jolie", photos("Angelina_Jolie")[0], "--no-publish")
    code, out, err = cli.json(*jolie)
    [verdict] = out[0]["photos"]
    assert code == EXIT_FATAL and verdict["reason"] == "probable_duplicate_identity", (out, err)
    assert verdict["matched_person"] == "obama" and 0.5 < verdict["distance"] < 0.99
    assert cli.json("calibrate", "--reset", "--no-publish")[0] == EXIT_OK
    code, out, err = cli.json(*jolie)
    assert code == EXIT_OK and out[0]["added"] == 1, (out, err)


def leave_one_out_accepted(cli: Cli, fingerprint: str, rule: DecisionRule) -> tuple[int, int]:
    """(accepted, strangers): each template against the whole gallery without its person, as a door sees a person
    who is not enrolled; worked out here independently of enrollment_server.site_calibration."""
    with st.Store.open(str(cli.db)) as store:
        data = store.site_embeddings(SITE, fingerprint)
    labels = np.array(data.labels, dtype=object)
    accepted = 0
    for face, person in zip(data.embeddings, labels, strict=True):
        others = labels != person
        nb = Neighbours.from_embeddings(face, data.embeddings[others], labels[others])
        accepted += int(rule.accepts(nb)[0])
    return accepted, len(labels)


def test_the_threshold_is_fitted_on_strangers_no_door_filtered(cli: Cli):
    """The doors' unknown faces are those the rule in force rejected (here all beyond the cap): counted with the
    site's own people they would dilute the look-alikes and loosen the threshold. They only constrain it."""
    fingerprint = generate_site(cli.config, str(cli.db), people=80, second_photos=40, unknown=600, unknown_radius=1.0)
    code, out, err = cli.json("calibrate", "--rule", "ratio")
    assert code == EXIT_OK, err
    [fit] = out
    assert (fit["unknown_faces"], fit["leave_one_out"], fit["strangers"]) == (600, 120, 720)
    accepted, strangers = leave_one_out_accepted(cli, fingerprint, DecisionRule.from_dict(fit["decision"]))
    assert strangers == 120 and accepted <= 1  # 1 % of the people no door filtered, not 1 % of 720
    fitted = fit["fitted"]
    assert fitted["unknown_faces"] > fitted["leave_one_out"] == fit["decision"]["threshold"]  # the stricter kept


def test_a_rule_looser_than_the_one_in_force_is_flagged_and_recalibration_does_not_drift(cli: Cli):
    fingerprint = generate_site(cli.config, str(cli.db), people=80, second_photos=40, unknown=60)
    strict = SiteDecision(DecisionRule.ratio(0.2, max_distance=0.5), 0.001, 80, 80, 180, "2026-12-06T10:00:00Z")
    with st.Store.open(str(cli.db)) as store:
        store.set_site_rule(st.SiteRule(SITE, fingerprint, strict, 0.0, 0.1))
    code, out, err = cli.json("calibrate", "--rule", "ratio", "--apply", "--no-publish")
    assert code == EXIT_OK, err
    [fit] = out
    assert fit["in_force"] == {"source": "site", "decision": strict.rule.to_dict(), "strangers_accepted": 0}
    assert fit["strangers_accepted"] > 0 and fit["looser_than_in_force"] is True
    assert "warning: the fitted rule accepts" in err and "applying it loosens the doors" in err
    # the same faces again: the rule now in force is the one fitted, and the fit stays where it was
    code, out, err = cli.json("calibrate", "--rule", "ratio")
    assert code == EXIT_OK, err
    assert out[0]["decision"] == fit["decision"] and out[0]["looser_than_in_force"] is False
    assert out[0]["in_force"]["source"] == "site" and "loosens" not in err


def test_a_photo_added_to_an_enrolled_person_is_checked_as_a_door_would(cli: Cli):
    """With a (deliberately lenient) site rule, Obama's second photo is still nearest Obama: a door would let him
    in as himself, so it is no one else's face and is added; Jolie's photo added to him is still hers."""
    obama, jolie = photos("Barack_Obama"), photos("Angelina_Jolie")
    for person, photo in (("obama", obama[0]), ("jolie", jolie[0])):
        code, _, err = cli.json("enroll", "--person-id", person, "--name", person, photo, "--no-publish")
        assert code == EXIT_OK, err
    fingerprint = c.fingerprint(load_config(str(cli.config)))
    lenient = SiteDecision(DecisionRule.distance(0.99), 0.01, 2, 20, 100, "2026-12-06T10:00:00Z")
    with st.Store.open(str(cli.db)) as store:
        store.set_site_rule(st.SiteRule(SITE, fingerprint, lenient, 0.01, 0.9))
    code, out, err = cli.json("enroll", "--person-id", "obama", "--name", "obama", obama[1], "--no-publish")
    assert code == EXIT_OK and out[0]["added"] == 1, (out, err)
    code, out, err = cli.json("enroll", "--person-id", "obama", "--name", "obama", jolie[1], "--no-publish")
    [verdict] = out[0]["photos"]
    assert verdict["reason"] == "probable_duplicate_identity" and verdict["matched_person"] == "jolie", (out, err)
