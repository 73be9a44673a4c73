"""dlib's 5-point face landmarker (an ERT cascade) and its face-chip geometry, in numpy, without dlib.

The encoder is dlib's ResNet and must see the chips dlib itself would cut, to a fraction of a pixel: dlib's
pipeline is HOG box -> `shape_predictor` (5 points) -> `get_face_chip_details(shape, 150, 0.25)` -> ResNet. This
module reproduces the middle two steps exactly:

* `load_shape_predictor` reads `shape_predictor_5_face_landmarks.dat` (from the face-recognition-models wheel;
  sha256 pinned) into numpy arrays, one set per cascade level;
* `predict` / `predict_5` run dlib's `shape_predictor::operator()` bit for bit (same float32 arithmetic, same
  rounding of feature pixel positions, same order of leaf additions);
* `dlib_chip_transform` is `get_face_chip_details` followed by `get_mapping_to_chip`, as a 2x3 image->chip matrix;
* `rect_from_detection` predicts, from our RetinaFace box and landmarks, the rect dlib's HOG detector would have
  given, since the cascade's answer depends (slightly) on the rect it starts from.

The file format (dlib/image_processing/shape_predictor.h, dlib/serialize.h, dlib/matrix/matrix.h): a version int
(1), initial_shape (matrix<float,0,1>: nr and nc written negated, then nr*nc floats), forests
(vector<vector<regression_tree>>; a tree is vector<split_feature{ulong idx1, ulong idx2, float thresh}> then
vector<matrix<float,0,1>> leaf values), anchor_idx (vector<vector<ulong>>) and deltas
(vector<vector<vector<float,2>>>, x then y). Vectors are a size then their items. Every one of those is a dlib
integer (a float is two: mantissa and exponent), so the whole file is one run of dlib integers; with ~2 million of
them, the run is tokenised with numpy (`_scan_fast`, ~0.2 s); `_scan_slow`, one models.face.dlib_format `Reader.int`
at a time (~5 s), is its reference in the tests and its fallback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from models.errors import ImageError, ModelError, ModelFormatError
from models.face.dlib_format import _EXP_INF, Reader
from models.registry import SHAPE_PREDICTOR, read_verified

log = logging.getLogger(__name__)

_SHAPE_PREDICTOR_VERSION = 1
# a sanity bound on any count in the file: the 68-point model has ~25 k nodes per level, nothing is near 2**24
_MAX_COUNT = 1 << 24

# dlib's 5-point mean face for get_face_chip_details (dlib/image_transforms/interpolation.h; checked against
# dlib-bin 20.0.1 to 1e-12 by the tests), in the shape predictor's part order: 0/1 the outer/inner corner of the
# eye on the image's right, 2/3 the outer/inner corner of the other eye, 4 the base of the nose.
MEAN_FACE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)


# ---------------------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, eq=False)
class CascadeLevel:
    """One level of the cascade: its feature pixels and its trees, stacked so all trees run at once."""

    anchor_idx: np.ndarray  # int64 [n_features]: the part each feature pixel hangs off
    deltas: np.ndarray  # float32 [n_features, 2]: its offset from that part, in normalised shape space
    split_idx1: np.ndarray  # int64 [n_trees, n_splits]: node i splits on f[idx1] - f[idx2] > thresh
    split_idx2: np.ndarray  # int64 [n_trees, n_splits]
    split_thresh: np.ndarray  # float32 [n_trees, n_splits]
    leaves: np.ndarray  # float32 [n_trees, n_leaves, 2 * n_parts]: shape increments (x0, y0, x1, y1, ...)

    @property
    def n_trees(self) -> int:
        return int(self.split_idx1.shape[0])

    @property
    def depth(self) -> int:
        return int(self.leaves.shape[1]).bit_length() - 1


@dataclass(frozen=True, eq=False)
class ShapePredictorModel:
    initial_shape: np.ndarray  # float32 [n_parts, 2], in the rect's normalised (0..1) coordinates
    levels: tuple[CascadeLevel, ...]

    @property
    def n_parts(self) -> int:
        return int(self.initial_shape.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Tokenising: the whole file is a run of dlib integers


def _fail(offset: int, expected: str) -> ModelFormatError:
    return ModelFormatError(f"dlib shape predictor: at byte {offset}: expected {expected}")


def _scan_slow(data: bytes, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Byte offset and value of every dlib integer from `start` to the end, one `Reader.int` at a time.

    The reference for `_scan_fast`, and the path that names the exact offset of a malformed byte.
    """
    r = Reader(data, start)
    offsets: list[int] = []
    values: list[int] = []
    while r.remaining:
        at = r.offset
        if data[at] & 0x70 or data[at] & 0x0F > 8:
            raise _fail(
                at, f"a dlib integer control byte (byte count <= 8, | 0x80 if negative), found 0x{data[at]:02x}"
            )
        value = r.int()
        if not -(2**63) <= value < 2**63:
            raise _fail(at, f"an integer within int64, found {value}")
        offsets.append(at)
        values.append(value)
    return np.asarray(offsets, dtype=np.int64), np.asarray(values, dtype=np.int64)


def _scan_fast(
    data: bytes, start: int = 0, chunk: int = 2048, overlap: int = 384
) -> tuple[np.ndarray, np.ndarray] | None:
    """`_scan_slow`, vectorised; None only if a walker failed to synchronise (the caller retries or falls back).

    Token boundaries are sequential (each control byte says how far the next one is), so walkers are started in
    parallel, one per `chunk` bytes, `overlap` bytes before their chunk: a walker that starts mid-token soon lands on
    a true boundary (within 150 bytes everywhere in the 5-point model) and from there follows the true chain. Each
    chunk keeps its own walker's positions; the joined chain is then verified link by link, so a walker that failed
    to synchronise can only cause a retry, never a wrong answer. Malformed bytes raise as `_scan_slow` would.
    """
    n = len(data)
    if n <= start:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if n >= 2**31 - 16:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    # distance from each byte to the next control byte, were it one; past the end walkers park (a step is <= 16)
    step = np.zeros(n + 16, dtype=np.uint8)
    step[start:n] = 1 + (buf[start:] & 0x0F)

    starts = np.arange(start, n, chunk, dtype=np.int32)
    ends = np.minimum(starts + chunk, n).astype(np.int32)
    pos = np.maximum(starts - overlap, start).astype(np.int32)
    trail = [pos]
    while True:
        for _ in range(32):
            pos = pos + step[pos]
            trail.append(pos)
        if (pos >= ends).all():
            break
    walk = np.stack(trail, axis=1)  # [walkers, steps], strictly increasing until parked at or past the end
    offsets = walk[(walk >= starts[:, None]) & (walk < ends[:, None])]  # walker by walker: sorted
    if offsets.size == 0 or offsets[0] != start:
        return None
    following = offsets + step[offsets]  # int32
    if (following[:-1] != offsets[1:]).any():
        return None  # a walker had not synchronised by its chunk: retry with more overlap
    # the chain is now exactly the one Reader.int would walk: report its first bad token as Reader would
    ctl = buf[offsets]
    size = (ctl & 0x0F).astype(np.intp)
    bad = np.flatnonzero((ctl & 0x70) | (size > 8))
    if bad.size:
        at = int(offsets[bad[0]])
        raise _fail(at, f"a dlib integer control byte (byte count <= 8, | 0x80 if negative), found 0x{data[at]:02x}")
    if following[-1] != n:
        at = int(offsets[-1])
        raise _fail(at, f"the {int(size[-1])} value bytes of an integer, found {n - at - 1} left")
    # little-endian magnitude: the 8 bytes after each control byte read as one unaligned uint64, masked to `size`
    padded = np.zeros(n + 9, dtype=np.uint8)
    padded[:n] = buf
    words = np.ndarray(shape=(n,), dtype="<u8", buffer=padded.data, offset=1, strides=(1,))
    mask = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)
    magnitude = words[offsets] & mask[size]
    big = np.flatnonzero(magnitude >= np.uint64(1 << 63))
    if big.size:
        raise _fail(int(offsets[big[0]]), f"an integer within int64, found magnitude {int(magnitude[big[0]])}")
    values = magnitude.astype(np.int64)
    negative = (ctl & 0x80) != 0
    values[negative] = -values[negative]
    return offsets.astype(np.int64), values


def _scan(data: bytes, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    for overlap in (384, 4096):
        fast = _scan_fast(data, start, overlap=overlap)
        if fast is not None:
            return fast
    return _scan_slow(data, start)  # not expected to be reached: it is ~20x slower


class _Tokens:
    """A cursor over the scanned integers; every read names the byte offset of what it expected on failure."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray, end: int) -> None:
        self.offsets = offsets
        self.values = values
        self.end = end  # byte length of the file, reported when the tokens run out
        self.pos = 0

    def offset(self, index: int | None = None) -> int:
        i = self.pos if index is None else index
        return int(self.offsets[i]) if i < len(self.offsets) else self.end

    def need(self, count: int, what: str) -> None:
        if self.pos + count > len(self.values):
            raise _fail(self.end, f"{what} ({count} integers), found the end of the file")

    def int(self, what: str) -> int:
        self.need(1, what)
        value = int(self.values[self.pos])
        self.pos += 1
        return value

    def count(self, what: str, *, expect: int | None = None) -> int:
        at = self.offset()
        value = self.int(what)
        if not 0 <= value <= _MAX_COUNT or (expect is not None and value != expect):
            wanted = f"{expect}" if expect is not None else f"a count in 0..{_MAX_COUNT}"
            raise _fail(at, f"{what} = {wanted}, found {value}")
        return value

    def take(self, count: int, what: str) -> tuple[np.ndarray, int]:
        """The next `count` integers and the token index of the first."""
        self.need(count, what)
        first = self.pos
        self.pos += count
        return self.values[first : first + count], first

    def matrix_dims(self, what: str) -> tuple[int, int]:
        """A matrix header: nr, nc, written negated by dlib >= 18.x (positive in the older format)."""
        at = self.offset()
        nr, nc = self.int(f"the rows of {what}"), self.int(f"the columns of {what}")
        if (nr < 0) != (nc < 0) or nr == 0 or abs(nr) > _MAX_COUNT or abs(nc) > _MAX_COUNT:
            raise _fail(at, f"the dimensions of {what} (two negated sizes), found {nr}, {nc}")
        return abs(nr), abs(nc)

    def floats(self, count: int, what: str) -> np.ndarray:
        pairs, first = self.take(2 * count, f"{count} floats of {what}")
        return _decode_floats(pairs.reshape(count, 2), self.offsets[first : first + 2 * count : 2], what)


def _decode_floats(pairs: np.ndarray, offsets: np.ndarray, what: str) -> np.ndarray:
    """[..., 2] (mantissa, exponent) integer pairs -> float32, as dlib's float_details; non-finite is refused."""
    mantissa, exponent = pairs[..., 0], pairs[..., 1]
    bad = (np.abs(exponent) >= _EXP_INF) | (np.abs(mantissa) >= (1 << 53))
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        raise _fail(
            int(offsets.reshape(-1)[i]),
            f"a finite float in {what}, found mantissa {int(mantissa.reshape(-1)[i])} exponent "
            f"{int(exponent.reshape(-1)[i])}",
        )
    value = np.ldexp(mantissa.astype(np.float64), exponent.astype(np.int32))
    with np.errstate(over="ignore"):
        out = value.astype(np.float32)
    if not np.isfinite(out).all():
        i = int(np.flatnonzero(~np.isfinite(out).reshape(-1))[0])
        raise _fail(int(offsets.reshape(-1)[i]), f"a float32-representable value in {what}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The structure


def _read_forest(t: _Tokens, level: int, n_parts: int) -> tuple[np.ndarray, ...]:
    """One level's trees, parsed as a block: every tree must be complete and shaped like the first.

    Returns split idx1, idx2, thresh [T, S], leaves [T, L, 2P] and the byte offset of each split [T, S].
    """
    n_trees = t.count(f"the tree count of level {level}")
    if n_trees == 0:
        raise _fail(t.offset(), f"at least one tree in level {level}")
    head = t.pos
    n_splits = t.count(f"the split count of level {level} tree 0")
    t.need(4 * n_splits + 1, f"the splits of level {level} tree 0")
    n_leaves = int(t.values[head + 1 + 4 * n_splits])
    if n_leaves != n_splits + 1 or n_leaves & (n_leaves - 1):
        raise _fail(
            t.offset(head + 1 + 4 * n_splits),
            f"a complete tree (leaves = splits + 1, a power of 2) in level {level}, found {n_splits} splits and "
            f"{n_leaves} leaves",
        )
    dim = 2 * n_parts
    leaf_width = 2 + 2 * dim
    width = 1 + 4 * n_splits + 1 + n_leaves * leaf_width
    t.pos = head
    block, first = t.take(n_trees * width, f"{n_trees} trees of level {level}")
    block = block.reshape(n_trees, width)

    def check(column: np.ndarray, expected: np.ndarray | int, cols: int, col0: int, what: str) -> None:
        wrong = column != expected
        if wrong.any():
            tree, k = divmod(int(np.flatnonzero(wrong.reshape(-1))[0]), cols)
            at = t.offset(first + tree * width + col0 + k * (leaf_width if cols > 1 else 0))
            found = int(column.reshape(-1)[tree * cols + k])
            raise _fail(at, f"{what} in level {level} tree {tree} (all trees of a level alike), found {found}")

    check(block[:, 0], n_splits, 1, 0, f"{n_splits} splits")
    check(block[:, 1 + 4 * n_splits], n_leaves, 1, 1 + 4 * n_splits, f"{n_leaves} leaves")
    splits = block[:, 1 : 1 + 4 * n_splits].reshape(n_trees, n_splits, 4)
    leaf_tokens = block[:, 2 + 4 * n_splits :].reshape(n_trees, n_leaves, leaf_width)
    # leaf matrices are dim x 1, dims written negated (dlib >= 18.x) or, in the old format, as is
    sign = -1 if leaf_tokens[0, 0, 0] < 0 else 1
    check(leaf_tokens[:, :, 0], sign * dim, n_leaves, 2 + 4 * n_splits, f"leaf rows {sign * dim}")
    check(leaf_tokens[:, :, 1], sign, n_leaves, 2 + 4 * n_splits + 1, f"leaf columns {sign}")
    split_offsets = t.offsets[first : first + n_trees * width].reshape(n_trees, width)
    thresh = _decode_floats(
        splits[:, :, 2:], split_offsets[:, 3 : 1 + 4 * n_splits : 4], f"the split thresholds of level {level}"
    )
    leaf_offsets = split_offsets[:, 2 + 4 * n_splits :].reshape(n_trees, n_leaves, leaf_width)[:, :, 2::2]
    leaves = _decode_floats(
        leaf_tokens[:, :, 2:].reshape(n_trees, n_leaves, dim, 2), leaf_offsets, f"the leaf values of level {level}"
    )
    idx_offsets = split_offsets[:, 1 : 1 + 4 * n_splits : 4]  # byte offset of each split (its idx1)
    return splits[:, :, 0].copy(), splits[:, :, 1].copy(), thresh, leaves, idx_offsets


def parse_shape_predictor(data: bytes) -> ShapePredictorModel:
    """Parse a serialised dlib::shape_predictor (any number of parts) into numpy arrays."""
    offsets, values = _scan(data)
    t = _Tokens(offsets, values, len(data))
    at = t.offset()
    version = t.int("the shape_predictor version")
    if version != _SHAPE_PREDICTOR_VERSION:
        raise _fail(at, f"shape_predictor version {_SHAPE_PREDICTOR_VERSION}, found {version}")

    at = t.offset()
    nr, nc = t.matrix_dims("initial_shape")
    if nc != 1 or nr % 2 or nr < 4:
        raise _fail(at, f"initial_shape as a column of x, y pairs for >= 2 parts, found {nr} x {nc}")
    n_parts = nr // 2
    initial = t.floats(nr, "initial_shape").reshape(n_parts, 2)

    n_levels = t.count("the number of cascade levels")
    forests = [_read_forest(t, level, n_parts) for level in range(n_levels)]

    t.count("the number of anchor_idx levels", expect=n_levels)
    anchors = []
    for level in range(n_levels):
        n_features = t.count(f"the feature count of level {level}")
        idx, first = t.take(n_features, f"the anchor indices of level {level}")
        bad = (idx < 0) | (idx >= n_parts)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _fail(t.offset(first + i), f"an anchor part index below {n_parts}, found {int(idx[i])}")
        anchors.append(idx.copy())

    t.count("the number of deltas levels", expect=n_levels)
    levels = []
    for level, ((idx1, idx2, thresh, leaves, idx_offsets), anchor) in enumerate(zip(forests, anchors, strict=True)):
        n_features = t.count(f"the delta count of level {level}", expect=len(anchor))
        deltas = t.floats(2 * n_features, f"the deltas of level {level}").reshape(n_features, 2)
        bad = (idx1 < 0) | (idx1 >= n_features) | (idx2 < 0) | (idx2 >= n_features)
        if bad.any():
            tree, k = divmod(int(np.flatnonzero(bad)[0]), idx1.shape[1])
            raise _fail(
                int(idx_offsets[tree, k]),
                f"split feature indices below {n_features} in level {level} tree {tree} split {k}, found "
                f"{int(idx1[tree, k])}, {int(idx2[tree, k])}",
            )
        levels.append(CascadeLevel(anchor, deltas, idx1, idx2, thresh, leaves))
    if t.pos != len(t.values):
        raise _fail(t.offset(), f"the end of the file, found {len(t.values) - t.pos} more integers")
    log.debug("parsed dlib shape predictor: %d parts, %d levels", n_parts, n_levels)
    return ShapePredictorModel(initial, tuple(levels))


@lru_cache(maxsize=1)
def load_shape_predictor() -> ShapePredictorModel:
    """The pinned 5-point model from face-recognition-models, verified and parsed once per process."""
    model = parse_shape_predictor(read_verified(SHAPE_PREDICTOR))
    if model.n_parts != 5:
        raise ModelFormatError(f"{SHAPE_PREDICTOR.name}: expected 5 parts, found {model.n_parts}")
    return model


# ---------------------------------------------------------------------------------------------------------------
# Prediction


def find_similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dlib's find_similarity_transform (Umeyama, in double): 2x2 m and t with dst ~= m @ src + t."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = len(src)
    mean_s, mean_d = src.sum(axis=0) / n, dst.sum(axis=0) / n
    s0, d0 = src - mean_s, dst - mean_d
    sigma = float((s0 * s0).sum()) / n
    cov = d0.T @ s0 / n
    det = cov[0, 0] * cov[1, 1] - cov[0, 1] * cov[1, 0]
    if det > 0:
        # no reflection: c * R has this closed form (the similarity part of cov, rescaled), identical to dlib's
        # SVD route up to rounding (det > 0 implies sigma > 0)
        a, b = cov[0, 0] + cov[1, 1], cov[1, 0] - cov[0, 1]
        m = np.array([[a, -b], [b, a]]) / sigma
    else:
        u, d, vt = np.linalg.svd(cov)
        s = np.ones(2)
        if det < 0 or (det == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
            s[1 if d[1] < d[0] else 0] = -1.0
        c = float((d * s).sum()) / sigma if sigma != 0 else 1.0
        m = c * (u * s) @ vt
    return m, mean_d - m @ mean_s


def _as_rect(rect: Sequence[float]) -> tuple[float, float, float, float]:
    if len(rect) != 4:
        raise ImageError(f"a rect is (left, top, right, bottom), got {rect!r}")
    left, top, right, bottom = (float(v) for v in rect)
    if not (math.isfinite(left + top + right + bottom) and right > left and bottom > top):
        raise ImageError(f"a rect needs right > left and bottom > top, got {rect!r}")
    return left, top, right, bottom


def _intensity_image(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ImageError(f"expected an HxW or HxWx3 uint8 image, got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError("empty image")
    return image


@dataclass(frozen=True, eq=False)
class _LevelPlan:
    """A level's arrays laid out for the vectorised walk (flat, contiguous, with per-tree base offsets)."""

    anchor: np.ndarray  # intp [F]
    dx: np.ndarray  # float32 [F]
    dy: np.ndarray  # float32 [F]
    idx1: np.ndarray  # intp [T * S]
    idx2: np.ndarray  # intp [T * S]
    thresh: np.ndarray  # float32 [T * S]
    split_base: np.ndarray  # intp [T]: t * S
    leaves: np.ndarray  # float32 [T * L, D]
    leaf_base: np.ndarray  # intp [T]: t * L - S (a final node index plus this is the row in `leaves`)
    depth: int


@dataclass(frozen=True, eq=False)
class _Plan:
    levels: tuple[_LevelPlan, ...]
    initial: np.ndarray  # float32 [2P]
    init_centred: np.ndarray  # float64 [P, 2]: initial shape minus its mean (the fixed "from" of every similarity)
    init_sigma: float  # its mean squared norm


@lru_cache(maxsize=4)
def _plan(model: ShapePredictorModel) -> _Plan:
    levels = []
    for level in model.levels:
        t, s = level.split_idx1.shape
        n_leaves = level.leaves.shape[1]
        levels.append(
            _LevelPlan(
                anchor=level.anchor_idx.astype(np.intp),
                dx=np.ascontiguousarray(level.deltas[:, 0]),
                dy=np.ascontiguousarray(level.deltas[:, 1]),
                idx1=level.split_idx1.reshape(-1).astype(np.intp),
                idx2=level.split_idx2.reshape(-1).astype(np.intp),
                thresh=level.split_thresh.reshape(-1).copy(),
                split_base=np.arange(t, dtype=np.intp) * s,
                leaves=level.leaves.reshape(t * n_leaves, -1).copy(),
                leaf_base=np.arange(t, dtype=np.intp) * n_leaves - s,
                depth=level.depth,
            )
        )
    init = model.initial_shape.astype(np.float64)
    centred = init - init.sum(axis=0) / len(init)
    return _Plan(tuple(levels), model.initial_shape.reshape(-1).copy(), centred, float((centred**2).sum()) / len(init))


def _shape_tform(plan: _Plan, current: np.ndarray) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """The 2x2 part of find_tform_between_shapes(initial, current), cast to float32 as dlib does."""
    cur = current.astype(np.float64)
    d0 = cur - cur.sum(axis=0) / len(cur)
    cov = (d0.T @ plan.init_centred / len(cur)).tolist()
    (c00, c01), (c10, c11) = cov
    if c00 * c11 - c01 * c10 > 0:  # the usual case: closed form, see find_similarity_transform
        a, b = (c00 + c11) / plan.init_sigma, (c10 - c01) / plan.init_sigma
        m = ((a, -b), (b, a))
    else:
        m = tuple(map(tuple, find_similarity_transform(plan.init_centred, cur)[0].tolist()))
    f = np.float32
    return f(m[0][0]), f(m[0][1]), f(m[1][0]), f(m[1][1])


def predict(
    model: ShapePredictorModel, image: np.ndarray, rect: Sequence[float], *, subpixel: bool = False
) -> np.ndarray:
    """dlib's shape_predictor(image, rect): the parts as an [n_parts, 2] float64 array of (x, y) image pixels.

    rect is dlib-style (left, top, right, bottom) with inclusive corners; dlib itself only takes integers, floats
    are allowed here. dlib rounds the parts to whole pixels (full_object_detection holds points); so does this
    unless `subpixel`, which returns the cascade's unrounded answer.
    """
    image = _intensity_image(image)
    left, top, right, bottom = _as_rect(rect)
    height, width = image.shape[:2]
    pixels = image.reshape(height * width, -1)
    sx, sy = right - left, bottom - top  # unnormalizing_tform: (0,0)->tl, (1,0)->tr, (1,1)->br
    plan = _plan(model)
    shape = plan.initial.copy()  # float32, x0 y0 x1 y1 ...
    for level in plan.levels:
        current = shape.reshape(-1, 2)
        m00, m01, m10, m11 = _shape_tform(plan, current)
        # tform * delta + location: float32 arithmetic, as dlib's matrix<float> expression
        anchor = current[level.anchor]
        u = m00 * level.dx + m01 * level.dy + anchor[:, 0]
        v = m10 * level.dx + m11 * level.dy + anchor[:, 1]
        # then tform_to_img in double, and the conversion to a point rounds with floor(x + 0.5)
        px = np.floor(sx * u.astype(np.float64) + left + 0.5)
        py = np.floor(sy * v.astype(np.float64) + top + 0.5)
        inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
        outside = ~inside
        flat = (py * width + px).astype(np.intp)
        flat[outside] = 0
        rgb = pixels[flat].astype(np.int16)
        # get_pixel_intensity(rgb_pixel) is the integer mean (r + g + b) / 3; pixels outside the image read as 0
        feats = (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) // 3 if rgb.shape[1] == 3 else rgb[:, 0]
        feats[outside] = 0
        feats = feats.astype(np.float32)

        # every split of every tree at once, then the walk from root to leaf: left (2i+1) when f1 - f2 > thresh
        go_left = (feats[level.idx1] - feats[level.idx2]) > level.thresh
        node = np.zeros(len(level.split_base), dtype=np.intp)
        for _ in range(level.depth):
            node = 2 * node + 2 - go_left[level.split_base + node]
        increments = level.leaves[level.leaf_base + node]  # [n_trees, 2 * n_parts], a fresh array
        # current_shape += tree_i(...) for i in order: sequential float32 sums (a + b == b + a exactly)
        increments[0] += shape
        shape = np.add.reduce(increments, axis=0)

    out = shape.reshape(-1, 2).astype(np.float64)
    out[:, 0] = sx * out[:, 0] + left
    out[:, 1] = sy * out[:, 1] + top
    return out if subpixel else np.floor(out + 0.5)


def predict_5(image_rgb: np.ndarray, rect: Sequence[float], *, subpixel: bool = False) -> np.ndarray:
    """dlib's 5-point landmarks (face_recognition's 'small' model) for the face in rect: [5, 2] (x, y)."""
    return predict(load_shape_predictor(), image_rgb, rect, subpixel=subpixel)


# ---------------------------------------------------------------------------------------------------------------
# Chip geometry


def dlib_chip_transform(parts5: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The 2x3 image->chip matrix of dlib's extract_image_chip(get_face_chip_details(shape, size, padding)).

    get_face_chip_details fits a similarity from the padded mean face (scaled to `size`) onto the parts; the chip
    is then a rect of side size*scale - 1 (centered_drect) around where the chip centre lands, rotated by the
    similarity's angle, whose corners map onto the chip's pixel corners (0,0) .. (size-1, size-1)
    (get_mapping_to_chip). That is again a similarity, computed here directly.
    """
    parts = np.asarray(parts5, dtype=np.float64)
    if parts.shape != (5, 2):
        raise ImageError(f"expected 5 (x, y) parts, got shape {parts.shape}")
    if size < 2 or padding < 0:
        raise ImageError(f"chip size must be >= 2 and padding >= 0, got {size}, {padding}")
    chip_points = (padding + MEAN_FACE_5) / (2 * padding + 1) * size
    m, t = find_similarity_transform(chip_points, parts)  # chip -> image
    px, py = m[0, 0], m[1, 0]  # m @ (1, 0)
    angle = math.atan2(py, px)
    scale = math.hypot(px, py)
    centre = m @ np.array([size / 2.0, size / 2.0]) + t
    side = size * scale - 1.0  # centered_drect(centre, size*scale, size*scale): right - left
    if side <= 0:
        raise ImageError(f"degenerate face parts: chip side {side:.3g} px")
    k = (size - 1) / side
    c, s = math.cos(angle), math.sin(angle)
    rot = k * np.array([[c, s], [-s, c]])  # inverse rotation, scaled
    out = np.empty((2, 3))
    out[:, :2] = rot
    out[:, 2] = (size - 1) / 2.0 - rot @ centre
    return out


# ---------------------------------------------------------------------------------------------------------------
# dlib's HOG rect, predicted from our detection


@dataclass(frozen=True)
class RectModel:
    """rect side = size_coef . (inter-ocular distance, eye-to-mouth distance, box height);
    rect centre = landmarks' mean + centre_offset * side; the rect is square, as dlib's HOG rects are."""

    size_coef: tuple[float, float, float]
    centre_offset: tuple[float, float]
    faces: int = 0  # how many faces it was fitted on


# Fitted by `model-tool fit-alignment` (models/face/template_fit.py, then fit_rect_model) on the 159 faces of
# shared/data/faces where dlib's HOG
# detector (as face_recognition.face_locations runs it: get_frontal_face_detector(), upsample 1) and RetinaFace
# (default DetectorConfig) found the same face and the HOG rect is square (the 7 that are not all reach past the
# border of a 150 x 150 photo, and are left out). HOG rects come in sizes 107.5 * 1.2**k and on a grid of a tenth
# of their size, so their side cannot be predicted much better than this (leave-one-out: 5.5 % median error, 12 %
# p90; centre ~2 % of the side). The cascade nearly absorbs that, but not quite: started from any rect but dlib's
# own, some parts land a pixel off after dlib's rounding, which is what bounds the agreement of the whole chain
# with dlib (median embedding distance 0.045 on the dev set, against 0.020 when started from dlib's own HOG rect).
# Other feature sets (box width and height, a constant) fit no better out of sample.
RECT_MODEL = RectModel(size_coef=(0.6123, 1.1084, 0.2027), centre_offset=(0.001, 0.0074), faces=159)


def _rect_features(bbox: Sequence[float], landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes, mouth = lm[:2].mean(axis=0), lm[3:].mean(axis=0)
    iod = float(np.hypot(*(lm[1] - lm[0])))
    eye_mouth = float(np.hypot(*(mouth - eyes)))
    height = float(bbox[3]) - float(bbox[1])
    return np.array([iod, eye_mouth, height]), lm.mean(axis=0)


def rect_from_detection(
    bbox: Sequence[float], landmarks: np.ndarray, model: RectModel = RECT_MODEL
) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) rect dlib's HOG face detector would likely give for this RetinaFace face."""
    features, centre = _rect_features(bbox, landmarks)
    side = float(features @ np.asarray(model.size_coef))
    if not side > 1:
        raise ImageError(f"degenerate detection: predicted face rect side {side:.3g} px")
    cx = centre[0] + model.centre_offset[0] * side
    cy = centre[1] + model.centre_offset[1] * side
    half = side / 2.0
    return (cx - half, cy - half, cx + half, cy + half)


def fit_rect_model(
    pairs: Sequence[tuple[Sequence[float], Sequence[float], np.ndarray]],
) -> RectModel:
    """Fit RectModel on (hog_rect (l, t, r, b), retinaface bbox (x1, y1, x2, y2), landmarks [5, 2]) triples.

    Side: least squares on the relative error (rows divided by the box's geometric-mean size), without intercept,
    over square HOG rects only (rects reaching past the image border can be taller than wide). Centre
    offset: the median, in units of the true side, of the HOG centre minus the landmarks' mean.
    """
    rows, targets, weights, offsets = [], [], [], []
    for rect, bbox, landmarks in pairs:
        left, top, right, bottom = (float(v) for v in rect)
        side = right - left
        if abs(side - (bottom - top)) > 1 or side <= 0:
            continue
        features, centre = _rect_features(bbox, landmarks)
        rows.append(features)
        targets.append(side)
        weights.append(1.0 / math.sqrt(max(1e-6, (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]))))
        offsets.append((np.array([left + right, top + bottom]) / 2 - centre) / side)
    if len(rows) < 3:
        raise ModelError(f"fit_rect_model needs at least 3 square HOG rects, got {len(rows)}")
    w = np.asarray(weights)[:, None]
    coef, *_ = np.linalg.lstsq(np.asarray(rows) * w, np.asarray(targets) * w[:, 0], rcond=None)
    offset = np.median(np.asarray(offsets), axis=0)
    return RectModel(
        size_coef=(round(float(coef[0]), 4), round(float(coef[1]), 4), round(float(coef[2]), 4)),
        centre_offset=(round(float(offset[0]), 4), round(float(offset[1]), 4)),
        faces=len(rows),
    )
