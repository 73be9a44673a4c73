"""Open-set decision rules: is the face at the door an enrolled person, and which one?

One-to-many open-set identification over a gallery that may hold several templates (encodings) per identity.
Everything here works on *distances*; the nearest-neighbour search itself (hnswlib on the edge, brute force in
the evaluation) happens elsewhere. Per probe we reduce the neighbours to two numbers per the lecture notes'
dlib metric (Euclidean, same person when d <= ~0.6):

- ``d1``: the distance to the nearest identity (the minimum over that identity's templates);
- ``d2``: the distance to the *second-nearest identity* (the minimum over the templates of every other identity),
  not to the second-nearest template, which with several templates per person is usually the same person.

Rules (``DecisionRule``):

- ``distance``: accept the nearest identity when ``d1 <= threshold``;
- ``ratio``: accept when ``d1 / d2 <= threshold`` and ``d1 <= max_distance`` (a loose cap, default 0.6);
- ``margin``: accept when ``d2 - d1 >= threshold`` and ``d1 <= max_distance``.

Why ratio and margin exist: strangers are the users' top complaint, and a stranger's nearest enrolled face tends
to be about as far as the runner-up, while a genuine probe's nearest face stands out from the rest. On a large
dlib protocol (DESIGN.md, "Open-set decisions") the ratio rule recognises 71.6 % of enrolled people at 1 % FPIR
where the distance rule recognises 44.5 %.

Degenerate galleries (documented behaviour, tested):

- empty gallery, or a probe with no valid neighbour (NaN embedding, NaN distances): ``d1 = d2 = inf``; the probe is
  unknown under every rule;
- one identity in the gallery: there is no runner-up, so ``d2 = inf``, ``ratio = 0`` and ``margin = inf``; ratio and
  margin then accept exactly when ``d1 <= max_distance``, i.e. they fall back to a distance rule at the cap. With a
  single enrolled person identification *is* 1:1 verification, and the cap (dlib's 0.6 by default) is the
  verification threshold, so that is the sensible fall-back rather than accepting or rejecting everyone;
- top-k neighbour lists that hold only one identity while the gallery holds more (k too small): the true ``d2`` is
  unknown but at least the largest listed distance, which is used as a lower bound. That over-states the ratio and
  under-states the margin, so the error is towards "unknown", never towards a false accept. Ask hnswlib for
  k >= (most templates per identity) + 1 to get the exact ``d2``.

Calibration (``calibrate``) picks the threshold from stranger statistics so that at most ``target_fpir`` of the
calibration strangers are accepted, counting observed strangers exactly (no linear interpolation between order
statistics, which would accept one stranger too many whenever the sample is smaller than 1 / target), and reports
the operating point reached, including whether the target is resolvable on that many strangers at all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from models.errors import ConfigError, DecisionError

log = logging.getLogger(__name__)

RuleName = Literal["distance", "ratio", "margin"]
RULES: Final[tuple[str, ...]] = ("distance", "ratio", "margin")
# dlib's own "same person" bound; loose compared with a distance threshold calibrated for a low FPIR, which is
# what a cap next to the ratio / margin test should be: it only stops absurdly far matches.
DEFAULT_MAX_DISTANCE: Final[float] = 0.6
DEFAULT_THRESHOLDS: Final[Mapping[str, float]] = {"distance": 0.6, "ratio": 0.8, "margin": 0.1}
_CONFIG_KEYS: Final[frozenset[str]] = frozenset({"rule", "threshold", "max_distance"})
# Elements per chunk in the brute-force distance computation (probes x templates x dim float64 = 128 MiB at most).
_CHUNK_ELEMENTS: Final[int] = 1 << 24

PersonId = Any  # whatever the caller's label table holds: str person ids, int hnswlib labels


def _item(value: Any) -> Any:
    """Numpy scalar -> plain Python value, so decisions serialise and compare like the caller's ids."""
    return value.item() if isinstance(value, np.generic) else value


def _as_float_2d(values: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.array(values, dtype=np.float64)  # a copy: we overwrite NaN in place
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise DecisionError(f"{name} must be 1-D (one probe) or 2-D (a batch), got shape {arr.shape}")
    return arr


@dataclass(frozen=True, eq=False)
class Neighbours:
    """Per probe: the nearest identity (``label1``, ``d1``) and the runner-up identity (``label2``, ``d2``).

    All arrays have shape (n,). ``d1`` is inf where a probe has no valid neighbour (empty gallery, NaN input);
    ``d2`` is inf where there is no second identity. ``label1`` / ``label2`` are meaningless where the matching
    distance is inf (use ``found``).
    """

    label1: np.ndarray
    d1: NDArray[np.float64]
    label2: np.ndarray
    d2: NDArray[np.float64]

    def __post_init__(self) -> None:
        n = self.d1.shape
        if len(n) != 1 or self.d2.shape != n or self.label1.shape != n or self.label2.shape != n:
            raise DecisionError("Neighbours arrays must all be 1-D of the same length")

    def __len__(self) -> int:
        return int(self.d1.shape[0])

    @property
    def found(self) -> NDArray[np.bool_]:
        """Probes with at least one valid neighbour."""
        return np.isfinite(self.d1)

    def take(self, index: ArrayLike) -> Neighbours:
        """The neighbours of a subset of probes (boolean mask or integer index)."""
        idx = np.asarray(index)
        return Neighbours(self.label1[idx], self.d1[idx], self.label2[idx], self.d2[idx])

    @staticmethod
    def concat(parts: list[Neighbours]) -> Neighbours:
        if not parts:
            raise DecisionError("nothing to concatenate")
        return Neighbours(
            np.concatenate([p.label1 for p in parts]),
            np.concatenate([p.d1 for p in parts]),
            np.concatenate([p.label2 for p in parts]),
            np.concatenate([p.d2 for p in parts]),
        )

    @classmethod
    def from_identity_distances(cls, distances: ArrayLike, identities: ArrayLike) -> Neighbours:
        """From per-identity distances: ``distances`` (u,) or (n, u), column j the distance to ``identities[j]``.

        NaN distances count as "no such neighbour" (inf). Ties go to the lower column index.
        """
        dist = _as_float_2d(distances, "distances")
        ids = np.asarray(identities)
        n, u = dist.shape
        if ids.shape != (u,):
            raise DecisionError(f"identities must have shape ({u},), got {ids.shape}")
        dist[np.isnan(dist)] = np.inf
        if u == 0:
            empty = np.empty(n, dtype=ids.dtype)
            return cls(empty, np.full(n, np.inf), empty.copy(), np.full(n, np.inf))
        rows = np.arange(n)
        j1 = np.argmin(dist, axis=1)
        d1 = dist[rows, j1]
        if u == 1:
            d2 = np.full(n, np.inf)
            j2 = j1
        else:
            # Mask the winner and take the minimum again: deterministic tie-breaking (argpartition is not).
            rest = dist.copy()
            rest[rows, j1] = np.inf
            j2 = np.argmin(rest, axis=1)
            d2 = rest[rows, j2]
        d2 = np.where(np.isfinite(d1), d2, np.inf)
        return cls(ids[j1], d1, ids[j2], d2)

    @classmethod
    def from_topk(
        cls,
        distances: ArrayLike,
        labels: ArrayLike,
        *,
        gallery_identities: int | None = None,
        squared: bool = False,
    ) -> Neighbours:
        """From k nearest *templates*: ``distances`` and ``labels`` (k,) or (n, k), labels (k,) broadcast.

        ``labels`` are identity labels of the templates (repeated when an identity has several templates); an
        integer label < 0 and a non-finite distance mark padding. ``squared=True`` takes the square root first
        (hnswlib's "l2" space returns squared distances). ``gallery_identities``: how many identities the whole
        gallery holds; None means the lists are exhaustive (every template listed), so a list with one identity
        means a one-identity gallery (``d2 = inf``). When it is > 1 and a list shows one identity only, ``d2`` is
        lower-bounded by the list's largest distance (conservative, see the module docstring).
        """
        dist = _as_float_2d(distances, "distances")
        if squared:
            dist = np.sqrt(np.maximum(dist, 0.0))
        lab = np.asarray(labels)
        if lab.ndim == 1 and lab.shape[0] == dist.shape[1]:
            lab = np.broadcast_to(lab, dist.shape)  # one label table shared by every probe
        if lab.shape != dist.shape:
            raise DecisionError(f"labels shape {np.asarray(labels).shape} does not match distances {dist.shape}")
        n, k = dist.shape
        invalid = ~np.isfinite(dist)
        if lab.dtype.kind in "iu":
            invalid |= lab < 0
        dist[invalid] = np.inf
        if k == 0:
            empty = np.empty(n, dtype=lab.dtype)
            return cls(empty, np.full(n, np.inf), empty.copy(), np.full(n, np.inf))
        order = np.argsort(dist, axis=1, kind="stable")
        ds = np.take_along_axis(dist, order, axis=1)
        ls = np.take_along_axis(lab, order, axis=1)
        rows = np.arange(n)
        d1 = ds[:, 0]
        l1 = ls[:, 0]
        finite = np.isfinite(ds)
        other = (ls != l1[:, None]) & finite
        has_other = other.any(axis=1)
        j2 = np.argmax(other, axis=1)
        d2 = np.where(has_other, ds[rows, j2], np.inf)
        l2 = ls[rows, j2]
        if gallery_identities is not None and gallery_identities > 1:
            truncated = ~has_other & np.isfinite(d1)
            if truncated.any():
                last = np.maximum(finite.sum(axis=1) - 1, 0)
                d2 = np.where(truncated, ds[rows, last], d2)
                log.debug("%d probe(s) saw one identity in their top-%d; d2 lower-bounded", int(truncated.sum()), k)
        d2 = np.where(np.isfinite(d1), d2, np.inf)
        return cls(l1, d1, l2, d2)

    @classmethod
    def from_embeddings(cls, probes: ArrayLike, gallery: ArrayLike, labels: ArrayLike) -> Neighbours:
        """Brute force: ``probes`` (dim,) or (n, dim) against ``gallery`` (m, dim) with identity ``labels`` (m,).

        Per-identity distance = minimum over that identity's templates. NaN rows (no face) never match.
        Meant for evaluation and small galleries; the edge uses hnswlib and ``from_topk``.
        """
        dist, identities = template_to_identity_distances(pairwise_distances(probes, gallery), labels)
        return cls.from_identity_distances(dist, identities)


def pairwise_distances(probes: ArrayLike, gallery: ArrayLike) -> NDArray[np.float64]:
    """Euclidean distances (n, m), computed as differences (not the |a|²+|b|²-2ab expansion, which loses
    precision right where decisions are made); NaN wherever either side has a NaN."""
    p = _as_float_2d(probes, "probes")
    g = np.asarray(gallery, dtype=np.float64)
    if g.ndim != 2 or (g.shape[0] and g.shape[1] != p.shape[1]):
        raise DecisionError(f"gallery must be (m, {p.shape[1]}), got {g.shape}")
    n, m = p.shape[0], g.shape[0]
    out = np.empty((n, m), dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, m * p.shape[1]))
    for s in range(0, n, step):
        out[s : s + step] = np.linalg.norm(p[s : s + step, None, :] - g[None, :, :], axis=2)
    return out


def template_to_identity_distances(distances: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], np.ndarray]:
    """Per-template distances (n, m) + template labels (m,) -> per-identity minimum distances (n, u), identities (u,).

    Identities come out sorted (np.unique order); NaN distances are ignored (inf).
    """
    dist = _as_float_2d(distances, "distances")
    lab = np.asarray(labels)
    if lab.shape != (dist.shape[1],):
        raise DecisionError(f"labels must have shape ({dist.shape[1]},), got {lab.shape}")
    identities, inverse = np.unique(lab, return_inverse=True)
    if identities.size == 0:
        return np.empty((dist.shape[0], 0)), identities
    dist[np.isnan(dist)] = np.inf
    order = np.argsort(inverse, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
    return np.minimum.reduceat(dist[:, order], starts, axis=1), identities


def _check_number(key: str, value: Any, *, allow_inf: bool = False) -> float:
    # bool is an int subclass; "threshold: true" in a YAML file is a mistake, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"decision rule: {key} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ConfigError(f"decision rule: {key} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class DecisionRule:
    """A decision rule and its threshold(s). Construct with ``distance()``, ``ratio()``, ``margin()`` or
    ``from_dict()``; invalid values raise ``ConfigError``.

    ``threshold``: distance rule, the largest accepted d1 (>= 0); ratio rule, the largest accepted d1/d2 in
    [0, 1]; margin rule, the smallest accepted d2 - d1 (>= 0, inf = only accept with no runner-up).
    ``max_distance``: the cap on d1 for ratio and margin (default 0.6; inf = no cap); None for the distance rule.
    """

    rule: RuleName
    threshold: float
    max_distance: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"decision rule: unknown rule {self.rule!r} (known: {', '.join(RULES)})")
        t = _check_number("threshold", self.threshold, allow_inf=self.rule == "margin")
        object.__setattr__(self, "threshold", t)
        if t < 0:
            raise ConfigError(f"decision rule: threshold must be >= 0, got {t}")
        if self.rule == "ratio" and t > 1:
            raise ConfigError(f"decision rule: a ratio threshold is d1/d2 <= 1, got {t}")
        if self.rule == "distance":
            if self.max_distance is not None:
                raise ConfigError("decision rule: max_distance applies to the ratio and margin rules only")
            return
        cap = DEFAULT_MAX_DISTANCE if self.max_distance is None else self.max_distance
        cap = _check_number("max_distance", cap, allow_inf=True)
        if cap <= 0:
            raise ConfigError(f"decision rule: max_distance must be > 0, got {cap}")
        object.__setattr__(self, "max_distance", cap)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def distance(cls, threshold: float = DEFAULT_THRESHOLDS["distance"]) -> DecisionRule:
        return cls("distance", threshold)

    @classmethod
    def ratio(
        cls, threshold: float = DEFAULT_THRESHOLDS["ratio"], max_distance: float = DEFAULT_MAX_DISTANCE
    ) -> DecisionRule:
        return cls("ratio", threshold, max_distance)

    @classmethod
    def margin(
        cls, threshold: float = DEFAULT_THRESHOLDS["margin"], max_distance: float = DEFAULT_MAX_DISTANCE
    ) -> DecisionRule:
        return cls("margin", threshold, max_distance)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionRule:
        """Strict parse of ``{"rule": ..., "threshold": ..., "max_distance": ...}``.

        ``rule`` and ``threshold`` are required (a threshold is a calibrated figure, so a config never gets a
        silent default), and so is ``max_distance`` for ratio / margin (never allowed for distance). Unknown keys
        raise ``ConfigError``.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"decision rule: expected a mapping, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _CONFIG_KEYS)
        if unknown:
            raise ConfigError(
                f"decision rule: unknown key(s) {', '.join(unknown)} (allowed: rule, threshold, max_distance)"
            )
        if "rule" not in data:
            raise ConfigError("decision rule: missing key 'rule'")
        name = data["rule"]
        if not isinstance(name, str) or name not in RULES:
            raise ConfigError(f"decision rule: unknown rule {name!r} (known: {', '.join(RULES)})")
        if "threshold" not in data:
            raise ConfigError(f"decision rule: missing key 'threshold' for the {name} rule (calibrate one)")
        threshold = data["threshold"]
        if name == "distance":
            if "max_distance" in data:
                raise ConfigError("decision rule: max_distance applies to the ratio and margin rules only")
            return cls("distance", threshold)
        if "max_distance" not in data:
            # the cap is a distance in one encoder's space: a silent default would be wrong for every other encoder
            raise ConfigError(
                f"decision rule: missing key 'max_distance' for the {name} rule (the distance cap calibrated for the "
                "encoder; `.inf` for none)"
            )
        return cls(cast(RuleName, name), threshold, _check_number("max_distance", data["max_distance"], allow_inf=True))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "threshold": self.threshold}
        if self.max_distance is not None:
            out["max_distance"] = self.max_distance
        return out

    def with_threshold(self, threshold: float) -> DecisionRule:
        return DecisionRule(self.rule, threshold, self.max_distance)

    # --- statistics ---------------------------------------------------------------------------------------------
    def statistic(self, nb: Neighbours) -> NDArray[np.float64]:
        """The rule's statistic per probe, as reported in ``Decision.score``: d1, d1/d2 or d2-d1 (NaN: no match)."""
        d1, d2 = nb.d1, nb.d2
        found = np.isfinite(d1)
        if self.rule == "distance":
            s = d1
        elif self.rule == "ratio":
            s = _ratio(d1, d2)
        else:
            with np.errstate(invalid="ignore"):
                s = d2 - d1
        return np.where(found, s, np.nan)

    def oriented_statistic(self, nb: Neighbours) -> NDArray[np.float64]:
        """The statistic turned so that lower = more confident and accept <=> value <= ``oriented_threshold``;
        +inf where the rule can never accept (no neighbour, d1 above the cap). Calibration sorts on this."""
        s = self.statistic(nb)
        if self.rule == "margin":
            s = -s
        blocked = ~nb.found
        if self.max_distance is not None:
            blocked |= nb.d1 > self.max_distance
        return np.where(blocked, np.inf, s)

    @property
    def oriented_threshold(self) -> float:
        return -self.threshold if self.rule == "margin" else self.threshold

    def accepts(self, nb: Neighbours) -> NDArray[np.bool_]:
        return self.oriented_statistic(nb) <= self.oriented_threshold

    # --- decisions ----------------------------------------------------------------------------------------------
    def decide(self, nb: Neighbours) -> Decisions:
        """Vectorised decisions for a batch of probes."""
        return Decisions(self, nb, self.statistic(nb), self.accepts(nb))

    def decide_topk(
        self,
        distances: ArrayLike,
        labels: ArrayLike,
        *,
        gallery_identities: int | None = None,
        squared: bool = False,
    ) -> Decision:
        """One face: its k nearest templates' distances and identity labels -> a Decision (the edge's call)."""
        nb = Neighbours.from_topk(distances, labels, gallery_identities=gallery_identities, squared=squared)
        if len(nb) != 1:
            raise DecisionError("decide_topk takes one probe; use decide(Neighbours.from_topk(...)) for a batch")
        return self.decide(nb)[0]


def _ratio(d1: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
    """d1 / d2: 0 with no runner-up (d2 inf); 1 when d2 == 0, which implies d1 == 0, an exact tie between two
    identities (maximally ambiguous); NaN with no neighbour at all."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(np.isinf(d2), 0.0, np.where(d2 > 0, d1 / d2, 1.0))
    return np.where(np.isfinite(d1), r, np.nan)


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class Decision:
    """The outcome for one face. ``person_id`` is None when rejected; ``candidate`` is the nearest identity
    whether accepted or not (None with an empty gallery), for logs and per-track voting."""

    person_id: PersonId | None
    candidate: PersonId | None
    distance: float  # d1 (inf: no neighbour)
    second_distance: float  # d2 (inf: no other identity)
    margin: float  # d2 - d1
    ratio: float  # d1 / d2
    score: float  # the rule's statistic (one of the above)
    accepted: bool
    rule: str
    threshold: float
    max_distance: float | None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: non-finite figures (no neighbour, no runner-up) become null."""
        return {
            "person_id": self.person_id,
            "candidate": self.candidate,
            "distance": _json_float(self.distance),
            "second_distance": _json_float(self.second_distance),
            "margin": _json_float(self.margin),
            "ratio": _json_float(self.ratio),
            "score": _json_float(self.score),
            "accepted": self.accepted,
            "rule": self.rule,
            "threshold": _json_float(self.threshold),
            "max_distance": None if self.max_distance is None else _json_float(self.max_distance),
        }


@dataclass(frozen=True, eq=False)
class Decisions:
    """Batch decisions: arrays, with per-probe ``Decision`` objects built on demand."""

    rule: DecisionRule
    neighbours: Neighbours
    score: NDArray[np.float64]
    accepted: NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.neighbours)

    def __iter__(self) -> Iterator[Decision]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Decision:
        nb = self.neighbours
        n = len(nb)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        d1, d2 = float(nb.d1[i]), float(nb.d2[i])
        found = math.isfinite(d1)
        candidate = _item(nb.label1[i]) if found else None
        accepted = bool(self.accepted[i])
        ratio = _ratio(nb.d1[i : i + 1], nb.d2[i : i + 1])[0]
        return Decision(
            person_id=candidate if accepted else None,
            candidate=candidate,
            distance=d1,
            second_distance=d2,
            margin=d2 - d1 if found else math.nan,
            ratio=float(ratio),
            score=float(self.score[i]),
            accepted=accepted,
            rule=self.rule.rule,
            threshold=self.rule.threshold,
            max_distance=self.rule.max_distance,
        )


# --- calibration --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OperatingPoint:
    """Where a calibrated rule operates on the data it was calibrated on.

    ``fpir``: fraction of the calibration strangers accepted (<= target unless infeasible, e.g. strangers the rule
    cannot reject because they have no runner-up). ``resolvable``: n_strangers * target >= 1; when False the sample
    cannot show a single false accept at the target, the threshold sits just below the most confident stranger
    and the figure is an optimistic bound, not a measurement. ``dir``: detection and identification rate of the
    mates (accepted *and* the right identity) or, with raw genuine statistics, the acceptance rate; None without
    mates.
    """

    rule: DecisionRule
    target_fpir: float
    fpir: float
    n_strangers: int
    n_strangers_accepted: int
    resolvable: bool
    dir: float | None
    n_mates: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.rule,
            "threshold": _json_float(self.rule.threshold),
            "max_distance": None if self.rule.max_distance is None else _json_float(self.rule.max_distance),
            "target_fpir": self.target_fpir,
            "fpir": self.fpir,
            "n_strangers": self.n_strangers,
            "n_strangers_accepted": self.n_strangers_accepted,
            "resolvable": self.resolvable,
            "dir": self.dir,
            "n_mates": self.n_mates,
        }


def _oriented_raw(rule: DecisionRule, stats: ArrayLike) -> NDArray[np.float64]:
    s = np.asarray(stats, dtype=np.float64).ravel()
    if rule.rule == "margin":
        s = -s
    return np.where(np.isnan(s), np.inf, s)  # NaN = no decision possible = never accepted


def _clamp_threshold(rule: DecisionRule, oriented: float) -> float:
    t = -oriented if rule.rule == "margin" else oriented
    hi = 1.0 if rule.rule == "ratio" else math.inf
    return float(min(max(t, 0.0), hi))


def calibrate(
    rule: DecisionRule,
    strangers: Neighbours | ArrayLike,
    target_fpir: float,
    *,
    mates: Neighbours | ArrayLike | None = None,
    mate_labels: ArrayLike | None = None,
) -> OperatingPoint:
    """Choose ``rule``'s threshold so that at most ``target_fpir`` of ``strangers`` are accepted.

    ``strangers`` / ``mates``: ``Neighbours`` (the cap of ratio / margin is applied; ``mate_labels`` gives each
    mate's true identity, so DIR counts correct identifications only) or raw arrays of the rule's statistic (the
    same quantity as ``Decision.score``: impostor-pair distances for the distance rule give the FAR threshold,
    genuine-pair distances then give TAR as ``dir``). NaN statistics are never accepted.

    The threshold is the largest *observed* stranger statistic whose acceptance count stays within
    floor(target * n); if even the most confident stranger would exceed it, the threshold sits just below that
    stranger (``np.nextafter``). Only ``threshold`` is calibrated: the cap (``max_distance``) of a ratio or margin
    rule keeps its value.
    """
    if isinstance(target_fpir, bool) or not 0.0 < float(target_fpir) < 1.0:
        raise ConfigError(f"calibrate: target_fpir must be in (0, 1), got {target_fpir!r}")
    target = float(target_fpir)
    s = _oriented(rule, strangers)
    n = int(s.size)
    if n == 0:
        raise DecisionError("calibrate: no stranger statistics")
    s_sorted = np.sort(s)
    # the epsilon keeps 0.29 * 100 from flooring to 28; target < 1 keeps at least one stranger to reject
    allowed = min(math.floor(target * n + 1e-9), n - 1)
    nxt = s_sorted[allowed]  # the most confident stranger that must be rejected
    below = int(np.searchsorted(s_sorted, nxt, side="left")) - 1  # ties with it must go too
    oriented = float(s_sorted[below]) if below >= 0 else float(np.nextafter(nxt, -np.inf))
    point = operating_point(
        rule.with_threshold(_clamp_threshold(rule, oriented)), strangers, target, mates=mates, mate_labels=mate_labels
    )
    if point.fpir > target:
        log.warning(
            "calibrate: the %s rule cannot reach FPIR %.3g on these strangers (reached %.3g, %d accepted)",
            rule.rule,
            target,
            point.fpir,
            point.n_strangers_accepted,
        )
    return point


def operating_point(
    rule: DecisionRule,
    strangers: Neighbours | ArrayLike,
    target_fpir: float,
    *,
    mates: Neighbours | ArrayLike | None = None,
    mate_labels: ArrayLike | None = None,
) -> OperatingPoint:
    """What ``rule``, its threshold as it stands, gives on ``strangers`` (and ``mates``): the same inputs and
    figures as ``calibrate``, without choosing the threshold."""
    s = _oriented(rule, strangers)
    n = int(s.size)
    if n == 0:
        raise DecisionError("operating point: no stranger statistics")
    t_or = rule.oriented_threshold
    n_acc = int(np.count_nonzero(s <= t_or))
    dir_value: float | None = None
    n_mates = 0
    if mates is not None:
        if isinstance(mates, Neighbours):
            if mate_labels is None:
                raise DecisionError("calibrate: mate_labels is required with Neighbours mates")
            truth = np.asarray(mate_labels)
            if truth.shape != mates.label1.shape:
                raise DecisionError("calibrate: mate_labels must have one label per mate")
            hit = rule.accepts(mates) & mates.found & (mates.label1 == truth)
        else:
            hit = _oriented_raw(rule, mates) <= t_or
        n_mates = int(hit.size)
        dir_value = float(hit.mean()) if n_mates else None
    return OperatingPoint(
        rule=rule,
        target_fpir=float(target_fpir),
        fpir=n_acc / n,
        n_strangers=n,
        n_strangers_accepted=n_acc,
        resolvable=n * float(target_fpir) >= 1.0 - 1e-9,
        dir=dir_value,
        n_mates=n_mates,
    )


def _oriented(rule: DecisionRule, values: Neighbours | ArrayLike) -> NDArray[np.float64]:
    return rule.oriented_statistic(values) if isinstance(values, Neighbours) else _oriented_raw(rule, values)


def dir_fpir_curve(
    rule: DecisionRule,
    mates: Neighbours,
    mate_labels: ArrayLike,
    strangers: Neighbours,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """DIR against FPIR for every threshold worth trying (each observed statistic value).

    Returns (fpir, dir, oriented_thresholds), sorted by threshold; accept <=> oriented statistic <= threshold.
    """
    ms = rule.oriented_statistic(mates)
    correct = mates.found & (mates.label1 == np.asarray(mate_labels))
    ss = np.sort(rule.oriented_statistic(strangers))
    cand = np.unique(np.r_[ms[np.isfinite(ms)], ss[np.isfinite(ss)]])
    hits = np.sort(ms[correct])
    n_m = max(1, len(mates))
    n_s = max(1, ss.size)
    dir_ = np.searchsorted(hits, cand, side="right") / n_m
    fpir = np.searchsorted(ss, cand, side="right") / n_s
    return fpir.astype(np.float64), dir_.astype(np.float64), cand
