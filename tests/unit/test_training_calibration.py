"""Threshold calibration: the target FAR holds on held-out synthetic people, intervals, the YAML fragment."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from training_data import clusters

from models.decision.rules import DecisionRule, pairwise_distances
from models.errors import ConfigError, DatasetError
from models.training.calibration import (
    CalibrationSettings,
    calibrate_open_set,
    calibrate_pairs,
    check_target,
    decision_fragment,
    load_decision_fragment,
    pair_scores,
    parse_decision_fragment,
)

CAL = clusters(150, 4, dim=8, informative=8, spread=0.15, seed=21)
HELD_OUT = clusters(150, 4, dim=8, informative=8, spread=0.15, seed=22, prefix="new")
SETTINGS = CalibrationSettings(n_bootstrap=200, seed=0)


def _far(data, threshold: float) -> float:
    return float((pair_scores(data).impostor <= threshold).mean())


@pytest.mark.parametrize("target", [1e-2, 1e-3])
def test_calibrated_threshold_holds_its_far_on_held_out_people(target: float) -> None:
    scores = pair_scores(CAL)
    assert scores.genuine.size == 150 * 6 and scores.impostor.size == 600 * 599 // 2 - 900
    cal = calibrate_pairs(scores, target, SETTINGS)
    t = cal.rule.threshold
    assert cal.point.fpir <= target and cal.point.resolvable
    assert 0.5 * target <= _far(HELD_OUT, t) <= 2.0 * target
    iv = cal.threshold_interval
    assert iv is not None and iv.low < t < iv.high and iv.resamples == SETTINGS.n_bootstrap
    # the held-out people's own FAR-target threshold lies inside the interval
    own = calibrate_pairs(pair_scores(HELD_OUT), target, CalibrationSettings(n_bootstrap=0)).rule.threshold
    assert iv.low <= own <= iv.high
    assert cal.rate_interval is not None and cal.rate_interval.low <= cal.point.dir <= cal.rate_interval.high


def test_bootstrap_is_deterministic_and_the_interval_narrows_with_more_people() -> None:
    a = calibrate_pairs(pair_scores(CAL), 1e-2, SETTINGS)
    b = calibrate_pairs(pair_scores(CAL), 1e-2, SETTINGS)
    assert a.threshold_interval == b.threshold_interval
    few = calibrate_pairs(pair_scores(CAL.subset(CAL.identities[:30])), 1e-2, SETTINGS).threshold_interval
    assert few is not None and a.threshold_interval is not None
    assert few.high - few.low > a.threshold_interval.high - a.threshold_interval.low


def test_open_set_calibration_meets_its_fpir() -> None:
    data = CAL.subset(CAL.identities[:60])
    for rule in (DecisionRule.margin(), DecisionRule.ratio(max_distance=np.inf)):
        cal = calibrate_open_set(data, rule, 2e-2, SETTINGS)
        assert cal.basis == "open-set" and cal.point.fpir <= 2e-2
        assert cal.point.n_strangers == len(data) and cal.point.n_mates == len(data)
        assert cal.rule.max_distance == rule.max_distance  # only the threshold is calibrated
        assert cal.threshold_interval is not None


def test_the_fragment_is_what_the_strict_decision_loader_reads(tmp_path) -> None:
    cals = [
        calibrate_pairs(pair_scores(CAL), 1e-3, SETTINGS),
        calibrate_open_set(CAL.subset(CAL.identities[:40]), DecisionRule.margin(), 1e-3, SETTINGS),
    ]
    text = decision_fragment(cals, "distance", fingerprint="dlib_resnet_v1-0123", source="a test")
    data = yaml.safe_load(text)
    assert list(data) == ["decision"]  # the figures and intervals are comments, not keys the loader would reject
    assert DecisionRule.from_dict(data["decision"]) == cals[0].rule
    assert data["decision"]["threshold"] == cals[0].rule.threshold  # exactly, not rounded
    assert "dlib_resnet_v1-0123" in text and "bootstrap interval" in text and "NOT RESOLVABLE" in text
    alternative = next(line for line in text.splitlines() if line.startswith("# alternative: "))
    assert parse_decision_fragment(alternative.removeprefix("# alternative: ")) == cals[1].rule
    path = tmp_path / "edge.yaml"
    path.write_text("site: main\n" + decision_fragment(cals, "margin", fingerprint="x", source="y"))
    assert load_decision_fragment(path) == cals[1].rule
    with pytest.raises(ConfigError):
        decision_fragment(cals, "ratio", fingerprint="x", source="y")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_decision_fragment("decision: {rule: distance, threshold: 0.5, ci_low: 0.4}")


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3, 2.0, float("nan"), True, "1e-3"])
def test_bad_targets_are_refused(bad) -> None:
    with pytest.raises(ConfigError, match="rate in"):
        check_target("--far", bad)


def test_too_few_identities() -> None:
    with pytest.raises(DatasetError, match="too few identities"):
        pair_scores(CAL.subset(CAL.identities[:1]))
    lonely = clusters(3, 1, seed=1)
    with pytest.raises(DatasetError, match="too few identities"):
        pair_scores(lonely)
    with pytest.raises(DatasetError, match="too few identities"):
        calibrate_open_set(CAL.subset(CAL.identities[:1]), DecisionRule.margin(), 1e-2)


def test_pair_scores_match_the_distance_matrix() -> None:
    data = CAL.subset(CAL.identities[:5])
    s = pair_scores(data)
    d = pairwise_distances(data.vectors, data.vectors)
    codes = data.label_codes()
    i, j = np.triu_indices(len(data), 1)
    assert sorted(s.genuine) == pytest.approx(sorted(d[i, j][codes[i] == codes[j]]))
    chunked = pair_scores(data, metric=lambda a, b: np.linalg.norm(a - b, axis=-1))
    np.testing.assert_allclose(chunked.impostor, s.impostor, rtol=1e-6)
