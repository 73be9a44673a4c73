"""Enrollment on real photos: accepted templates, specific rejections, duplicates and duplicate identities."""

from pathlib import Path

import cv2
import facesets
import numpy as np
import pytest
from PIL import Image

from enrollment_server.config import EnrollmentSection
from enrollment_server.enrollment import Enroller, import_folder
from enrollment_server.store import Store
from models.errors import ConflictError, ImageError
from models.face import quality as q
from models.face.pipeline import FacePipeline
from models.imageio import load_image


def _blob(p: Path) -> tuple[str, bytes]:
    return (p.name, p.read_bytes())


@pytest.fixture(scope="module")
def pipe() -> FacePipeline:
    return FacePipeline.create()


@pytest.fixture
def enroller(tmp_path, pipe):
    store = Store.open(str(tmp_path / "server.db"))
    try:
        yield Enroller(store, pipe, EnrollmentSection())
    finally:
        store.close()


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_enroll_accepts_good_photos_and_says_why_others_fail(enroller):
    good = [_blob(p) for p in facesets.photos("Jennifer_Aniston")[:3]]
    sharp = load_image(facesets.photos("Jennifer_Aniston")[4])
    # out of focus relative to the face's size: the gate measures the aligned chip, not the raw photo
    blurred = _png(cv2.GaussianBlur(sharp, (0, 0), sharp.shape[1] / 100))
    photos = [
        *good,
        ("blurred.png", blurred),
        ("empty.jpg", b""),
        ("grey.png", _png(np.full((200, 200, 3), 90, np.uint8))),
    ]
    report = enroller.enroll("jen", "Jennifer Aniston", "hq", photos)
    by_source = {r.source: r for r in report.results}
    assert report.person_created and report.added >= 2
    assert by_source["blurred.png"].reason == q.TOO_BLURRED
    assert by_source["empty.jpg"].reason == q.UNREADABLE and "empty" in by_source["empty.jpg"].message
    assert by_source["grey.png"].reason == q.NO_FACE
    assert [r.source for r in report.results] == [s for s, _ in photos]  # one verdict per photo, in order
    stored = enroller.store.list_templates(person_id="jen")
    assert len(stored) == report.added and all(t.encoder_fingerprint == enroller.fingerprint for t in stored)


def test_a_portrait_with_a_small_face_behind_enrolls_its_subject_and_says_so(enroller):
    """Issue 13: the dominant face is enrolled (its embedding, its chip), and the verdict says the gate chose it."""
    portrait = load_image(facesets.photos("Barack_Obama")[0])
    h, w = portrait.shape[:2]
    canvas = np.zeros((h, w + w // 3, 3), np.uint8)
    canvas[:, :w] = portrait
    behind = load_image(facesets.photos("Angelina_Jolie")[0])
    canvas[h // 3 : h // 3 + h // 3, w : w + w // 3] = cv2.resize(
        behind, (w // 3, h // 3), interpolation=cv2.INTER_AREA
    )
    report = enroller.enroll("obama", "Barack Obama", "hq", [("crowd.png", _png(canvas))])
    (result,) = report.results
    assert result.accepted and result.message == "enrolled (the largest of 2 faces)"
    (alone,) = enroller.pipeline.embed(portrait)
    (stored,) = enroller.store.list_templates(person_id="obama")
    assert float(np.linalg.norm(stored.embedding - alone.embedding)) < 0.1


def test_the_same_image_again_is_a_duplicate(enroller):
    photo = _blob(facesets.photos("Barack_Obama")[0])
    assert enroller.enroll("obama", "Barack Obama", "hq", [photo]).added == 1
    again = enroller.enroll("obama", "Barack Obama", "hq", [photo, ("copy.png", _png(load_image(photo[1])))])
    assert [r.reason for r in again.results] == [q.DUPLICATE_TEMPLATE, q.DUPLICATE_TEMPLATE]
    assert not again.person_created and len(enroller.store.list_templates(person_id="obama")) == 1


def test_a_new_person_who_looks_like_someone_enrolled_is_flagged(enroller):
    obama = facesets.photos("Barack_Obama")
    enroller.enroll("obama", "Barack Obama", "hq", [_blob(obama[0])])
    report = enroller.enroll("b-obama-2", "B. Obama", "hq", [_blob(obama[2])])
    assert not report.person_created and report.added == 0
    (flag,) = report.results
    assert flag.reason == q.PROBABLE_DUPLICATE_IDENTITY and flag.matched_person == "obama" and flag.distance < 0.5
    with pytest.raises(Exception, match="no person"):
        enroller.store.get_person("b-obama-2")
    forced = enroller.enroll("b-obama-2", "B. Obama", "hq", [_blob(obama[2])], allow_duplicate_identity=True)
    assert forced.person_created and forced.added == 1
    # a genuinely different person is not flagged
    assert enroller.enroll(
        "angelina", "Angelina Jolie", "hq", [_blob(facesets.photos("Angelina_Jolie")[0])]
    ).person_created


def test_a_person_belongs_to_one_site(enroller):
    enroller.enroll("obama", "Barack Obama", "hq", [_blob(facesets.photos("Barack_Obama")[0])])
    with pytest.raises(ConflictError, match="site 'hq'"):
        enroller.enroll("obama", "Barack Obama", "branch", [_blob(facesets.photos("Barack_Obama")[1])])


def test_folder_import(enroller, tmp_path):
    root = tmp_path / "people"
    for person in ("Elon_Musk", "Jack_Dorsey", "Sundar_Pichai"):
        (root / person).mkdir(parents=True)
        for p in facesets.photos(person)[:2]:
            (root / person / p.name).write_bytes(p.read_bytes())
    (root / "Sundar_Pichai" / "notes.txt").write_text("ignored: not an image")
    seen = []
    reports = import_folder(enroller, root, "hq", progress=seen.append)
    assert [r.person_id for r in reports] == ["Elon_Musk", "Jack_Dorsey", "Sundar_Pichai"]
    assert all(r.added >= 1 for r in reports) and sum(seen) == 6
    assert enroller.store.get_person("Jack_Dorsey").display_name == "Jack Dorsey"
    with pytest.raises(ImageError, match="not a folder"):
        import_folder(enroller, tmp_path / "absent", "hq")


def _demo(person: str, photo: str) -> tuple[str, bytes]:
    [path] = [p for p in facesets.photos(person) if p.name == photo]
    return (f"{person}/{photo}", path.read_bytes())


def test_photos_added_to_an_existing_person_are_checked_against_everyone(enroller):
    """A mixed-up upload must not enrol someone else under an existing person's name: neither a person enrolled
    under another id (the duplicate-identity check new people get) nor a stranger nobody enrolled."""
    assert enroller.enroll("obama", "Barack Obama", "hq", [_demo("Barack_Obama", "1.jpg")]).added == 1
    assert enroller.enroll("musk", "Elon Musk", "hq", [_demo("Elon_Musk", "1.jpg")]).added == 1

    report = enroller.enroll(
        "obama",
        "Barack Obama",
        "hq",
        [_demo("Barack_Obama", "2.jpg"), _demo("Elon_Musk", "2.jpg"), _demo("Mark_Zuckerberg", "1.jpg")],
    )
    by_source = {r.source: r for r in report.results}
    assert by_source["Barack_Obama/2.jpg"].accepted  # the person's own new photo still goes in
    musk = by_source["Elon_Musk/2.jpg"]
    assert musk.reason == q.PROBABLE_DUPLICATE_IDENTITY and musk.matched_person == "musk" and musk.distance < 0.5
    stranger = by_source["Mark_Zuckerberg/1.jpg"]
    assert stranger.reason == q.NOT_THIS_PERSON and stranger.distance > 0.6 and "obama" in stranger.message
    assert report.added == 1 and len(enroller.store.list_templates(person_id="obama")) == 2

    # the admin may insist (twins, a photo from decades ago): the same override as for a new person
    forced = enroller.enroll(
        "obama", "Barack Obama", "hq", [_demo("Mark_Zuckerberg", "1.jpg")], allow_duplicate_identity=True
    )
    assert forced.added == 1 and len(enroller.store.list_templates(person_id="obama")) == 3
