"""Open-set decision rules: hand-computed cases, degenerate galleries, strict config, calibration."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from models.decision.rules import (
    Decision,
    DecisionRule,
    Neighbours,
    calibrate,
    dir_fpir_curve,
    pairwise_distances,
    template_to_identity_distances,
)
from models.errors import ConfigError

# One probe, 4 neighbours, identity "a" holds the two nearest templates: d1 = 0.30 (a), and d2 must be the nearest
# *other identity* (b at 0.50), not the second template of a (0.35). ratio = 0.6, margin = 0.2.
TOPK_D = [0.50, 0.30, 0.70, 0.35]
TOPK_L = ["b", "a", "c", "a"]


def test_neighbours_several_templates_per_identity() -> None:
    nb = Neighbours.from_topk(TOPK_D, TOPK_L)
    assert len(nb) == 1
    assert nb.label1[0] == "a" and nb.d1[0] == pytest.approx(0.30)
    assert nb.label2[0] == "b" and nb.d2[0] == pytest.approx(0.50)


@pytest.mark.parametrize(
    ("rule", "accepted", "score"),
    [
        (DecisionRule.distance(0.40), True, 0.30),
        (DecisionRule.distance(0.25), False, 0.30),
        (DecisionRule.ratio(0.65), True, 0.60),
        (DecisionRule.ratio(0.55), False, 0.60),
        (DecisionRule.ratio(0.65, max_distance=0.25), False, 0.60),  # ratio passes, cap fails
        (DecisionRule.margin(0.15), True, 0.20),
        (DecisionRule.margin(0.25), False, 0.20),
        (DecisionRule.margin(0.15, max_distance=0.29), False, 0.20),
    ],
)
def test_rules_hand_computed(rule: DecisionRule, accepted: bool, score: float) -> None:
    d = rule.decide_topk(TOPK_D, TOPK_L)
    assert isinstance(d, Decision)
    assert d.accepted is accepted
    assert d.person_id == ("a" if accepted else None)
    assert d.candidate == "a"
    assert d.distance == pytest.approx(0.30)
    assert d.second_distance == pytest.approx(0.50)
    assert d.margin == pytest.approx(0.20)
    assert d.ratio == pytest.approx(0.60)
    assert d.score == pytest.approx(score)
    assert d.rule == rule.rule and d.threshold == rule.threshold
    json.dumps(d.to_json())  # serialisable as is


def test_batch_int_labels_with_padding_and_nan() -> None:
    # row 0: identities 7 (0.2, 0.25) and 3 (0.4); row 1: one valid neighbour, then padding (-1) and NaN
    dist = np.array([[0.25, 0.2, 0.4], [0.3, 0.1, np.nan]])
    lab = np.array([[7, 7, 3], [5, -1, 9]])
    nb = Neighbours.from_topk(dist, lab)
    assert nb.label1.tolist() == [7, 5]
    np.testing.assert_allclose(nb.d1, [0.2, 0.3])
    np.testing.assert_allclose(nb.d2, [0.4, np.inf])
    dec = DecisionRule.ratio(0.6).decide(nb)
    assert dec.accepted.tolist() == [True, True]  # 0.5 <= 0.6; row 1 has no runner-up: cap decides
    assert [d.person_id for d in dec] == [7, 5]
    assert dec[-1].person_id == 5
    with pytest.raises(IndexError):
        dec[2]
    assert isinstance(dec[0].person_id, int)  # numpy scalars become plain Python ids


def test_squared_distances() -> None:
    nb = Neighbours.from_topk([0.09, 0.25], ["a", "b"], squared=True)
    np.testing.assert_allclose([nb.d1[0], nb.d2[0]], [0.3, 0.5])


def test_from_embeddings_several_templates() -> None:
    gallery = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [0.8, 0.0, 0.0]])
    labels = np.array(["x", "y", "x", "z"])
    probes = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.6]])
    nb = Neighbours.from_embeddings(probes, gallery, labels)
    assert nb.label1.tolist() == ["x", "x"]
    np.testing.assert_allclose(nb.d1, [0.5, 0.1])
    assert nb.label2.tolist() == ["z", "z"]
    np.testing.assert_allclose(nb.d2, [0.8, 1.0])
    # a single probe as a 1-D vector
    one = Neighbours.from_embeddings(probes[1], gallery, labels)
    assert one.d1[0] == pytest.approx(0.1)


def test_template_to_identity_minimum() -> None:
    d = np.array([[0.9, 0.2, 0.5, np.nan], [0.1, 0.8, 0.3, 0.05]])
    per_id, ids = template_to_identity_distances(d, ["q", "p", "q", "r"])
    assert ids.tolist() == ["p", "q", "r"]
    np.testing.assert_allclose(per_id, [[0.2, 0.5, np.inf], [0.8, 0.1, 0.05]])


def test_pairwise_distances_matches_direct() -> None:
    rng = np.random.default_rng(3)
    p, g = rng.normal(size=(5, 128)), rng.normal(size=(7, 128))
    direct = np.array([[np.linalg.norm(a - b) for b in g] for a in p])
    np.testing.assert_allclose(pairwise_distances(p, g), direct, rtol=1e-12)


def test_one_identity_gallery_falls_back_to_cap() -> None:
    # no runner-up: d2 = inf, ratio 0, margin inf; ratio / margin accept exactly when d1 <= max_distance
    near = Neighbours.from_topk([0.50, 0.55], ["solo", "solo"])
    far = Neighbours.from_topk([0.65], ["solo"])
    assert near.d2[0] == math.inf
    for rule in (DecisionRule.ratio(0.5), DecisionRule.margin(0.3)):
        d = rule.decide(near)[0]
        assert d.accepted and d.person_id == "solo"
        assert d.ratio == 0.0 and d.margin == math.inf
        assert not rule.decide(far)[0].accepted
    assert not DecisionRule.distance(0.4).decide(near)[0].accepted
    assert DecisionRule.distance(0.6).decide(near)[0].accepted
    js = DecisionRule.margin(0.3).decide(near)[0].to_json()
    assert js["second_distance"] is None and js["margin"] is None and js["ratio"] == 0.0
    # the same through per-identity distances and brute force
    assert Neighbours.from_identity_distances([[0.5]], ["solo"]).d2[0] == math.inf
    assert Neighbours.from_embeddings(np.zeros(4), np.ones((2, 4)) * 0.25, ["s", "s"]).d2[0] == math.inf


def test_truncated_topk_lower_bounds_d2() -> None:
    # the top-3 are all templates of "a" but the gallery holds 5 identities: d2 >= 0.45 (conservative)
    nb = Neighbours.from_topk([0.3, 0.4, 0.45], ["a", "a", "a"], gallery_identities=5)
    assert nb.d2[0] == pytest.approx(0.45)
    assert not DecisionRule.ratio(0.6).decide(nb)[0].accepted  # 0.3 / 0.45 = 0.667
    # exhaustive lists (None) or a one-identity gallery: no runner-up at all
    assert Neighbours.from_topk([0.3, 0.4], ["a", "a"], gallery_identities=1).d2[0] == math.inf


@pytest.mark.parametrize("rule", [DecisionRule.distance(), DecisionRule.ratio(), DecisionRule.margin()])
def test_empty_gallery_is_unknown(rule: DecisionRule) -> None:
    for nb in (
        Neighbours.from_topk([], []),
        Neighbours.from_identity_distances(np.empty((2, 0)), np.array([], dtype=object)),
        Neighbours.from_embeddings(np.zeros((3, 128)), np.empty((0, 128)), np.array([], dtype=str)),
    ):
        dec = rule.decide(nb)
        assert not dec.accepted.any()
        for d in dec:
            assert d.person_id is None and d.candidate is None and d.distance == math.inf
            js = d.to_json()
            assert js["distance"] is None and js["score"] is None
            json.dumps(js)


def test_nan_probe_and_nan_template() -> None:
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [np.nan, np.nan]])
    nb = Neighbours.from_embeddings(np.array([[np.nan, 0.0], [0.1, 0.0]]), gallery, ["a", "b", "c"])
    assert nb.d1[0] == math.inf and not nb.found[0]
    assert nb.label1[1] == "a" and nb.d2[1] == pytest.approx(0.9)  # the NaN template of c never matches
    for rule in (DecisionRule.distance(10.0), DecisionRule.ratio(1.0, math.inf), DecisionRule.margin(0.0, math.inf)):
        assert rule.decide(nb).accepted.tolist() == [False, True]
    # all-NaN distances from a top-k search
    assert not DecisionRule.distance(10.0).decide_topk([np.nan, np.nan], ["a", "b"]).accepted


def test_exact_tie_between_identities() -> None:
    nb = Neighbours.from_topk([0.0, 0.0], ["a", "b"])
    d = DecisionRule.ratio(0.99).decide(nb)[0]
    assert d.ratio == 1.0 and d.margin == 0.0 and not d.accepted
    assert DecisionRule.ratio(1.0).decide(nb)[0].accepted  # ratio 1 accepts everything within the cap


def test_decision_is_frozen() -> None:
    d = DecisionRule.distance().decide_topk(TOPK_D, TOPK_L)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.accepted = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DecisionRule.distance().threshold = 1.0  # type: ignore[misc]


# --- config -------------------------------------------------------------------------------------------------------
def test_from_dict_valid() -> None:
    assert DecisionRule.from_dict({"rule": "distance", "threshold": 0.5}) == DecisionRule("distance", 0.5)
    r = DecisionRule.from_dict({"rule": "ratio", "threshold": 0.75, "max_distance": 0.7})
    assert (r.rule, r.threshold, r.max_distance) == ("ratio", 0.75, 0.7)
    assert DecisionRule.from_dict({"rule": "ratio", "threshold": 1, "max_distance": float("inf")}).max_distance == (
        math.inf
    )
    for rule in (DecisionRule.distance(0.42), DecisionRule.ratio(0.7, 0.65), DecisionRule.margin(0.12)):
        assert DecisionRule.from_dict(rule.to_dict()) == rule


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rule": "ratio", "threshold": 0.7, "treshold": 0.6}, "treshold"),
        ({"rule": "distance", "cap": 0.6, "extra": 1}, "cap, extra"),
        ({"threshold": 0.6}, "rule"),
        ({"rule": "cosine"}, "cosine"),
        ({"rule": "distance", "threshold": "0.6"}, "threshold"),
        ({"rule": "distance", "threshold": True}, "threshold"),
        ({"rule": "distance", "threshold": float("nan")}, "threshold"),
        ({"rule": "distance", "threshold": -0.1}, "threshold"),
        ({"rule": "distance", "threshold": float("inf")}, "threshold"),
        ({"rule": "ratio", "threshold": 1.2}, "ratio"),
        ({"rule": "distance", "threshold": 0.6, "max_distance": 0.7}, "max_distance"),
        ({"rule": "margin"}, "threshold"),
        ({"rule": "ratio", "threshold": 0.8}, "missing key 'max_distance' for the ratio rule"),
        ({"rule": "margin", "threshold": 0.05}, "missing key 'max_distance' for the margin rule"),
        ({"rule": "margin", "threshold": 0.1, "max_distance": 0}, "max_distance"),
        ({"rule": "margin", "threshold": 0.1, "max_distance": None}, "max_distance"),
    ],
)
def test_from_dict_rejects(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DecisionRule.from_dict(data)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError):
        DecisionRule.from_dict(["distance", 0.6])  # type: ignore[arg-type]


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError):
        DecisionRule("distance", 0.6, 0.7)
    with pytest.raises(ConfigError):
        DecisionRule("nearest", 0.6)  # type: ignore[arg-type]


# --- calibration --------------------------------------------------------------------------------------------------
def _synthetic_strangers(rng: np.random.Generator, n: int, labels: int = 1000) -> Neighbours:
    """Stranger-like neighbours: nearest identity around 0.7 (dlib scale), runner-up close behind."""
    d1 = np.abs(rng.normal(0.70, 0.08, n))
    d2 = d1 + np.abs(rng.normal(0.0, 0.05, n))
    lab = rng.integers(0, labels, n)
    return Neighbours(lab, d1, (lab + 1) % labels, d2)


@pytest.mark.parametrize("rule", [DecisionRule.distance(), DecisionRule.ratio(), DecisionRule.margin()])
@pytest.mark.parametrize("target", [1e-2, 1e-3])
def test_calibration_hits_target_fpir(rule: DecisionRule, target: float) -> None:
    rng = np.random.default_rng(20_000)
    n = 20_000
    calib = _synthetic_strangers(rng, n)
    op = calibrate(rule, calib, target)
    # on the calibration strangers: never above the target, and within one stranger of it
    assert op.fpir <= target
    assert op.fpir >= target - 1.0 / n - 1e-12
    assert op.n_strangers == n and op.resolvable
    assert op.rule.rule == rule.rule and op.rule.max_distance == rule.max_distance
    # on fresh strangers from the same distribution: within 4 binomial standard deviations
    fresh = _synthetic_strangers(rng, n)
    measured = float(op.rule.accepts(fresh).mean())
    assert abs(measured - target) <= 4 * math.sqrt(target * (1 - target) / n)


def test_calibration_with_ties_stays_within_target() -> None:
    # 100 strangers, the 5 most confident tied: at 1e-2 (1 allowed) all 5 must be rejected
    stats = np.r_[np.full(5, 0.3), np.linspace(0.4, 0.9, 95)]
    op = calibrate(DecisionRule.distance(), stats, 1e-2)
    assert op.n_strangers_accepted == 0 and op.rule.threshold < 0.3
    op = calibrate(DecisionRule.distance(), stats, 5e-2)  # exactly the 5 tied ones allowed
    assert op.n_strangers_accepted == 5 and op.rule.threshold == 0.3


def test_calibration_few_strangers_is_flagged_unresolvable() -> None:
    op = calibrate(DecisionRule.distance(), [0.7, 0.8, 0.9, 1.0], 1e-2, mates=[0.3, 0.65, 0.75])
    assert not op.resolvable and op.fpir == 0.0
    assert op.rule.threshold == pytest.approx(0.7) and op.rule.threshold < 0.7  # just below the nearest stranger
    assert op.dir == pytest.approx(2 / 3) and op.n_mates == 3


def test_calibration_margin_raw_statistics() -> None:
    # raw margins: higher = more confident; 10 strangers, 1e-1 allows the single most confident one
    margins = np.arange(10) / 100.0
    op = calibrate(DecisionRule.margin(), margins, 0.1)
    assert op.rule.threshold == pytest.approx(0.09)
    assert op.n_strangers_accepted == 1


def test_calibration_dir_counts_correct_identity_only() -> None:
    strangers = Neighbours.from_identity_distances([[0.8, 0.85], [0.9, 0.95]], ["a", "b"])
    mates = Neighbours.from_identity_distances([[0.2, 0.9], [0.9, 0.3], [0.3, 0.9]], ["a", "b"])
    op = calibrate(DecisionRule.distance(), strangers, 0.4, mates=mates, mate_labels=["a", "b", "b"])
    assert op.dir == pytest.approx(2 / 3)  # the third mate is accepted but as the wrong person


def test_calibration_unrejectable_strangers_reported() -> None:
    # one-identity gallery: the ratio rule cannot reject a stranger within the cap (no runner-up)
    strangers = Neighbours.from_identity_distances([[0.5], [0.55], [0.9]], ["solo"])
    op = calibrate(DecisionRule.ratio(), strangers, 0.1)
    assert op.fpir > op.target_fpir
    assert op.n_strangers_accepted == 2


def test_calibration_bad_input() -> None:
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ConfigError):
            calibrate(DecisionRule.distance(), [0.5, 0.6], bad)
    with pytest.raises(ValueError):
        calibrate(DecisionRule.distance(), [], 0.01)
    with pytest.raises(ValueError):
        calibrate(DecisionRule.distance(), [0.5], 0.01, mates=Neighbours.from_topk([0.1], ["a"]))


def test_dir_fpir_curve_is_monotone() -> None:
    rng = np.random.default_rng(1)
    strangers = _synthetic_strangers(rng, 500, labels=10)
    d1 = np.abs(rng.normal(0.4, 0.1, 200))
    truth = rng.integers(0, 10, 200)
    mates = Neighbours(truth, d1, (truth + 1) % 10, d1 + np.abs(rng.normal(0.3, 0.1, 200)))
    for rule in (DecisionRule.distance(), DecisionRule.ratio(), DecisionRule.margin()):
        fpir, dir_, t = dir_fpir_curve(rule, mates, truth, strangers)
        assert np.all(np.diff(t) > 0)
        assert np.all(np.diff(fpir) >= 0) and np.all(np.diff(dir_) >= 0)
        assert 0 <= dir_[-1] <= 1 and 0 <= fpir[-1] <= 1
