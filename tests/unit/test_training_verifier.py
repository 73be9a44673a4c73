"""The siamese verifier: logistic regression on pairs, ONNX against numpy, as a decision and in the protocol."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from training_data import FINGERPRINT, clusters, image_folder

from models.errors import ConfigError, DatasetError, ModelError
from models.evaluation.scoring import build_protocol, evaluate
from models.registry import sha256_bytes
from models.training.export import verifier_onnx
from models.training.site_verifier import DISTANCE_ONLY
from models.training.verifier import (
    SCHEMA,
    SCHEMA_VERSION,
    SiameseVerifier,
    VerifierManifest,
    VerifierWeights,
    fit_verifier,
    pair_features,
    save_verifier,
    threshold_for_probability,
)

TRAIN = clusters(16, 6, seed=11)
UNSEEN = clusters(10, 6, seed=12, prefix="new")


def _verifier(weights: VerifierWeights) -> SiameseVerifier:
    return SiameseVerifier.from_onnx(verifier_onnx(weights), weights.dim)


def test_pair_features_hand_computed() -> None:
    a, b = np.array([1.0, -2.0, 0.0]), np.array([3.0, 2.0, 0.0])
    assert pair_features(a, b, "abs").tolist() == [2.0, 4.0, 0.0]
    # (a - b)^2 / (|a| + |b|): 4 / 4, 16 / 4, 0 / 0 -> 0 (no blow-up where both components vanish)
    assert pair_features(a, b, "chi2").tolist() == pytest.approx([1.0, 4.0, 0.0])
    with pytest.raises(ConfigError):
        pair_features(a, b, "cosine")


@pytest.mark.parametrize("form", ["abs", "chi2"])
def test_onnx_matches_the_fitted_logistic_unit(form: str) -> None:
    fit = fit_verifier(TRAIN, form)  # type: ignore[arg-type]
    assert fit.converged and fit.n_genuine == 16 * 15 and fit.n_impostor == 96 * 95 // 2 - 16 * 15
    w, b = fit.weights.w.astype(np.float64), fit.weights.b
    x, y = UNSEEN.vectors[:40], UNSEEN.vectors[20:60]
    verifier = _verifier(fit.weights)
    want = pair_features(x, y, form) @ w + b
    np.testing.assert_allclose(verifier.logit(x, y), want, rtol=1e-4, atol=1e-4)
    # broadcasting: one probe against a gallery, as the matcher asks
    np.testing.assert_allclose(verifier.logit(x[0], y), pair_features(x[0], y, form) @ w + b, rtol=1e-4, atol=1e-4)
    assert np.all(verifier(x, y) >= 0)  # -ln p


def test_fit_learns_which_components_carry_identity() -> None:
    w = fit_verifier(TRAIN, "abs").weights.w
    # a larger difference on an informative component makes "same person" less likely; nuisance ones matter less
    assert np.all(w[:4] < 0)
    assert np.abs(w[:4]).min() > 3 * np.abs(w[4:]).max()


def test_the_verifier_beats_the_plain_distance_where_there_is_something_to_learn(tmp_path) -> None:
    # Here distances are dominated by nuisance components, which the verifier learns to ignore (on dlib's embeddings
    # the plain distance wins: see the note of model-tool train-verifier).
    root = image_folder(tmp_path, UNSEEN)
    protocol = build_protocol(root, n_pairs=100)
    mapping = UNSEEN.as_mapping()
    baseline = evaluate(protocol, mapping, system="distance", rules=DISTANCE_ONLY)
    verifier = _verifier(fit_verifier(TRAIN, "abs").weights)
    learned = evaluate(protocol, mapping, system="verifier", rules=DISTANCE_ONLY, metric=verifier)
    assert learned.reference.verif_acc > baseline.reference.verif_acc + 0.1
    assert learned.reference.tar_far1e2 > baseline.reference.tar_far1e2
    # with the Euclidean distance as the "learned" metric, the hook reproduces the reference figures exactly
    same = evaluate(protocol, mapping, metric=lambda a, b: np.linalg.norm(a - b, axis=-1))
    plain = evaluate(protocol, mapping)
    assert dataclasses.asdict(same.reference) == pytest.approx(dataclasses.asdict(plain.reference), nan_ok=True)
    assert [p.point.rule.threshold for p in same.open_set] == pytest.approx(
        [p.point.rule.threshold for p in plain.open_set]
    )


def test_decisions_with_the_verifier() -> None:
    verifier = _verifier(fit_verifier(TRAIN, "abs").weights)
    gallery, labels = UNSEEN.vectors[::6], np.array(UNSEEN.labels[::6])  # one template per person
    probes = UNSEEN.vectors[1::6]  # another image of each
    threshold = threshold_for_probability(0.5)
    decisions = verifier.decide(probes, gallery, labels, threshold)
    assert [d.candidate for d in decisions] == list(labels)
    assert all(d.accepted == (d.distance <= threshold) for d in decisions)
    assert sum(d.accepted for d in decisions) >= 8
    assert threshold_for_probability(1.0) == 0.0
    with pytest.raises(ConfigError):
        threshold_for_probability(0.0)


def test_save_load_and_refusals(tmp_path) -> None:
    weights = fit_verifier(TRAIN, "chi2").weights
    onnx = verifier_onnx(weights)
    manifest = VerifierManifest(SCHEMA, SCHEMA_VERSION, "chi2", weights.dim, sha256_bytes(onnx), FINGERPRINT, 1e-3, 0.7)
    save_verifier(tmp_path, onnx, manifest)
    loaded, m = SiameseVerifier.load(tmp_path, base_fingerprint=FINGERPRINT)
    assert m == manifest
    np.testing.assert_allclose(
        loaded.logit(TRAIN.vectors[:5], TRAIN.vectors[5:10]),
        _verifier(weights).logit(TRAIN.vectors[:5], TRAIN.vectors[5:10]),
    )
    with pytest.raises(ModelError, match="fitted on encoder fingerprint"):
        SiameseVerifier.load(tmp_path, base_fingerprint="another-fingerprint")
    with pytest.raises(ModelError, match="sha256"):
        save_verifier(tmp_path, onnx + b"x", manifest)
    (tmp_path / "verifier.onnx").write_bytes(verifier_onnx(dataclasses.replace(weights, b=weights.b + 1)))
    with pytest.raises(ModelError, match="sha256"):
        SiameseVerifier.load(tmp_path, base_fingerprint=FINGERPRINT)


def test_fit_needs_both_kinds_of_pairs() -> None:
    one = TRAIN.subset(["id000"])
    with pytest.raises(DatasetError, match="too few identities"):
        fit_verifier(one)
    with pytest.raises(ConfigError):
        fit_verifier(TRAIN, l2=0.0)
