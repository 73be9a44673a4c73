"""Per-track recognition: the quality-weighted vote, when a track is decided (early, at max samples, at its end, on
timeout; once), the empty-gallery and gallery-swap cases, sampling choices, the quality gate on real chips, and
real embeddings of real photos (enrolled people recognised, strangers unknown)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import facesets
import numpy as np
import pytest
from detections import det

from edge_agent.gallery.index import GalleryIndex
from edge_agent.recognition.recognizer import (
    DEFAULT_RULE,
    DecisionReason,
    RecognitionConfig,
    Recognizer,
    SampleQuality,
    TrackDecision,
    Trigger,
    rule_in_force,
    vote,
)
from edge_agent.recognition.tracker import Tracker, TrackerConfig, TrackUpdate
from models.config import load_dataclass
from models.contract.gallery import Gallery, GalleryPerson, SiteDecision
from models.decision.rules import DecisionRule
from models.errors import ConfigError, RecognitionError
from models.face.quality import LOW_CONFIDENCE, OFF_FRONTAL, TOO_BLURRED, TOO_SMALL
from models.types import Detection

DIM = 128
FP = "dlib_resnet_v1-unit000000000000"
WALL = datetime(2025, 1, 6, 8, 30, tzinfo=timezone.utc)
FRAME = np.zeros((48, 64, 3), np.uint8)


# --- synthetic embeddings: people far apart (~1.1), samples at a chosen distance from their person -------------------
def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM)
    return v / np.linalg.norm(v)


CENTRES = {p: 0.8 * unit(np.random.default_rng(i)) for i, p in enumerate(("alice", "bob", "carol"))}


def near(person: str, distance: float, seed: int) -> np.ndarray:
    """A vector exactly `distance` from `person`'s centre."""
    d = unit(np.random.default_rng(1000 + seed))
    return (CENTRES[person] + distance * d).astype(np.float32)


def stranger(seed: int) -> np.ndarray:
    return (0.8 * unit(np.random.default_rng(5000 + seed))).astype(np.float32)


def index_of(people: Sequence[str], version: int = 1, decision: SiteDecision | None = None) -> GalleryIndex:
    vectors = np.stack([CENTRES[p] for p in people]).astype(np.float32)
    gallery = Gallery(
        "hq",
        version,
        FP,
        "euclidean",
        "float32",
        vectors,
        np.arange(len(people), dtype=np.int32),
        tuple(GalleryPerson(p, p.title()) for p in people),
        decision=decision,
    )
    return GalleryIndex.build(gallery)


@dataclass
class Run:
    """Drives a Tracker and a Recognizer frame by frame the way the worker does, with given embeddings."""

    recognizer: Recognizer
    tracker: Tracker
    fps: float = 15.0
    frame_no: int = 0

    def frame(
        self,
        faces: Sequence[tuple[Detection, np.ndarray | None, float]],
        index: GalleryIndex | None,
        image: np.ndarray = FRAME,
    ) -> tuple[TrackUpdate, list[int], list[TrackDecision]]:
        """One frame with faces (detection, embedding when sampled, weight); returns the update, the sampled track
        ids and the decisions."""
        ts = self.frame_no / self.fps
        self.frame_no += 1
        update = self.tracker.update([f[0] for f in faces], ts)
        wanted = self.recognizer.observe(update, image, WALL)
        by_box = {f[0].bbox: f for f in faces}
        chosen = [w for w in wanted if by_box[w.detection.bbox][1] is not None]
        if chosen:
            emb = np.stack([by_box[w.detection.bbox][1] for w in chosen])
            q = [SampleQuality(True, None, by_box[w.detection.bbox][2]) for w in chosen]
            usable = index if index is not None and index.templates else None
            matches = usable.search(emb, k=self.recognizer.config.k) if usable is not None else None
            version = usable.version if usable is not None else 0
            self.recognizer.add_samples(chosen, q, emb, matches, version, ts, image)
        decisions = self.recognizer.decide(update.ended, index, ts, WALL)
        return update, [w.track_id for w in wanted], decisions

    def end(self, index: GalleryIndex | None) -> list[TrackDecision]:
        return self.recognizer.decide(self.tracker.flush(), index, self.frame_no / self.fps, WALL)


def run(config: RecognitionConfig | None = None, tracker: TrackerConfig | None = None) -> Run:
    return Run(Recognizer("door", config or RecognitionConfig(), fingerprint=FP), Tracker(tracker, camera="door"))


# --- vote ---------------------------------------------------------------------------------------------------------
RULE = DecisionRule.distance(0.55)


# --- which rule decides: the config's, else the site's from the gallery, else the encoder's default --------------
STRICT_SITE = SiteDecision(DecisionRule.distance(0.3), 0.01, 3, 40, 500, "2026-12-06T10:00:00Z")


@pytest.mark.parametrize(
    ("site_rules", "decision", "expected", "source"),
    [
        (True, STRICT_SITE, STRICT_SITE.rule, "site"),
        (True, None, DEFAULT_RULE, "encoder default"),
        (False, STRICT_SITE, DEFAULT_RULE, "config"),  # an explicit config rule wins over the site's
    ],
)
def test_the_rule_in_force_and_its_source(site_rules, decision, expected, source) -> None:
    index = index_of(["alice", "bob", "carol"], decision=decision)
    assert rule_in_force(DEFAULT_RULE, index, site_rules=site_rules) == (expected, source)
    recognizer = Recognizer("door", RecognitionConfig(min_samples=3), fingerprint=FP, site_rules=site_rules)
    r = Run(recognizer, Tracker(None, camera="door"))
    decisions = [d for i in range(30) for d in r.frame([(det(100 + i), near("alice", 0.35, i), 0.9)], index)[2]]
    decisions += r.end(index)
    [d] = decisions
    assert (d.rule, d.threshold) == (expected.rule, expected.max_distance or expected.threshold)
    # alice at 0.35: the default ratio rule (cap 0.5) lets her in, the site's strict distance 0.3 does not
    assert d.person_id == (None if source == "site" else "alice")
    assert d.reason is (DecisionReason.REJECTED if source == "site" else DecisionReason.ACCEPTED)


def test_no_gallery_decides_under_the_encoder_default() -> None:
    assert rule_in_force(DEFAULT_RULE, None, site_rules=True) == (DEFAULT_RULE, "encoder default")


def test_vote_accepts_a_consistent_track_with_mean_distance_and_margin() -> None:
    ids = [["a", "b", "c"], ["a", "c", "b"], ["a", "b", "c"]]
    dist = [[0.30, 0.90, 1.00], [0.40, 0.95, 1.00], [0.50, 0.85, 0.90]]
    v = vote(ids, dist, [1.0, 1.0, 2.0], RULE)
    assert v.reason is DecisionReason.ACCEPTED and v.person_id == "a" == v.candidate
    assert v.distance == pytest.approx((0.30 + 0.40 + 2 * 0.50) / 4)
    # runner-up: b's weighted mean (0.90 + 1.00 + 2 * 0.85) / 4 = 0.9 beats c's (1.0 + 0.95 + 1.8) / 4
    assert v.second_distance == pytest.approx(0.9)
    assert v.margin == pytest.approx(0.9 - 0.425)
    assert v.share == 1.0 and v.samples == 3


def test_vote_weight_decides_between_identities() -> None:
    ids = [["a", "b"], ["a", "b"], ["b", "a"]]
    dist = [[0.45, 0.50], [0.45, 0.50], [0.30, 0.60]]
    light_b = vote(ids, dist, [1.0, 1.0, 1.0], RULE, min_vote_share=0.0)
    heavy_b = vote(ids, dist, [0.2, 0.2, 1.0], RULE, min_vote_share=0.0)
    assert light_b.candidate == "a" and light_b.share == pytest.approx(2 / 3)
    assert heavy_b.candidate == "b" and heavy_b.share == pytest.approx(1 / 1.4)


def test_vote_split_between_identities_is_unknown_even_within_the_threshold() -> None:
    ids = [["a", "b", "c"], ["b", "a", "c"], ["c", "a", "b"], ["a", "c", "b"]]
    dist = [[0.40, 0.45, 0.5], [0.40, 0.45, 0.5], [0.40, 0.45, 0.5], [0.40, 0.46, 0.5]]
    v = vote(ids, dist, [1.0, 1.0, 1.0, 1.0], RULE, min_vote_share=0.6)
    assert v.candidate == "a" and v.share == 0.5
    assert v.reason is DecisionReason.SPLIT_VOTE and v.person_id is None
    assert v.distance is not None and v.distance <= RULE.threshold


def test_vote_uses_the_mean_not_the_best_sample_against_strangers() -> None:
    """One lucky sample at 0.45 among 0.65s: the best distance would accept, the track's mean does not."""
    ids = [["a", "b"]] * 4
    dist = [[0.45, 0.9], [0.65, 0.9], [0.66, 0.9], [0.64, 0.9]]
    v = vote(ids, dist, [1.0] * 4, RULE)
    assert v.reason is DecisionReason.REJECTED and v.person_id is None and v.candidate == "a"
    assert v.distance == pytest.approx(0.6)


def test_vote_takes_exact_distances_for_identities_a_list_lacks() -> None:
    # b is not in the second sample's top-2, c not in the first's: their exact distances there count (b 0.95, c 0.9),
    # not the list's largest one (0.7, 0.8), which would be a guess below the truth
    table = {"a": [0.3, 0.35], "b": [0.8, 0.95], "c": [0.9, 0.7]}
    ids, dist = [["a", "b"], ["a", "c"]], [[0.3, 0.8], [0.35, 0.7]]
    v = vote(ids, dist, [1.0, 1.0], RULE, exact=lambda names: np.array([table[p] for p in names]).T)
    assert v.person_id == "a" and v.distance == pytest.approx(0.325)
    assert v.second_distance == pytest.approx(0.8)  # c: (0.9 + 0.7) / 2 = 0.8 beats b: (0.8 + 0.95) / 2 = 0.875
    # without exact distances an incomplete table is refused, never filled with a guess
    with pytest.raises(RecognitionError, match="sample 0's list lacks candidate 'c'"):
        vote(ids, dist, [1.0, 1.0], RULE)


def test_vote_without_neighbours_and_with_a_single_identity() -> None:
    none = vote([[None, None]] * 2, [[math.inf, math.inf]] * 2, [1.0, 1.0], RULE)
    assert none.reason is DecisionReason.NO_GALLERY and none.candidate is None
    assert none.distance is None and none.margin is None and none.share == 0.0 and none.samples == 0
    single = vote([["a", None]], [[0.4, math.inf]], [1.0], RULE)
    assert single.person_id == "a" and single.second_distance is None and single.margin is None
    # ratio / margin rules see d2 = inf with one identity: they fall back to their distance cap (models.decision.rules)
    assert vote([["a", None]], [[0.4, math.inf]], [1.0], DecisionRule.ratio(0.8)).person_id == "a"
    assert vote([["a", None]], [[0.7, math.inf]], [1.0], DecisionRule.ratio(0.8)).person_id is None


def test_vote_applies_the_ratio_and_margin_rules() -> None:
    ids, dist = [["a", "b"]] * 2, [[0.40, 0.46], [0.40, 0.46]]
    assert vote(ids, dist, [1.0, 1.0], DecisionRule.distance(0.55)).person_id == "a"
    assert vote(ids, dist, [1.0, 1.0], DecisionRule.ratio(0.8)).reason is DecisionReason.REJECTED
    assert vote(ids, dist, [1.0, 1.0], DecisionRule.margin(0.1)).reason is DecisionReason.REJECTED
    assert vote(ids, [[0.4, 0.9]] * 2, [1.0, 1.0], DecisionRule.margin(0.1)).person_id == "a"


@pytest.mark.parametrize(
    ("ids", "dist", "weights", "message"),
    [
        ([["a"]], [[0.1, 0.2]], [1.0], "must be"),
        ([["a", "b"]], [[0.1, 0.2]], [1.0, 1.0], "weights"),
        ([["a", "b"]], [[0.1, 0.2]], [0.0], "weights must be finite and > 0"),
        ([["a", "b"]], [[0.1, 0.2]], [math.nan], "weights must be finite"),
    ],
)
def test_vote_rejects_inconsistent_input(ids: list, dist: list, weights: list, message: str) -> None:
    with pytest.raises(RecognitionError, match=message):
        vote(ids, dist, weights, RULE)


# --- deciding a track -----------------------------------------------------------------------------------------------
def test_an_enrolled_person_is_decided_early_once_and_then_only_followed() -> None:
    index = index_of(["alice", "bob", "carol"])
    r = run(RecognitionConfig(min_samples=3, max_encodes=5, min_encode_interval_s=0.1))
    decisions: list[TrackDecision] = []
    sampled_frames = []
    for i in range(30):
        _, sampled, got = r.frame([(det(100 + i), near("alice", 0.35, i), 0.9)], index)
        if sampled:
            sampled_frames.append(i)
        decisions += got
        if got:
            decided_at = i
    assert len(decisions) == 1
    d = decisions[0]
    assert (d.person_id, d.name, d.camera, d.track_id) == ("alice", "Alice", "door", 1)
    assert d.reason is DecisionReason.ACCEPTED and d.trigger is Trigger.EVIDENCE and d.samples == 3
    assert d.distance == pytest.approx(0.35, abs=1e-5)
    assert d.margin is not None and d.margin > 0.5
    assert (d.threshold, d.rule, d.gallery_version, d.fingerprint) == (0.5, "ratio", 1, FP)
    assert d.first_seen_ts == 0.0 and d.decided_ts == pytest.approx(decided_at / 15)
    # the wall time of the first (tentative) frame, one frame before the confirming one
    assert d.first_seen_wall == WALL - timedelta(seconds=1 / 15) and d.decided_wall == WALL
    # confirmed on frame 1 (min_hits 2), then sampled every 2nd frame (0.1 s at 15 fps), decided on the 3rd sample
    assert sampled_frames == [1, 3, 5] and decided_at == 5
    # the track went on for 24 more frames without another sample or decision; its end adds nothing
    assert r.end(index) == []
    assert r.recognizer.stats().decisions_known == 1 and r.recognizer.pending == 0


def test_a_winner_missing_from_a_samples_top_k_counts_at_its_exact_distance() -> None:
    """Issue 13: two samples 0.35 from Alice, a third whose two nearest identities are Carl and Dan (Alice is 1.0
    away). Counting Alice there at that list's largest distance (0.62) made the track's mean 0.44 and accepted it
    under the 0.5 cap on distances it never had; her exact distance makes it (0.35 + 0.35 + 1.0) / 3 = 0.567."""
    e = np.eye(DIM)
    alice = 0.5 * e[10]
    s1, s2, s3 = alice + 0.35 * e[1], alice + 0.35 * e[2], alice + 1.0 * e[3]
    people = {"alice": alice, "bob": alice + 2.0 * e[6], "carl": s3 + 0.6 * e[4], "dan": s3 + 0.62 * e[5]}
    gallery = Gallery(
        "hq",
        1,
        FP,
        "euclidean",
        "float32",
        np.stack(list(people.values())).astype(np.float32),
        np.arange(len(people), dtype=np.int32),
        tuple(GalleryPerson(p, p.title()) for p in people),
    )
    index = GalleryIndex.build(gallery)
    assert list(index.search(s3.astype(np.float32), k=2).person_ids[0]) == ["carl", "dan"]  # no alice in its list
    r = run(RecognitionConfig(k=2, min_samples=3, max_encodes=3, min_encode_interval_s=0.0))
    decisions = []
    for emb in (s1, s1, s2, s3):  # the first frame is tentative (not sampled)
        decisions += r.frame([(det(100), emb.astype(np.float32), 0.9)], index)[2]
    (d,) = decisions
    assert d.candidate == "alice" and d.samples == 3 and d.vote_share == pytest.approx(2 / 3)
    assert d.distance == pytest.approx((0.35 + 0.35 + 1.0) / 3, abs=1e-5)
    assert d.person_id is None and d.reason is DecisionReason.REJECTED  # over DEFAULT_RULE's 0.5 cap


def test_a_stranger_is_unknown_after_max_encodes_with_distance_and_margin_reported() -> None:
    index = index_of(["alice", "bob", "carol"])
    r = run(RecognitionConfig(min_samples=2, max_encodes=4, min_encode_interval_s=0.0))
    decisions = []
    for i in range(10):
        decisions += r.frame([(det(100), stranger(i), 0.8)], index)[2]
    assert len(decisions) == 1
    d = decisions[0]
    assert d.person_id is None and d.name is None and not d.known
    assert d.reason is DecisionReason.REJECTED and d.trigger is Trigger.MAX_SAMPLES and d.samples == 4
    assert d.distance is not None and d.distance > 0.55 and d.margin is not None and d.candidate in CENTRES
    assert d.gallery_version == 1
    assert r.recognizer.stats().decisions_unknown == 1


def test_a_short_track_is_decided_when_it_ends_with_what_it_has() -> None:
    index = index_of(["alice", "bob"])
    r = run(RecognitionConfig(min_samples=3), TrackerConfig(max_missed_frames=2))
    for i in range(3):
        assert r.frame([(det(100), near("bob", 0.3, i), 0.9)], index)[2] == []
    assert r.frame([], index)[2] == []
    decisions = r.frame([], index)[2]  # second missed frame: the track ends
    assert [(d.person_id, d.trigger, d.samples) for d in decisions] == [("bob", Trigger.TRACK_ENDED, 1)]


def test_without_a_gallery_every_decision_is_unknown_with_no_distance() -> None:
    r = run(RecognitionConfig(min_samples=1, max_encodes=2, min_encode_interval_s=0.0))
    decisions = []
    for i in range(5):
        decisions += r.frame([(det(100), near("alice", 0.2, i), 0.9)], None)[2]
    assert len(decisions) == 1
    d = decisions[0]
    assert d.person_id is None and d.distance is None and d.margin is None and d.candidate is None
    assert d.reason is DecisionReason.NO_GALLERY and d.gallery_version == 0 and d.samples == 2
    assert d.trigger is Trigger.MAX_SAMPLES


def test_a_gallery_swap_mid_track_searches_the_old_samples_again() -> None:
    """Alice is enrolled while she stands at the door: the samples taken under v1 (without her) are searched again
    in v2, and the decision reports v2."""
    v1, v2 = index_of(["bob", "carol"], version=1), index_of(["alice", "bob", "carol"], version=2)
    r = run(RecognitionConfig(min_samples=3, max_encodes=5, min_encode_interval_s=0.0))
    decisions = []
    for i in range(3):  # a tentative frame, then two samples
        decisions += r.frame([(det(100), near("alice", 0.3, i), 0.9)], v1)[2]
    assert decisions == []
    decisions += r.frame([(det(100), near("alice", 0.3, 3), 0.9)], v2)[2]
    assert [(d.person_id, d.gallery_version, d.samples) for d in decisions] == [("alice", 2, 3)]
    assert decisions[0].distance == pytest.approx(0.3, abs=1e-5)


def test_a_track_that_cannot_be_decided_times_out() -> None:
    index = index_of(["alice", "bob"])
    cfg = RecognitionConfig(min_samples=1, max_encodes=50, min_encode_interval_s=0.5, unknown_after_s=2.0)
    r = run(cfg)
    decisions, at = [], None
    for i in range(60):
        got = r.frame([(det(100), stranger(i), 0.9)], index)[2]
        if got:
            at = i
        decisions += got
    assert [(d.person_id, d.trigger) for d in decisions] == [(None, Trigger.TIMEOUT)]
    assert at == 30 and decisions[0].samples == 4  # 2 s at 15 fps; samples at 1/15, 0.5+, 1.0+, 1.5+ s


def test_a_track_without_a_usable_face_gives_no_decision() -> None:
    index = index_of(["alice"])
    r = run(RecognitionConfig(unknown_after_s=0.5))
    for i in range(20):
        assert r.frame([(det(100 + i), None, 0.0)], index)[2] == []  # never sampled (the gate refused every chip)
    assert r.end(index) == []
    stats = r.recognizer.stats()
    assert stats.tracks_unusable == 1 and stats.decisions_known == stats.decisions_unknown == 0


def test_sampling_prefers_unsampled_then_larger_faces_and_respects_the_per_frame_cap() -> None:
    index = index_of(["alice", "bob", "carol"])
    r = run(RecognitionConfig(max_encodes_per_frame=2, min_encode_interval_s=0.0, min_samples=5, max_encodes=5))
    sizes = (60, 120, 90, 150)
    faces = [(det(20 + 160 * k, size=s), stranger(k), 0.5) for k, s in enumerate(sizes)]
    r.frame(faces, index)  # tentative: nobody sampled
    _, first, _ = r.frame(faces, index)
    _, second, _ = r.frame(faces, index)
    _, third, _ = r.frame(faces, index)
    assert first == [4, 2]  # the two largest faces (150, 120 px)
    assert second == [3, 1]  # then the two without a sample
    assert third == [4, 2]


def test_the_gate_refuses_small_and_unsure_faces_before_alignment() -> None:
    index = index_of(["alice"])
    cfg = RecognitionConfig()
    r = run(cfg)
    faces = [
        (det(0, size=30), stranger(0), 0.5),
        (det(200, score=0.75), stranger(1), 0.5),
        (det(400), stranger(2), 0.5),
    ]
    r.frame(faces, index)
    _, sampled, _ = r.frame(faces, index)
    assert sampled == [3]
    assert dict(r.recognizer.stats().rejected) == {TOO_SMALL: 1, LOW_CONFIDENCE: 1}
    assert r.recognizer.gate(det(0, size=30)) == TOO_SMALL
    assert r.recognizer.gate(det(0, score=0.5)) == LOW_CONFIDENCE
    assert r.recognizer.gate(det(0)) is None


def test_the_decision_carries_the_best_weighted_samples_frame_and_box() -> None:
    index = index_of(["alice", "bob"])
    r = run(RecognitionConfig(min_samples=5, max_encodes=5, min_encode_interval_s=0.0))
    frames = [np.full((48, 64, 3), i, np.uint8) for i in range(8)]
    weights = [0.2, 0.3, 0.9, 0.4, 0.5, 0.1, 0.1, 0.1]
    decisions = []
    for i in range(7):
        decisions += r.frame([(det(100 + i), near("alice", 0.3, i), weights[i])], index, image=frames[i])[2]
    (d,) = decisions
    # frame 0 is the tentative one; samples come from frames 1..5; frame 2's weight (0.9) is the best
    assert d.frame is frames[2] and d.bbox == det(102).bbox and d.frame_ts == pytest.approx(2 / 15) and d.samples == 5


def test_add_samples_checks_its_inputs_line_up() -> None:
    r = run()
    with pytest.raises(RecognitionError, match="1 faces, 0 qualities"):
        update = r.tracker.update([det(0)], 0.0)
        r.recognizer.add_samples(update.matched, [], np.zeros((1, DIM)), None, 0, 0.0, FRAME)


# --- configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_encodes": 0}, r"recognition\.max_encodes: must be >= 1, got 0"),
        ({"k": 1}, r"recognition\.k: must be >= 2"),
        ({"min_samples": 6}, r"recognition\.min_samples: must be <= max_encodes \(5\), got 6"),
        ({"max_encodes_per_frame": 0}, r"recognition\.max_encodes_per_frame"),
        ({"min_encode_interval_s": -1.0}, r"recognition\.min_encode_interval_s: must be >= 0"),
        ({"unknown_after_s": 0.0}, r"recognition\.unknown_after_s: must be > 0"),
        ({"min_vote_share": 1.5}, r"recognition\.min_vote_share: must be <= 1"),
        ({"min_detector_score": math.nan}, r"recognition\.min_detector_score: must be a finite number"),
        ({"pitch_range": (0.9, 0.3)}, r"recognition\.pitch_range: low must be < high"),
        ({"full_blur": 0.0}, r"recognition\.full_blur: must be > 0"),
    ],
)
def test_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RecognitionConfig(**values)


def test_config_loads_strictly() -> None:
    cfg = load_dataclass(RecognitionConfig, {"max_encodes": 4, "pitch_range": [0.2, 1.0]}, "recognition")
    assert cfg.max_encodes == 4 and cfg.pitch_range == (0.2, 1.0)
    assert DecisionRule.ratio(0.82, max_distance=0.5) == DEFAULT_RULE
    # the rule lives in the config's top-level `decision` section (what `model-tool calibrate` writes), not here
    with pytest.raises(ConfigError, match=r"recognition\.decision: unknown key"):
        load_dataclass(RecognitionConfig, {"decision": {"rule": "ratio", "threshold": 0.75}}, "recognition")
    with pytest.raises(ConfigError, match=r"recognition\.max_samples: unknown key"):
        load_dataclass(RecognitionConfig, {"max_samples": 3}, "recognition")


# --- real photos -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline() -> Iterator:
    from models.face.pipeline import FacePipeline

    pipe = FacePipeline.create()
    yield pipe
    pipe.close()


def photo_face(pipeline, path: Path) -> tuple[np.ndarray, Detection, np.ndarray]:
    """(RGB image, its largest face, that face's aligned chip)."""
    rgb = np.ascontiguousarray(cv2.imread(str(path))[:, :, ::-1])
    face = max(pipeline.detect(rgb), key=lambda d: d.width)
    return rgb, face, pipeline.aligner.align(rgb, [face])[0]


def test_assess_on_real_chips(pipeline) -> None:
    recognizer = Recognizer("door", RecognitionConfig(), fingerprint=pipeline.fingerprint)
    _, face, chip = photo_face(pipeline, facesets.photos("Matt_Damon")[0])
    good = recognizer.assess(face, chip)
    assert good.accepted and good.reason is None and 0.25 < good.weight <= 1.0 and good.figures is not None
    blurred = recognizer.assess(face, cv2.GaussianBlur(chip, (0, 0), 4))
    assert (blurred.accepted, blurred.reason, blurred.weight) == (False, TOO_BLURRED, 0.0)
    # the same face turned: the nose moved towards one eye
    lm = list(face.landmarks)
    le, re = lm[0], lm[1]
    lm[2] = (re[0] + 0.1 * (re[0] - le[0]), lm[2][1])
    turned = recognizer.assess(Detection(face.bbox, face.score, tuple(lm)), chip)
    assert (turned.accepted, turned.reason) == (False, OFF_FRONTAL)
    small = Detection((0, 0, 30, 30), 0.99, tuple((x / 10, y / 10) for x, y in face.landmarks))
    assert recognizer.assess(small, chip).reason == TOO_SMALL
    # a smaller, softer face weighs less than a large sharp one
    half = cv2.resize(cv2.resize(chip, (50, 50), interpolation=cv2.INTER_AREA), (150, 150))
    assert recognizer.assess(face, half).weight < good.weight


def test_real_embeddings_enrolled_people_are_recognised_and_strangers_are_not(pipeline) -> None:
    """Gallery: two photos of each of five people. Tracks: each enrolled person's other photos as one track's
    samples (those through the real quality gate, with its weights), and three people the gallery never saw."""
    enrolled = ("Angelina_Jolie", "Matt_Damon", "Scarlett_Johansson", "Jennifer_Aniston", "Katy_Perry")
    shown = ("Angelina_Jolie", "Matt_Damon", "Katy_Perry")
    strangers = ("Paul_Rudd", "Kate_Siegel", "Bradley_Cooper")
    photos = {p: facesets.photos(p) for p in (*enrolled, *strangers)}
    gallery_vectors, labels = [], []
    for label, p in enumerate(enrolled):
        for path in photos[p][:2]:
            rgb, face, _ = photo_face(pipeline, path)
            gallery_vectors.append(pipeline.encode_detections([rgb], [[face]])[0][0].embedding)
            labels.append(label)
    gallery = Gallery(
        "hq",
        3,
        pipeline.fingerprint,
        "euclidean",
        "float32",
        np.stack(gallery_vectors),
        np.array(labels, dtype=np.int32),
        tuple(GalleryPerson(p.lower(), p.replace("_", " ")) for p in enrolled),
    )
    index = GalleryIndex.build(gallery)
    recognizer = Recognizer("door", RecognitionConfig(min_samples=3, max_encodes=3), fingerprint=pipeline.fingerprint)
    tracker = Tracker(camera="door")
    people = [(p, photos[p][2:]) for p in shown] + [(p, photos[p][:1]) for p in strangers]
    decisions: dict[str, TrackDecision] = {}
    ts = 0.0
    for person, samples in people:
        box = det(100)
        tracker.update([box], ts)  # tentative frame
        for path in samples:
            ts += 0.2
            update = tracker.update([box], ts)
            wanted = recognizer.observe(update, FRAME, WALL)
            if not wanted:
                continue  # decided: only followed now
            rgb, face, chip = photo_face(pipeline, path)
            quality = recognizer.assess(face, chip)
            if not quality.accepted:
                continue  # e.g. a half profile: the next photo may do
            emb = pipeline.encoder.encode(chip[None])
            recognizer.add_samples(wanted, [quality], emb, index.search(emb, k=3), index.version, ts, rgb)
            for d in recognizer.decide((), index, ts, WALL):
                decisions[person] = d
        ts += 0.2
        for d in recognizer.decide(tracker.flush(), index, ts, WALL):
            decisions[person] = d
    assert set(decisions) == {*shown, *strangers}
    for p in shown:
        d = decisions[p]
        assert d.person_id == p.lower() and d.name == p.replace("_", " "), d
        assert d.samples == 3 and d.gallery_version == 3 and d.fingerprint == pipeline.fingerprint
        assert d.distance is not None and d.distance < 0.55 and d.margin is not None and d.margin > 0.1
    for p in strangers:
        d = decisions[p]
        assert d.person_id is None and d.reason is DecisionReason.REJECTED, d
        assert d.distance is not None and d.distance > 0.55


def test_search_rows_of_another_k_are_fitted_to_the_configured_k() -> None:
    index = index_of(["alice", "bob", "carol"])
    recognizer = Recognizer("door", RecognitionConfig(k=3, min_samples=2, max_encodes=2), fingerprint=FP)
    tracker = Tracker()
    tracker.update([det(100)], 0.0)
    decisions = []
    for i, k in enumerate((2, 5)):  # a caller that searched with another k than the recognizer's
        update = tracker.update([det(100)], 0.2 * (i + 1))
        wanted = recognizer.observe(update, FRAME, WALL)
        emb = near("carol", 0.3, i)[None]
        quality = [SampleQuality(True, None, 1.0)]
        recognizer.add_samples(wanted, quality, emb, index.search(emb, k=k), 1, update.ts, FRAME)
        decisions += recognizer.decide((), index, update.ts, WALL)
    assert [(d.person_id, d.samples) for d in decisions] == [("carol", 2)]
