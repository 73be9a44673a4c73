"""Per-track recognition: a few quality-gated encodings of each track, one quality-weighted vote, one decision.

A person walking to the door is seen on dozens of frames; encoding every one would cost the CPU the detector needs,
and deciding on any single frame would trust its worst moment (blur, a turned head, a hand over the mouth). So, per
confirmed track:

1. **Sampling.** A track is sampled (aligned, gated, encoded) at most `max_encodes` times, at least
   `min_encode_interval_s` apart, at most `max_encodes_per_frame` tracks per frame (the fewest-sampled, largest
   faces first), and only until it is decided. The quality gate runs in two steps: before alignment on what the
   detector gives for free (score, face size, eye distance) and after alignment on the chip (Laplacian blur) and
   the pose (yaw, pitch from the landmarks, `models.face.quality.face_figures`). A rejected face costs no encode and
   does not count as a sample (the next frame may be better). Each accepted sample gets a quality weight in
   (0, 1]: detector score x size factor x sharpness factor x pose factor.
2. **Vote** (`vote`). Each sample's k nearest gallery identities (`GalleryIndex.search`) are its ballot and name
   the candidates: every sample gives its weight to its nearest identity, and the identity with the most weight
   wins. Its distance is the *weighted mean* of the samples' distances to it (not the best one: a stranger's samples
   scatter, and taking the minimum over five noisy draws is how strangers get matched). The runner-up is the other
   candidate with the smallest weighted mean distance. The means are taken over *exact* distances of every sample
   to every candidate's templates (`GalleryIndex.distances_to`), also where a sample's top-k list lacks that
   identity: filling the gap with the list's largest distance would under-state the winner's distance, so a track
   could be accepted on distances it never had.
   Then the door's `models.decision.rules.DecisionRule` (distance, ratio or margin, with its threshold and cap: the
   config's, else the site's calibrated rule from the gallery's manifest, else the encoder's default; `rule_in_force`)
   judges (d1, d2) exactly as it judges a single probe, and the winner must also hold at least `min_vote_share` of
   the weight. Otherwise the track is unknown; `distance` / `margin` still report d1 and d2 - d1 for the logs.
3. **Decision, once per track.** Early, as soon as `min_samples` samples make an accepting vote; at `max_encodes`
   samples whatever the vote says; when the track ends (with what it has); or `unknown_after_s` after the track
   began. After that the track is only followed until it ends (a person standing at the door produces one
   decision). A track that ends without any usable sample produces no decision at all (nobody could tell who it
   was; counted in `RecognizerStats.tracks_unusable`).

Gallery changes: every sample remembers the gallery version it was searched in; at decision time samples of an
older version are searched again in the current index, so one decision is always made under one gallery version,
which it reports. **No gallery** (no index yet, or an index with no templates): every decision is `unknown` with
`distance` and `margin` None and `gallery_version` 0; samples are still encoded (a gallery arriving mid-track
re-searches them).

The decision carries the track's best frame (the highest-weighted sample's RGB frame, or before any sample the
frame with the best detector view) and the face box in it, for the event's snapshot, and the best sample's
embedding and quality weight (what an edge that shares unknown visitors sends with the face crop).

Single-threaded: the inference worker owns one Recognizer per camera.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from types import MappingProxyType
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from edge_agent.gallery.index import GalleryIndex, Matches
from edge_agent.recognition.tracker import EndedTrack, TrackedFace, TrackUpdate
from models.decision.rules import DecisionRule, Neighbours
from models.errors import ConfigError, RecognitionError
from models.face.encoders import DLIB_RESNET
from models.face.quality import (
    LOW_CONFIDENCE,
    OFF_FRONTAL,
    TOO_BLURRED,
    TOO_SMALL,
    FaceFigures,
    face_figures,
)
from models.types import Detection, FaceEmbedding

log = logging.getLogger(__name__)

_NO_EMBEDDING = np.zeros(0, dtype=np.float32)  # face_figures reads only the detection of a FaceEmbedding
_NO_EMBEDDING.setflags(write=False)


def _number(key: str, value: object, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"recognition.{key}: must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"recognition.{key}: must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"recognition.{key}: must be <= {high}, got {value}")
    return float(value)


def _integer(key: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"recognition.{key}: must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"recognition.{key}: must be >= {low}, got {value}")
    return value


# The open-set rule applied to a track's vote (the config's top-level `decision`, as `model-tool calibrate` writes
# it; a config without one takes its encoder's calibrated default, models/face/encoders.py). This is the default
# encoder's.
DEFAULT_RULE = DLIB_RESNET.default_decision

RuleSource = Literal["config", "site", "encoder default"]


def rule_in_force(
    rule: DecisionRule, index: GalleryIndex | None, *, site_rules: bool
) -> tuple[DecisionRule, RuleSource]:
    """The rule that decides under `index`, and where it comes from.

    `site_rules` False: `rule` is the config's own and always wins. True: `rule` is the encoder's default, and the
    site's calibrated rule carried by the gallery in service (its signed manifest) replaces it. That rule belongs to
    the gallery's encoder fingerprint, which is this door's, or the gallery would not be in service.
    """
    if not site_rules:
        return rule, "config"
    site = None if index is None else index.gallery.decision
    if site is None:
        return rule, "encoder default"
    return site.rule, "site"


@dataclass(frozen=True)
class RecognitionConfig:
    k: int = 3  # identities asked of the gallery per sample (>= 2: the runner-up is needed)
    max_encodes: int = 5  # samples per track at most; a track is decided when it has this many
    min_samples: int = 3  # an accepting vote of this many samples decides early
    min_encode_interval_s: float = 0.15  # between two samples of one track
    max_encodes_per_frame: int = 4  # chips encoded together per frame at most
    unknown_after_s: float = 10.0  # a track still undecided this long after it began is decided with what it has
    min_vote_share: float = 0.5  # of the samples' total weight that must go to the winner
    # quality gate (edge captures: looser than enrollment's models.face.quality.QualityConfig, the vote absorbs noise)
    min_detector_score: float = 0.8
    min_face_px: float = 36.0  # the face box's shorter side
    min_eye_distance_px: float = 16.0
    min_blur: float = 15.0  # Laplacian variance of the aligned grey chip
    max_yaw: float = 0.45  # |nose offset from the eyes' midpoint| / eye distance
    pitch_range: tuple[float, float] = (0.25, 0.95)  # (nose - eyes) / (mouth - eyes)
    # a sample gets the full size / sharpness weight from these figures up (linear below, floored at 0.25)
    full_eye_distance_px: float = 45.0
    full_blur: float = 100.0

    def __post_init__(self) -> None:
        _integer("k", self.k, 2)
        _integer("max_encodes", self.max_encodes, 1)
        _integer("min_samples", self.min_samples, 1)
        _integer("max_encodes_per_frame", self.max_encodes_per_frame, 1)
        if self.min_samples > self.max_encodes:
            raise ConfigError(
                f"recognition.min_samples: must be <= max_encodes ({self.max_encodes}), got {self.min_samples}"
            )
        _number("min_encode_interval_s", self.min_encode_interval_s, low=0.0)
        if _number("unknown_after_s", self.unknown_after_s, low=0.0) <= 0:
            raise ConfigError(f"recognition.unknown_after_s: must be > 0, got {self.unknown_after_s}")
        _number("min_vote_share", self.min_vote_share, low=0.0, high=1.0)
        _number("min_detector_score", self.min_detector_score, low=0.0, high=1.0)
        for key in ("min_face_px", "min_eye_distance_px", "min_blur", "max_yaw"):
            _number(key, getattr(self, key), low=0.0)
        for key in ("full_eye_distance_px", "full_blur"):
            if _number(key, getattr(self, key), low=0.0) <= 0:
                raise ConfigError(f"recognition.{key}: must be > 0, got {getattr(self, key)}")
        if len(self.pitch_range) != 2:
            raise ConfigError(f"recognition.pitch_range: expected [low, high], got {self.pitch_range!r}")
        lo = _number("pitch_range[0]", self.pitch_range[0])
        hi = _number("pitch_range[1]", self.pitch_range[1])
        if lo >= hi:
            raise ConfigError(f"recognition.pitch_range: low must be < high, got {self.pitch_range!r}")


class DecisionReason(str, enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"  # the rule (distance / ratio / margin) did not accept the vote's winner
    SPLIT_VOTE = "split_vote"  # the rule accepted, but the winner held less than min_vote_share of the weight
    NO_GALLERY = "no_gallery"  # nothing to compare with (no index, or an empty one)


class Trigger(str, enum.Enum):
    """Why the track was decided when it was."""

    EVIDENCE = "evidence"  # min_samples samples made an accepting vote
    MAX_SAMPLES = "max_samples"  # max_encodes samples
    TRACK_ENDED = "track_ended"
    TIMEOUT = "timeout"  # unknown_after_s


@dataclass(frozen=True)
class SampleQuality:
    accepted: bool
    reason: str | None  # a models.face.quality reason code when rejected
    weight: float  # (0, 1] when accepted, 0 otherwise
    figures: FaceFigures | None = None


@dataclass(frozen=True)
class Vote:
    """A track's vote (see the module docstring); `person_id` is set only when accepted."""

    person_id: str | None
    candidate: str | None  # the winner, accepted or not (None: no neighbour at all)
    distance: float | None  # d1: the winner's weighted mean distance
    second_distance: float | None  # d2: the runner-up's (None: no other identity)
    share: float  # the winner's part of the weight (0 without neighbours)
    reason: DecisionReason
    samples: int  # samples that had a neighbour

    @property
    def margin(self) -> float | None:
        if self.distance is None or self.second_distance is None:
            return None
        return self.second_distance - self.distance


@dataclass(frozen=True, eq=False)
class TrackDecision:
    """The outcome of one track: what the agent turns into an attendance event (if the AttendanceGate admits it)."""

    camera: str
    track_id: int
    person_id: str | None  # None: unknown
    name: str | None
    distance: float | None  # the vote's d1 (None: no gallery to compare with)
    margin: float | None  # d2 - d1 to the next identity (None: no gallery, or no other identity in it)
    # the largest accepted distance: the distance rule's threshold, or the ratio / margin rule's cap (`rule` says
    # which; those rules also ask d2 / d1 or d2 - d1 of the runner-up)
    threshold: float
    rule: str
    gallery_version: int  # 0: no gallery
    fingerprint: str  # the encoder's
    # the worker's clock: time.monotonic() (live cameras), or the file position (WorkerConfig.clock = "media")
    first_seen_ts: float  # the track's first frame
    decided_ts: float  # the frame (or moment) that decided it
    first_seen_wall: datetime  # UTC
    decided_wall: datetime  # UTC
    samples: int  # samples the vote used
    vote_share: float
    candidate: str | None  # nearest identity even when unknown (logs only; never on the wire)
    reason: DecisionReason
    trigger: Trigger
    frame: np.ndarray = field(repr=False)  # RGB uint8 H x W x 3, the track's best frame (read-only, shared)
    bbox: tuple[float, float, float, float]  # the face in `frame`
    frame_ts: float  # when `frame` was taken (same clock as first_seen_ts)
    embedding: np.ndarray = field(repr=False)  # the best (highest-weighted) sample's, float32 (dim,)
    quality: float  # that sample's weight, (0, 1]

    @property
    def known(self) -> bool:
        return self.person_id is not None


@dataclass(frozen=True)
class RecognizerStats:
    samples: int  # accepted samples (encodes that counted)
    rejected: Mapping[str, int]  # quality-gate rejections by reason code
    decisions_known: int
    decisions_unknown: int
    tracks_unusable: int  # confirmed tracks that ended without any usable sample (no decision)
    pending: int  # live tracks not decided yet


# identities (c,) -> exact distances (n, c) of every sample to each identity's nearest template
ExactDistances = Callable[[Sequence[str]], np.ndarray]


def vote(
    person_ids: ArrayLike,
    distances: ArrayLike,
    weights: ArrayLike,
    rule: DecisionRule,
    *,
    min_vote_share: float = 0.5,
    exact: ExactDistances | None = None,
) -> Vote:
    """Quality-weighted vote over samples: `person_ids` (n, k) (None = padding), `distances` (n, k) ascending per row
    (inf = padding), `weights` (n,) > 0. See the module docstring.

    `exact(identities)` gives every sample's exact distance to each candidate identity (the recognizer passes
    `GalleryIndex.distances_to`); the means are taken over those. Without it the lists must be a complete table: a
    sample whose list lacks a candidate some other list names is a RecognitionError, never a guessed distance."""
    dist = np.asarray(distances, dtype=np.float64)
    ids = np.asarray(person_ids, dtype=object)
    w = np.asarray(weights, dtype=np.float64)
    if dist.ndim != 2 or ids.shape != dist.shape or w.shape != (dist.shape[0],):
        raise RecognitionError(
            f"vote: person_ids {ids.shape} and distances {dist.shape} must be (n, k), weights (n,), got {w.shape}"
        )
    if np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise RecognitionError("vote: weights must be finite and > 0")
    valid = np.isfinite(dist[:, 0]) if dist.shape[1] else np.zeros(dist.shape[0], dtype=bool)
    if not valid.any():
        return Vote(None, None, None, None, 0.0, DecisionReason.NO_GALLERY, 0)
    dist, ids, w = dist[valid], ids[valid], w[valid]
    finite = np.isfinite(dist)
    identities = sorted({str(p) for p in ids[finite]})
    column = {p: j for j, p in enumerate(identities)}
    n = dist.shape[0]
    votes = np.zeros(len(identities))
    for i in range(n):
        votes[column[str(ids[i, 0])]] += w[i]
    if exact is not None:
        table = np.asarray(exact(identities), dtype=np.float64)
        if table.shape != (valid.size, len(identities)):
            raise RecognitionError(
                f"vote: exact distances must be ({valid.size}, {len(identities)}), got {table.shape}"
            )
        table = table[valid]
    else:
        table = np.full((n, len(identities)), np.nan)
        for i in range(n):
            for j in np.flatnonzero(finite[i]):
                table[i, column[str(ids[i, j])]] = dist[i, j]
        gaps = np.argwhere(np.isnan(table))
        if gaps.size:
            i, j = gaps[0]
            raise RecognitionError(
                f"vote: sample {i}'s list lacks candidate {identities[j]!r}; pass exact distances to vote on it"
            )
    mean = (w[:, None] * table).sum(axis=0) / w.sum()
    # most weight wins; equal weight: the smaller mean distance, then the id (deterministic)
    winner = min(range(len(identities)), key=lambda j: (-votes[j], mean[j], identities[j]))
    d1 = float(mean[winner])
    share = float(votes[winner] / w.sum())
    others = [j for j in range(len(identities)) if j != winner]
    runner = min(others, key=lambda j: (mean[j], identities[j])) if others else None
    d2 = float(mean[runner]) if runner is not None else math.inf
    nb = Neighbours(
        np.array([identities[winner]], dtype=object),
        np.array([d1]),
        np.array([identities[runner if runner is not None else winner]], dtype=object),
        np.array([d2]),
    )
    accepted = bool(rule.accepts(nb)[0])
    if not accepted:
        reason = DecisionReason.REJECTED
    elif share < min_vote_share:
        reason = DecisionReason.SPLIT_VOTE
    else:
        reason = DecisionReason.ACCEPTED
    return Vote(
        identities[winner] if reason is DecisionReason.ACCEPTED else None,
        identities[winner],
        d1,
        d2 if math.isfinite(d2) else None,
        share,
        reason,
        n,
    )


def _no_neighbours(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(k, None, dtype=object), np.full(k, np.inf)


def _fit(person_ids: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A search result row cut or padded to k identities, so that every sample's row stacks with the others."""
    ids, dist = _no_neighbours(k)
    n = min(k, len(distances))
    ids[:n] = person_ids[:n]
    dist[:n] = distances[:n]
    return ids, dist


@dataclass(eq=False)
class _Sample:
    embedding: np.ndarray
    weight: float
    version: int  # gallery version it was searched in (0: none)
    person_ids: np.ndarray  # (k,) object
    distances: np.ndarray  # (k,)


@dataclass(eq=False)
class _TrackState:
    first_seen: float
    first_wall: datetime
    samples: list[_Sample] = field(default_factory=list)
    last_sample_ts: float | None = None
    decided: bool = False
    ready: Trigger | None = None  # set when samples call for a decision
    fresh: bool = False  # a sample came since the last early vote
    best_weight: float = -1.0  # best sample's weight (-1: none yet)
    best_embedding: np.ndarray | None = None  # that sample's embedding
    best_view: float = -1.0  # best detector view's score before any sample
    frame: np.ndarray | None = None
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    frame_ts: float = 0.0


class Recognizer:
    """Per-track sampling, voting and deciding for one camera (see the module docstring).

    Per frame, the worker calls `observe` (which tracks to sample), aligns those faces and checks each chip with
    `assess`, encodes the accepted chips in one batch, searches the gallery, hands the results to `add_samples`,
    and finally calls `decide` with the tracks the tracker ended.
    """

    def __init__(
        self,
        camera: str,
        config: RecognitionConfig | None = None,
        *,
        fingerprint: str,
        rule: DecisionRule = DEFAULT_RULE,
        site_rules: bool = False,
    ) -> None:
        """`rule` and `site_rules`: see `rule_in_force`."""
        self.camera = camera
        self.config = config or RecognitionConfig()
        self.rule = rule
        self.site_rules = site_rules
        self.fingerprint = fingerprint
        self._tracks: dict[int, _TrackState] = {}
        self._samples = 0
        self._rejected: Counter[str] = Counter()
        self._known = 0
        self._unknown = 0
        self._unusable = 0

    # --- quality --------------------------------------------------------------------------------------------------
    def gate(self, detection: Detection) -> str | None:
        """The pre-alignment gate: a models.face.quality reason code, or None when the face is worth aligning."""
        cfg = self.config
        if detection.score < cfg.min_detector_score:
            return LOW_CONFIDENCE
        if min(detection.width, detection.height) < cfg.min_face_px:
            return TOO_SMALL
        le, re = detection.landmarks[0], detection.landmarks[1]
        if math.hypot(re[0] - le[0], re[1] - le[1]) < cfg.min_eye_distance_px:
            return TOO_SMALL
        return None

    def assess(self, detection: Detection, chip: np.ndarray) -> SampleQuality:
        """The full gate on the aligned chip (blur) and the landmarks (size, pose), and the sample's weight."""
        cfg = self.config
        reason = self.gate(detection)
        if reason is not None:
            return SampleQuality(False, reason, 0.0)
        fig = face_figures(FaceEmbedding(detection, _NO_EMBEDDING), chip)
        lo, hi = cfg.pitch_range
        if fig.blur < cfg.min_blur:
            return SampleQuality(False, TOO_BLURRED, 0.0, fig)
        if abs(fig.yaw) > cfg.max_yaw or not lo <= fig.pitch <= hi:
            return SampleQuality(False, OFF_FRONTAL, 0.0, fig)
        size = min(1.0, max(0.25, fig.eye_distance_px / cfg.full_eye_distance_px))
        sharp = min(1.0, max(0.25, fig.blur / cfg.full_blur))
        pose = 1.0 - 0.5 * min(1.0, abs(fig.yaw) / cfg.max_yaw) if cfg.max_yaw > 0 else 1.0
        weight = max(1e-3, fig.detector_score * size * sharp * pose)
        return SampleQuality(True, None, weight, fig)

    def reject(self, reason: str) -> None:
        """Count a face the worker dropped at the gate (for stats)."""
        self._rejected[reason] += 1

    # --- per frame ------------------------------------------------------------------------------------------------
    def observe(self, update: TrackUpdate, image: np.ndarray, wall: datetime) -> list[TrackedFace]:
        """Register this frame's confirmed tracks; return those to sample on it (best first, at most
        max_encodes_per_frame): undecided, short of max_encodes samples, not sampled in the last
        min_encode_interval_s, and through the pre-alignment gate. `image`: the RGB frame (kept by reference)."""
        cfg = self.config
        wanted: list[TrackedFace] = []
        for face in update.confirmed:
            state = self._tracks.get(face.track_id)
            if state is None:
                state = _TrackState(face.first_seen, wall - timedelta(seconds=max(0.0, update.ts - face.first_seen)))
                self._tracks[face.track_id] = state
            if state.decided:
                continue
            if state.best_weight < 0:  # no sample yet: keep the best detector view for the snapshot
                view = face.detection.score * min(1.0, min(face.detection.width, face.detection.height) / 150.0)
                if view > state.best_view:
                    state.best_view, state.frame, state.bbox = view, image, face.detection.bbox
                    state.frame_ts = update.ts
            if len(state.samples) >= cfg.max_encodes or state.ready is not None:
                continue
            if state.last_sample_ts is not None and update.ts - state.last_sample_ts < cfg.min_encode_interval_s:
                continue
            reason = self.gate(face.detection)
            if reason is not None:
                self._rejected[reason] += 1
                continue
            wanted.append(face)
        wanted.sort(
            key=lambda f: (
                len(self._tracks[f.track_id].samples),
                -min(f.detection.width, f.detection.height),
                f.track_id,
            )
        )
        return wanted[: cfg.max_encodes_per_frame]

    def add_samples(
        self,
        faces: Sequence[TrackedFace],
        qualities: Sequence[SampleQuality],
        embeddings: np.ndarray,
        matches: Matches | None,
        gallery_version: int,
        ts: float,
        image: np.ndarray,
    ) -> None:
        """Accepted samples of this frame: `faces[i]` encoded as `embeddings[i]` with `qualities[i]` (accepted),
        and its gallery neighbours row i of `matches` (searched in `gallery_version`; None / 0 without a gallery)."""
        n = len(faces)
        if len(qualities) != n or len(embeddings) != n or (matches is not None and len(matches.distances) != n):
            raise RecognitionError(
                f"add_samples: {n} faces, {len(qualities)} qualities, {len(embeddings)} embeddings"
                + ("" if matches is None else f", {len(matches.distances)} matches")
            )
        cfg = self.config
        for i, (face, quality) in enumerate(zip(faces, qualities, strict=True)):
            state = self._tracks.get(face.track_id)
            if state is None or state.decided or not quality.accepted:
                continue
            if matches is None:
                (ids, dist), version = _no_neighbours(cfg.k), 0
            else:
                ids, dist = _fit(matches.person_ids[i], matches.distances[i], cfg.k)
                version = gallery_version
            vector = np.asarray(embeddings[i], dtype=np.float32)
            state.samples.append(_Sample(vector, quality.weight, version, ids, dist))
            state.last_sample_ts = ts
            self._samples += 1
            if quality.weight > state.best_weight:
                state.best_weight, state.frame, state.bbox = quality.weight, image, face.detection.bbox
                state.frame_ts = ts
                state.best_embedding = vector
            state.fresh = True
            if len(state.samples) >= cfg.max_encodes:
                state.ready = Trigger.MAX_SAMPLES

    def decide(
        self,
        ended: Sequence[EndedTrack],
        index: GalleryIndex | None,
        ts: float,
        wall: datetime,
    ) -> list[TrackDecision]:
        """Decisions due now: tracks whose samples call for one, tracks past unknown_after_s, and the `ended`
        tracks (forgotten afterwards). `index`: the gallery in service now (None: none yet)."""
        out: list[TrackDecision] = []
        for track_id, state in self._tracks.items():
            if state.decided:
                continue
            trigger = state.ready
            if trigger is None and state.fresh and len(state.samples) >= self.config.min_samples:
                state.fresh = False
                self._refresh(state.samples, index)
                if self._vote(state.samples, index).reason is DecisionReason.ACCEPTED:
                    trigger = Trigger.EVIDENCE
            if trigger is None and state.samples and ts - state.first_seen >= self.config.unknown_after_s:
                trigger = Trigger.TIMEOUT  # (a track without a usable sample yet keeps waiting for one)
            if trigger is not None:
                decision = self._decide(track_id, state, trigger, index, ts, wall)
                if decision is not None:
                    out.append(decision)
        for end in ended:
            state = self._tracks.pop(end.track_id, None)
            if state is None or state.decided:
                continue
            decision = self._decide(end.track_id, state, Trigger.TRACK_ENDED, index, ts, wall)
            if decision is not None:
                out.append(decision)
        return out

    def stats(self) -> RecognizerStats:
        return RecognizerStats(
            samples=self._samples,
            rejected=MappingProxyType(dict(self._rejected)),
            decisions_known=self._known,
            decisions_unknown=self._unknown,
            tracks_unusable=self._unusable,
            pending=self.pending,
        )

    @property
    def pending(self) -> int:
        return sum(1 for s in self._tracks.values() if not s.decided)

    # --- internals ------------------------------------------------------------------------------------------------
    def _vote(self, samples: Sequence[_Sample], index: GalleryIndex | None) -> Vote:
        """The vote over samples brought to `index` (see `_refresh`), on exact distances to its candidates."""
        exact = None if index is None else partial(index.distances_to, np.stack([s.embedding for s in samples]))
        return vote(
            np.stack([s.person_ids for s in samples]),
            np.stack([s.distances for s in samples]),
            np.array([s.weight for s in samples]),
            rule_in_force(self.rule, index, site_rules=self.site_rules)[0],
            min_vote_share=self.config.min_vote_share,
            exact=exact,
        )

    def _refresh(self, samples: list[_Sample], index: GalleryIndex | None) -> int:
        """Bring every sample to the gallery in service (search again those of another version); its version."""
        if index is None or index.templates == 0:
            for s in samples:
                s.person_ids, s.distances = _no_neighbours(self.config.k)
                s.version = 0
            return 0
        stale = [s for s in samples if s.version != index.version]
        if stale:
            found = index.search(np.stack([s.embedding for s in stale]), k=self.config.k)
            for s, ids, dist in zip(stale, found.person_ids, found.distances, strict=True):
                s.person_ids, s.distances, s.version = ids, dist, index.version
            log.debug("camera %s: %d sample(s) searched again in gallery v%d", self.camera, len(stale), index.version)
        return index.version

    def _decide(
        self,
        track_id: int,
        state: _TrackState,
        trigger: Trigger,
        index: GalleryIndex | None,
        ts: float,
        wall: datetime,
    ) -> TrackDecision | None:
        state.decided = True
        samples, frame, embedding = state.samples, state.frame, state.best_embedding
        # a decided track keeps nothing heavy until it ends
        state.samples, state.frame, state.best_embedding = [], None, None
        if not samples or frame is None or embedding is None:
            self._unusable += 1
            log.debug("camera %s track %d: ended without a usable face, no decision", self.camera, track_id)
            return None
        version = self._refresh(samples, index)
        v = self._vote(samples, index)
        rule = rule_in_force(self.rule, index, site_rules=self.site_rules)[0]
        name = index.labels.get(v.person_id) if index is not None and v.person_id is not None else None
        decision = TrackDecision(
            camera=self.camera,
            track_id=track_id,
            person_id=v.person_id,
            name=name,
            distance=v.distance,
            margin=v.margin,
            threshold=rule.threshold if rule.max_distance is None else rule.max_distance,
            rule=rule.rule,
            gallery_version=version,
            fingerprint=self.fingerprint,
            first_seen_ts=state.first_seen,
            decided_ts=ts,
            first_seen_wall=state.first_wall,
            decided_wall=wall,
            samples=len(samples),
            vote_share=v.share,
            candidate=v.candidate,
            reason=v.reason,
            trigger=trigger,
            frame=frame,
            bbox=state.bbox,
            frame_ts=state.frame_ts,
            embedding=embedding,
            quality=state.best_weight,
        )
        if decision.known:
            self._known += 1
        else:
            self._unknown += 1
        log.info(
            "camera %s track %d: %s (%s, %s) d1=%s margin=%s share=%.2f from %d sample(s), gallery v%d",
            self.camera,
            track_id,
            v.person_id or "unknown",
            v.reason.value,
            trigger.value,
            "-" if v.distance is None else f"{v.distance:.3f}",
            "-" if v.margin is None else f"{v.margin:.3f}",
            v.share,
            len(samples),
            version,
        )
        return decision
