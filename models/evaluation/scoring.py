"""Evaluation: the shared reference protocol and scorer, re-implemented, plus open-set figures per decision rule.

Three layers:

1. ``build_protocol`` reproduces ``shared/eval/protocol.py`` exactly: same ``random.Random(seed)`` calls in the
   same order, so the same pairs, gallery and probes (tested against the reference script's JSON).
2. ``score`` reproduces ``shared/eval/score.py`` exactly on the same embeddings (same float64 arithmetic, same
   10-fold split from ``default_rng(0)``, same linear-interpolation quantiles, missing faces as distance 1e9),
   so our figures and the peer's are comparable with the figures the reference prints.
3. ``evaluate`` adds what the reference lacks: DIR at fixed FPIR for every rule in ``models.decision.rules``, on
   several stranger sets, a recommended distance threshold (FAR-calibrated and EER), curves, a PNG and a JSON
   summary.

Stranger sets (why more than the protocol's): the development set has only 4 people with a single image, the
protocol's strangers, and FPIR 1e-2 / 1e-3 cannot be measured on 4 strangers (one false accept is 25 %). So:

- ``reference``: the protocol's strangers against the full one-shot gallery (4 on the dev set);
- ``loo``: leave-one-identity-out: for each enrolled identity in turn, remove it from the gallery and present its
  probe as a stranger (against the other enrolled people), plus the protocol's strangers (27 on the dev set);
- ``loo_all``: as ``loo`` but every embedded image of the held-out identity is a stranger, plus every image of
  people not enrolled (170 on the dev set). More strangers, but images of one person are correlated, so the
  effective sample is smaller than the count suggests.

Calibration here is ``models.decision.rules.calibrate``: at most floor(target * n) strangers accepted. The reference's
``np.quantile`` (linear interpolation) instead sits between the two most confident strangers when n < 1 / target,
which accepts one stranger (25 % FPIR on 4 strangers); our distance-rule DIR is therefore lower than the
reference's ``dir_fpir*`` on the same embeddings whenever the target is not resolvable. Every open-set figure
reports how many strangers it rests on and whether the target is resolvable (n * target >= 1). Images whose
embedding is missing stay in the denominators (never accepted, never identified), as in the reference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Final

import numpy as np
from numpy.typing import NDArray

from models.cache import atomic_write_bytes
from models.decision.rules import (
    DecisionRule,
    Neighbours,
    OperatingPoint,
    calibrate,
    dir_fpir_curve,
    pairwise_distances,
)
from models.errors import EvaluationError

log = logging.getLogger(__name__)

DEFAULT_SEED: Final[int] = 65599408
BIG: Final[float] = 1e9  # the reference's distance for a pair with a missing face
DEFAULT_FPIRS: Final[tuple[float, ...]] = (1e-2, 1e-3)
DEFAULT_RULES: Final[tuple[DecisionRule, ...]] = (
    DecisionRule.distance(),
    DecisionRule.ratio(),
    DecisionRule.margin(),
)
STRANGER_SETS: Final[tuple[str, ...]] = ("reference", "loo", "loo_all")
_IMAGE_SUFFIXES: Final[tuple[str, ...]] = (".jpg", ".jpeg", ".png")

# (stage, done, total): long loops report through this as well as through logging
ProgressCallback = Callable[[str, int, int], None]
# A learned dissimilarity (e.g. the siamese verifier's -ln p) in place of the Euclidean distance: rows compared over
# the last axis, leading axes broadcast; lower = more alike, NaN where a face is missing.
PairMetric = Callable[[np.ndarray, np.ndarray], np.ndarray]
Embeddings = Mapping[str, "np.ndarray | None"]


# --- protocol -----------------------------------------------------------------------------------------------------
def load_identities(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Folder-per-identity dataset -> {identity: [relative image paths]}, exactly as the reference's ``load``."""
    root = os.fspath(root)
    ids: dict[str, list[str]] = {}
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            continue
        files = sorted(f for f in os.listdir(d) if f.lower().endswith(_IMAGE_SUFFIXES))
        if files:
            ids[name] = [os.path.join(name, f) for f in files]
    return ids


@dataclass(frozen=True)
class Protocol:
    """Verification pairs and a one-shot open-set identification split (the reference protocol's content).

    ``gallery``: (identity, enrolment image) in the reference's order (sorted identities); ``probes``:
    (image, identity or None for a stranger); ``images``: every image named, sorted.
    """

    genuine: tuple[tuple[str, str], ...]
    impostor: tuple[tuple[str, str], ...]
    gallery: tuple[tuple[str, str], ...]
    probes: tuple[tuple[str, str | None], ...]
    images: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The same structure as the reference's JSON file (after ``json.load``)."""
        return {
            "genuine": [list(p) for p in self.genuine],
            "impostor": [list(p) for p in self.impostor],
            "gallery": dict(self.gallery),
            "probes": [list(p) for p in self.probes],
            "images": list(self.images),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Protocol:
        try:
            return cls(
                genuine=tuple((str(a), str(b)) for a, b in data["genuine"]),
                impostor=tuple((str(a), str(b)) for a, b in data["impostor"]),
                gallery=tuple((str(k), str(v)) for k, v in data["gallery"].items()),
                probes=tuple((str(f), None if p is None else str(p)) for f, p in data["probes"]),
                images=tuple(str(x) for x in data["images"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvaluationError(f"malformed protocol: {exc!r}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Protocol:
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(json.load(fh))

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_bytes(Path(path), json.dumps(self.to_json()).encode("utf-8"))


def build_protocol(
    root: str | os.PathLike[str],
    n_pairs: int = 3000,
    seed: int = DEFAULT_SEED,
    *,
    n_gallery: int = 1000,
    n_strangers: int = 1000,
) -> Protocol:
    """The reference protocol (``shared/eval/protocol.py``'s ``build``), call for call.

    Do not reorder or "simplify" anything below: every ``rng`` call, every ``sorted`` and the set iteration that
    feeds it fix which pairs come out. The only addition is a capacity check *before* the first random call
    (the reference loops forever when fewer distinct pairs exist than asked for).
    """
    ids = load_identities(root)
    multi = sorted(k for k, v in ids.items() if len(v) >= 2)
    single = sorted(k for k, v in ids.items() if len(v) == 1)
    _check_capacity(ids, multi, n_pairs)
    rng = random.Random(seed)
    genuine: set[tuple[str, str]] = set()
    while len(genuine) < n_pairs:
        p = rng.choice(multi)
        a, b = rng.sample(ids[p], 2)
        genuine.add(_pair(a, b))
    impostor: set[tuple[str, str]] = set()
    allp = sorted(ids)
    while len(impostor) < n_pairs:
        p, q = rng.sample(allp, 2)
        impostor.add(_pair(rng.choice(ids[p]), rng.choice(ids[q])))
    gal_ids = sorted(rng.sample(multi, min(n_gallery, len(multi))))
    gallery: dict[str, str] = {}
    probes: list[tuple[str, str | None]] = []
    for p in gal_ids:
        a, b = rng.sample(ids[p], 2)
        gallery[p] = a
        probes.append((b, p))
    for p in rng.sample(single, min(n_strangers, len(single))):
        probes.append((ids[p][0], None))
    images = sorted({x for pr in genuine | impostor for x in pr} | set(gallery.values()) | {x for x, _ in probes})
    return Protocol(
        genuine=tuple(sorted(genuine)),
        impostor=tuple(sorted(impostor)),
        gallery=tuple(gallery.items()),
        probes=tuple(probes),
        images=tuple(images),
    )


def _pair(a: str, b: str) -> tuple[str, str]:
    x, y = sorted((a, b))
    return (x, y)


def _check_capacity(ids: Mapping[str, list[str]], multi: Sequence[str], n_pairs: int) -> None:
    if n_pairs <= 0:
        return
    same = sum(len(v) * (len(v) - 1) // 2 for v in ids.values())
    total = sum(len(v) for v in ids.values())
    cross = total * (total - 1) // 2 - same
    if not multi or same < n_pairs:
        raise EvaluationError(f"only {same} genuine pairs exist in the dataset, {n_pairs} asked for")
    if cross < n_pairs:
        raise EvaluationError(f"only {cross} impostor pairs exist in the dataset, {n_pairs} asked for")


# --- embeddings ---------------------------------------------------------------------------------------------------
def load_embeddings_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray | None]:
    """An .npz in the reference scorer's format (``images``, ``embs``; NaN row = no face) -> {image: row}."""
    with np.load(path) as z:
        images = [str(p) for p in z["images"]]
        embs = np.asarray(z["embs"])
    return {img: embs[i] for i, img in enumerate(images)}


def save_embeddings_npz(path: str | os.PathLike[str] | BinaryIO, embeddings: Embeddings) -> None:
    """{image: row or None} -> the reference scorer's .npz (rows in the mapping's order; dtype kept); `path` may be
    a binary file object."""
    images, matrix = _stack(embeddings, dtype=None)
    np.savez(path, images=np.array(images), embs=matrix)


def _stack(embeddings: Embeddings, dtype: type | None = np.float64) -> tuple[list[str], np.ndarray]:
    images = [str(k) for k in embeddings]
    rows = [None if v is None else np.asarray(v).ravel() for v in embeddings.values()]
    present = [r for r in rows if r is not None]
    dim = present[0].shape[0] if present else 1
    if any(r.shape[0] != dim for r in present):
        raise EvaluationError("embeddings have different dimensions")
    # result_type over the distinct dtypes only: it takes a bounded number of arguments
    out_dtype = dtype or (np.result_type(*{r.dtype for r in present}) if present else np.float64)
    matrix = np.full((len(rows), dim), np.nan, dtype=out_dtype)
    for i, r in enumerate(rows):
        if r is not None:
            matrix[i] = r
    return images, matrix


def _matrix(protocol: Protocol, embeddings: Embeddings, cosine: bool) -> tuple[dict[str, int], np.ndarray, int]:
    """The reference's ``idx``, ``E`` (float64, optionally L2-normalised) and ``missing``."""
    absent = [img for img in protocol.images if img not in embeddings]
    if absent:
        raise EvaluationError(
            f"{len(absent)} protocol image(s) have no entry in the embeddings (use None for 'no face'), "
            f"e.g. {absent[0]!r}"
        )
    images, E = _stack(embeddings)
    if cosine:
        E = E / np.linalg.norm(E, axis=1, keepdims=True)
    missing = int(np.isnan(E).any(axis=1).sum())
    return {p: i for i, p in enumerate(images)}, E, missing


# --- the reference metrics ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceMetrics:
    """``score.py``'s metrics, unrounded; ``rounded()`` gives the reference's JSON line exactly."""

    missing: int
    verif_acc: float
    verif_std: float
    tar_far1e2: float
    tar_far1e3: float
    rank1: float
    dir_fpir1e2: float
    dir_fpir1e3: float

    def rounded(self) -> dict[str, int | float]:
        return {
            "missing": self.missing,
            "verif_acc": round(self.verif_acc, 4),
            "verif_std": round(self.verif_std, 4),
            "tar_far1e2": round(self.tar_far1e2, 4),
            "tar_far1e3": round(self.tar_far1e3, 4),
            "rank1": round(self.rank1, 4),
            "dir_fpir1e2": round(self.dir_fpir1e2, 4),
            "dir_fpir1e3": round(self.dir_fpir1e3, 4),
        }


@dataclass(frozen=True, eq=False)
class _PairDistances:
    genuine: NDArray[np.float64]
    impostor: NDArray[np.float64]


def _pair_distances(
    protocol: Protocol, idx: Mapping[str, int], E: np.ndarray, metric: PairMetric | None = None
) -> _PairDistances:
    if metric is not None:

        def many(pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]:
            ij = np.array([(idx[a], idx[b]) for a, b in pairs], dtype=np.int64).reshape(-1, 2)
            d = np.asarray(metric(E[ij[:, 0]], E[ij[:, 1]]), dtype=np.float64)
            return np.where(np.isnan(d), BIG, d)

        return _PairDistances(many(protocol.genuine), many(protocol.impostor))

    # One np.linalg.norm per pair on 1-D rows, as the reference does: the vectorised axis=1 norm sums in another
    # order, and a last-bit difference could flip a "d <= t" at a threshold that is itself one of the distances.
    def dist(a: str, b: str) -> float:
        d = np.linalg.norm(E[idx[a]] - E[idx[b]])
        return BIG if np.isnan(d) else float(d)

    return _PairDistances(
        np.array([dist(a, b) for a, b in protocol.genuine]),
        np.array([dist(a, b) for a, b in protocol.impostor]),
    )


def _verification_accuracy(g: np.ndarray, im: np.ndarray) -> tuple[float, float]:
    """10-fold LFW-style accuracy, the threshold chosen on 9 folds; the reference's loop, vectorised over the
    candidate thresholds (equal results: the mean of 0/1 values is exact, argmax keeps the first best like max)."""
    rng = np.random.default_rng(0)
    lab = np.r_[np.ones(len(g)), np.zeros(len(im))]
    d = np.r_[g, im]
    perm = rng.permutation(len(d))
    folds = np.array_split(perm, 10)
    accs = []
    for k in range(10):
        test = folds[k]
        train = np.setdiff1d(perm, test)
        dt, lt = d[train], lab[train]
        cands = np.unique(dt[dt < BIG])
        cands = cands[:: max(1, len(cands) // 2000)]
        if cands.size == 0:
            raise EvaluationError("no finite pair distance to choose a verification threshold from")
        best_acc, best = -1.0, float(cands[0])
        step = max(1, (1 << 22) // max(1, dt.size))
        for s in range(0, cands.size, step):
            chunk = cands[s : s + step]
            acc = ((dt[None, :] <= chunk[:, None]) == lt[None, :]).mean(axis=1)
            j = int(np.argmax(acc))
            if acc[j] > best_acc:
                best_acc, best = float(acc[j]), float(chunk[j])
        accs.append(((d[test] <= best) == lab[test]).mean())
    return float(np.mean(accs)), float(np.std(accs))


@dataclass(frozen=True, eq=False)
class _OneShot:
    """The reference's one-shot identification: nearest gallery face per probe."""

    mate_dist: NDArray[np.float64]
    mate_ok: NDArray[np.bool_]
    stranger_dist: NDArray[np.float64]


def _one_shot(protocol: Protocol, idx: Mapping[str, int], E: np.ndarray, metric: PairMetric | None = None) -> _OneShot:
    G = np.stack([E[idx[f]] for _, f in protocol.gallery]) if protocol.gallery else np.empty((0, E.shape[1]))
    names = [p for p, _ in protocol.gallery]
    mate_d, mate_ok, nm = [], [], []
    for f, p in protocol.probes:
        v = E[idx[f]]
        if np.isnan(v).any() or not names:
            (mate_d if p else nm).append(BIG)
            if p:
                mate_ok.append(False)
            continue
        dd = np.linalg.norm(G - v, axis=1) if metric is None else np.asarray(metric(G, v[None, :]), dtype=np.float64)
        dd[np.isnan(dd)] = BIG
        j = int(np.argmin(dd))
        if p:
            mate_d.append(float(dd[j]))
            mate_ok.append(names[j] == p)
        else:
            nm.append(float(dd[j]))
    return _OneShot(np.array(mate_d, dtype=np.float64), np.array(mate_ok, dtype=bool), np.array(nm, dtype=np.float64))


def _reference_metrics(
    protocol: Protocol,
    idx: Mapping[str, int],
    E: np.ndarray,
    missing: int,
    pd: _PairDistances,
    metric: PairMetric | None = None,
) -> ReferenceMetrics:
    g, im = pd.genuine, pd.impostor
    acc, std = _verification_accuracy(g, im)

    def tar_at_far(far: float) -> float:
        return float((g <= np.quantile(im, far)).mean()) if im.size and g.size else math.nan

    os_ = _one_shot(protocol, idx, E, metric)

    def dir_at_fpir(fpir: float) -> float:
        if os_.stranger_dist.size == 0 or os_.mate_dist.size == 0:
            return math.nan  # the reference cannot score this either (it would crash)
        t = np.quantile(os_.stranger_dist, fpir)
        return float(np.mean((os_.mate_dist <= t) & os_.mate_ok))

    return ReferenceMetrics(
        missing=missing,
        verif_acc=acc,
        verif_std=std,
        tar_far1e2=tar_at_far(1e-2),
        tar_far1e3=tar_at_far(1e-3),
        rank1=float(np.mean(os_.mate_ok)) if os_.mate_ok.size else math.nan,
        dir_fpir1e2=dir_at_fpir(1e-2),
        dir_fpir1e3=dir_at_fpir(1e-3),
    )


def score(protocol: Protocol, embeddings: Embeddings, *, cosine: bool = False) -> ReferenceMetrics:
    """``shared/eval/score.py`` on ``embeddings`` ({protocol image path: row, or None / NaN row for no face}).

    ``missing`` counts the mapping's entries without an embedding (the reference counts the .npz's NaN rows).
    Every protocol image must have an entry. ``cosine=True`` is the reference's ``--cosine``.
    """
    idx, E, missing = _matrix(protocol, embeddings, cosine)
    return _reference_metrics(protocol, idx, E, missing, _pair_distances(protocol, idx, E))


# --- beyond the reference: thresholds, per-rule open-set figures, curves -----------------------------------------
@dataclass(frozen=True)
class VerificationThresholds:
    """Distance thresholds from the pairs: FAR-calibrated points (distance rule on the impostor distances, TAR as
    ``dir``) and the equal-error point. ``recommended`` is the FAR 1e-3 threshold (the lowest FAR asked for)."""

    far_points: tuple[OperatingPoint, ...]
    eer: float
    eer_threshold: float
    recommended: float
    n_genuine: int
    n_impostor: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "recommended_threshold": self.recommended,
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "far_points": [
                {
                    "target_far": p.target_fpir,
                    "threshold": p.rule.threshold,
                    "far": p.fpir,
                    "tar": p.dir,
                    "n_impostor_accepted": p.n_strangers_accepted,
                    "resolvable": p.resolvable,
                }
                for p in self.far_points
            ],
        }


@dataclass(frozen=True)
class StrangerSet:
    name: str
    n_strangers: int
    n_missing: int
    description: str


@dataclass(frozen=True)
class OpenSetPoint:
    """One rule calibrated at one FPIR on one stranger set, with DIR on the protocol's mates."""

    stranger_set: str
    point: OperatingPoint

    def to_dict(self) -> dict[str, Any]:
        return {"stranger_set": self.stranger_set, **self.point.to_dict()}


@dataclass(frozen=True, eq=False)
class Curve:
    """x / y arrays for a plot (verification: FAR / TAR; open set: FPIR / DIR) with the thresholds behind them."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    thresholds: NDArray[np.float64]

    def to_dict(self) -> dict[str, list[float | None]]:
        def clean(a: np.ndarray) -> list[float | None]:
            return [float(v) if math.isfinite(v) else None for v in a]

        return {"x": clean(self.x), "y": clean(self.y), "thresholds": clean(self.thresholds)}


@dataclass(frozen=True, eq=False)
class EvaluationReport:
    system: str
    n_images: int
    reference: ReferenceMetrics
    verification: VerificationThresholds
    rank1: float
    n_mates: int
    stranger_sets: tuple[StrangerSet, ...]
    open_set: tuple[OpenSetPoint, ...]
    roc: Curve
    dir_curves: Mapping[tuple[str, str], Curve] = field(default_factory=dict)  # (rule, stranger set) -> curve

    def point(self, rule: str, stranger_set: str, target_fpir: float) -> OperatingPoint:
        for p in self.open_set:
            if p.stranger_set == stranger_set and p.point.rule.rule == rule and p.point.target_fpir == target_fpir:
                return p.point
        raise KeyError((rule, stranger_set, target_fpir))

    def to_dict(self, *, include_curves: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "system": self.system,
            "n_images": self.n_images,
            "reference": self.reference.rounded(),
            "verification": self.verification.to_dict(),
            "rank1": self.rank1,
            "n_mates": self.n_mates,
            "stranger_sets": [asdict(s) for s in self.stranger_sets],
            "open_set": [p.to_dict() for p in self.open_set],
        }
        if include_curves:
            out["roc"] = self.roc.to_dict()
            out["dir_curves"] = [{"rule": r, "stranger_set": s, **c.to_dict()} for (r, s), c in self.dir_curves.items()]
        return out


def _verification_thresholds(
    g: np.ndarray, im: np.ndarray, fars: Sequence[float]
) -> tuple[VerificationThresholds, Curve]:
    if g.size == 0 or im.size == 0:
        raise EvaluationError("verification needs genuine and impostor pairs")
    if not fars:
        raise EvaluationError("no FAR / FPIR targets given")
    rule = DecisionRule.distance()
    points = tuple(calibrate(rule, im, far, mates=g) for far in fars)
    gs, ims = np.sort(g), np.sort(im)
    t = np.unique(np.r_[g, im])
    far = np.searchsorted(ims, t, side="right") / ims.size
    tar = np.searchsorted(gs, t, side="right") / gs.size
    finite = t < BIG
    frr = 1.0 - tar
    j = int(np.argmin(np.where(finite, np.abs(far - frr), np.inf)))
    lowest = min(points, key=lambda p: p.target_fpir)
    vt = VerificationThresholds(
        far_points=points,
        eer=float((far[j] + frr[j]) / 2),
        eer_threshold=float(t[j]),
        recommended=lowest.rule.threshold,
        n_genuine=int(g.size),
        n_impostor=int(im.size),
    )
    return vt, Curve(far, tar, t)


def _identity_of(relpath: str) -> str:
    return PurePath(relpath).parts[0]


def _open_set_data(
    protocol: Protocol, embeddings: Embeddings, metric: PairMetric | None = None
) -> tuple[Neighbours, np.ndarray, dict[str, tuple[Neighbours, int]], tuple[StrangerSet, ...]]:
    """Mates (neighbours + true identities) and the stranger sets, as ``Neighbours`` against the one-shot gallery."""
    gal_ids = np.array([p for p, _ in protocol.gallery], dtype=object)
    images = list(protocol.images)
    row = {img: i for i, img in enumerate(images)}
    _, E = _stack({img: embeddings[img] for img in images})
    if gal_ids.size:
        G = np.stack([E[row[f]] for _, f in protocol.gallery])
        # (images, identities); NaN where a face is missing
        D = pairwise_distances(E, G) if metric is None else np.asarray(metric(E[:, None], G[None]), dtype=np.float64)
    else:
        D = np.empty((len(images), 0))
    D[np.isnan(D)] = np.inf
    col = {p: j for j, p in enumerate(gal_ids)}
    missing = np.isnan(E).any(axis=1)

    def nb(rows: list[int], hide: list[int | None]) -> Neighbours:
        sub = D[rows].copy()
        for r, j in enumerate(hide):
            if j is not None:
                sub[r, j] = np.inf  # leave-one-identity-out: that person is not enrolled for this probe
        return Neighbours.from_identity_distances(sub, gal_ids)

    mate_rows = [row[f] for f, p in protocol.probes if p is not None]
    mate_truth = np.array([p for _, p in protocol.probes if p is not None], dtype=object)
    mates = nb(mate_rows, [None] * len(mate_rows))

    ref_rows = [row[f] for f, p in protocol.probes if p is None]
    loo_rows = [row[f] for f, p in protocol.probes if p is not None]
    loo_hide: list[int | None] = [col[p] for f, p in protocol.probes if p is not None]
    all_rows, all_hide = [], []
    for img in images:
        who = _identity_of(img)
        all_rows.append(row[img])
        all_hide.append(col.get(who))
    sets: dict[str, tuple[Neighbours, int]] = {
        "reference": (nb(ref_rows, [None] * len(ref_rows)), int(missing[ref_rows].sum())),
        "loo": (
            nb(loo_rows + ref_rows, loo_hide + [None] * len(ref_rows)),
            int(missing[loo_rows + ref_rows].sum()),
        ),
        "loo_all": (nb(all_rows, all_hide), int(missing[all_rows].sum())),
    }
    descriptions = {
        "reference": "the protocol's strangers (people with a single image) against the full one-shot gallery",
        "loo": "each enrolled identity's probe with that identity removed from the gallery, plus the protocol's "
        "strangers",
        "loo_all": "every protocol image of each enrolled identity with that identity removed from the gallery, "
        "plus every image of people not enrolled (correlated: several images per person)",
    }
    info = tuple(StrangerSet(k, len(v[0]), v[1], descriptions[k]) for k, v in sets.items())
    return mates, mate_truth, sets, info


def evaluate(
    protocol: Protocol,
    embeddings: Embeddings,
    *,
    system: str = "ours",
    rules: Sequence[DecisionRule] = DEFAULT_RULES,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
    cosine: bool = False,
    progress: ProgressCallback | None = None,
    metric: PairMetric | None = None,
) -> EvaluationReport:
    """The reference metrics plus thresholds, per-rule DIR at each FPIR on each stranger set, and curves.

    ``rules``: the rules to calibrate (their thresholds are replaced; the ratio / margin cap is kept).
    ``metric``: a learned dissimilarity instead of the Euclidean distance (same protocol, same figures); the
    ratio / margin caps are in the metric's units then.
    """
    names = [r.rule for r in rules]
    if len(set(names)) != len(names):
        # results and curves are keyed by rule name; two variants of one rule go in two evaluate() calls
        raise EvaluationError(f"one rule of each kind per evaluation, got {names}")
    steps = 3 + len(rules)
    done = 0

    def tick(stage: str) -> None:
        nonlocal done
        done += 1
        log.info("evaluate %s: %s (%d/%d)", system, stage, done, steps)
        if progress is not None:
            progress(stage, done, steps)

    idx, E, missing = _matrix(protocol, embeddings, cosine)
    pd = _pair_distances(protocol, idx, E, metric)
    ref = _reference_metrics(protocol, idx, E, missing, pd, metric)
    tick("reference metrics")
    verification, roc = _verification_thresholds(pd.genuine, pd.impostor, fpirs)
    tick("verification thresholds")
    used = embeddings
    if cosine:
        used = {img: E[idx[img]] for img in protocol.images}
    mates, truth, sets, info = _open_set_data(protocol, used, metric)
    rank1 = float(np.mean(mates.found & (mates.label1 == truth))) if len(mates) else math.nan
    tick("open-set neighbours")
    points: list[OpenSetPoint] = []
    curves: dict[tuple[str, str], Curve] = {}
    for rule in rules:
        for name, (strangers, _) in sets.items():
            if len(strangers) == 0 or len(mates) == 0:
                continue
            for fpir in fpirs:
                points.append(OpenSetPoint(name, calibrate(rule, strangers, fpir, mates=mates, mate_labels=truth)))
            x, y, t = dir_fpir_curve(rule, mates, truth, strangers)
            curves[(rule.rule, name)] = Curve(x, y, t)
        tick(f"rule {rule.rule}")
    return EvaluationReport(
        system=system,
        n_images=len(protocol.images),
        reference=ref,
        verification=verification,
        rank1=rank1,
        n_mates=len(mates),
        stranger_sets=info,
        open_set=tuple(points),
        roc=roc,
        dir_curves=curves,
    )


# --- outputs ------------------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    """NaN / inf -> null (strict JSON: a metric that cannot be computed, e.g. DIR with no strangers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(
    reports: EvaluationReport | Sequence[EvaluationReport],
    path: str | os.PathLike[str],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """JSON summary of one or several systems (atomic write); ``meta`` (e.g. the encoder fingerprint) goes on top."""
    items = [reports] if isinstance(reports, EvaluationReport) else list(reports)
    data = _json_safe({**(meta or {}), "systems": [r.to_dict() for r in items]})
    out = Path(path)
    atomic_write_bytes(out, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return out


def plot_roc(
    reports: EvaluationReport | Sequence[EvaluationReport],
    path: str | os.PathLike[str],
    *,
    stranger_set: str = "loo_all",
) -> Path:
    """PNG: the verification ROC (TAR vs FAR) and one DIR-vs-FPIR panel per rule, one curve per system, log-scale
    x axes (points at FAR / FPIR 0 cannot be drawn on a log axis and are left out)."""
    # matplotlib is a dev / eval dependency only; the figure API with the Agg canvas draws without pyplot, so no
    # global backend is switched in a process that may be using one.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = [reports] if isinstance(reports, EvaluationReport) else list(reports)
    if not items:
        raise EvaluationError("nothing to plot")
    rule_names: list[str] = []
    for r in items:
        for rule, s in r.dir_curves:
            if s == stranger_set and rule not in rule_names:
                rule_names.append(rule)
    panels = 1 + len(rule_names)
    fig = Figure(figsize=(5.0 * panels, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    def draw(ax: Any, curve: Curve, label: str) -> bool:
        keep = curve.x > 0
        if keep.any():
            ax.step(curve.x[keep], curve.y[keep], where="post", label=label)
        return bool(keep.any())

    def finish(ax: Any, drawn: bool) -> None:
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(loc="lower right", fontsize="small")
        else:  # every threshold rejects every stranger (e.g. all beyond the cap): nothing on a log axis
            ax.text(0.5, 0.5, "no stranger accepted\nat any threshold", transform=ax.transAxes, ha="center")

    ax = axes[0]
    drawn = False
    for r in items:
        drawn |= draw(ax, r.roc, f"{r.system} (acc {r.reference.verif_acc:.3f})")
    n_imp = max(r.verification.n_impostor for r in items)
    ax.set(
        xscale="log", xlabel="FAR", ylabel="TAR", title="verification ROC", ylim=(0.0, 1.02), xlim=(0.5 / n_imp, 1.0)
    )
    finish(ax, drawn)
    for ax, rule in zip(axes[1:], rule_names, strict=True):
        n_s = 0
        drawn = False
        for r in items:
            curve = r.dir_curves.get((rule, stranger_set))
            if curve is not None:
                drawn |= draw(ax, curve, r.system)
                n_s = max(n_s, next(s.n_strangers for s in r.stranger_sets if s.name == stranger_set))
        ax.set(
            xscale="log",
            xlabel=f"FPIR ({stranger_set}, {n_s} strangers)",
            ylabel="DIR",
            title=f"open set: {rule} rule",
            ylim=(0.0, 1.02),
            xlim=(0.5 / max(1, n_s), 1.0),  # the same span on every rule's panel, so they compare by eye
        )
        finish(ax, drawn)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def rule_from_summary(
    path: str | os.PathLike[str],
    rule: str,
    target_fpir: float,
    *,
    fingerprint: str,
    system: str = "faceattend",
    stranger_set: str = "loo_all",
) -> DecisionRule:
    """The rule as calibrated by an earlier evaluation (``write_summary`` output) at ``target_fpir``.

    Thresholds only hold in the embedding space they were measured in: a summary written under another encoder
    fingerprint is refused.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"calibration {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("systems"), list):
        raise EvaluationError(f"calibration {path}: not an evaluation summary (no 'systems' list)")
    if data.get("fingerprint") != fingerprint:
        raise EvaluationError(
            f"calibration {path}: measured under encoder fingerprint {data.get('fingerprint')!r}, "
            f"this encoder is {fingerprint!r}; re-run model-tool eval"
        )
    for sysrep in data["systems"]:
        if not isinstance(sysrep, dict) or sysrep.get("system") != system:
            continue
        for point in sysrep.get("open_set", []):
            if (
                point.get("rule") == rule
                and point.get("stranger_set") == stranger_set
                and math.isclose(float(point.get("target_fpir", -1)), target_fpir)
            ):
                if not point.get("resolvable", False):
                    log.warning(
                        "calibration %s: FPIR %g is finer than its %s strangers resolve",
                        path,
                        target_fpir,
                        point.get("n_strangers"),
                    )
                cfg = {"rule": rule, "threshold": point["threshold"]}
                if point.get("max_distance") is not None:
                    cfg["max_distance"] = point["max_distance"]
                return DecisionRule.from_dict(cfg)
    raise EvaluationError(
        f"calibration {path}: no {rule} rule at FPIR {target_fpir:g} on the {stranger_set} strangers of {system!r}"
    )
