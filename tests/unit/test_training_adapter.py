"""The adapter artefact: ONNX export against torch, fingerprint, run-time loading, and the shipping rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_data import FINGERPRINT, clusters, image_folder

from models.errors import AdapterRejectedError, ModelError
from models.evaluation.scoring import build_protocol, evaluate
from models.training.adapter import (
    ADAPTER_MANIFEST,
    ADAPTER_ONNX,
    AdapterManifest,
    AdapterWeights,
    EmbeddingAdapter,
    adapter_fingerprint,
    judge_adapter,
    ship_adapter,
)
from models.training.export import adapter_onnx
from models.training.heads import LinearHead, ResidualMLPHead


def _perturbed(head: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return head.eval()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_onnx_export_matches_torch(kind: str) -> None:
    torch.manual_seed(0)
    head = _perturbed(LinearHead(128) if kind == "linear" else ResidualMLPHead(128, 64), 1)
    weights = head.export_weights()
    onnx = adapter_onnx(weights)
    assert adapter_onnx(weights) == onnx  # byte-identical: the sha256 is a function of the weights
    manifest = AdapterManifest.for_onnx(onnx, weights.kind, 128, FINGERPRINT)
    x = np.random.default_rng(2).normal(0, 0.1, size=(300, 128)).astype(np.float32)  # > one backend batch
    with EmbeddingAdapter.from_onnx(onnx, manifest) as adapter:
        got = adapter.apply(x)
    want = head(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - x).max() > 0.1  # a real transformation, not the identity


def test_identity_adapter_reproduces_the_encoder_space() -> None:
    weights = LinearHead(128).export_weights()
    onnx = adapter_onnx(weights)
    x = np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32)
    with EmbeddingAdapter.from_onnx(onnx, AdapterManifest.for_onnx(onnx, "linear", 128, FINGERPRINT)) as adapter:
        np.testing.assert_allclose(adapter.apply(x), x, atol=1e-6)


def test_fingerprint_derivation() -> None:
    fp = adapter_fingerprint("dlib_resnet_v1-0123456789abcdef", "ab" * 32)
    assert fp.startswith("dlib_resnet_v1-0123456789abcdef+adapter-") and len(fp) <= 128
    assert fp == adapter_fingerprint("dlib_resnet_v1-0123456789abcdef", "ab" * 32)
    assert fp != adapter_fingerprint("dlib_resnet_v1-0123456789abcdef", "cd" * 32)  # other adapter
    assert fp != adapter_fingerprint("dlib_resnet_v1-fedcba9876543210", "ab" * 32)  # other base encoder


def test_weights_shapes_are_checked() -> None:
    w = np.zeros((4, 4), np.float32)
    with pytest.raises(ModelError):
        AdapterWeights("linear", ((w, np.zeros(3, np.float32)),))
    with pytest.raises(ModelError):
        AdapterWeights("mlp", ((w, np.zeros(4, np.float32)),))


# --- the shipping rule, on real evaluations of synthetic embeddings ---------------------------------------------


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    data = clusters(10, 5, seed=7, spread=0.08, nuisance=0.08, dim=16, informative=12)
    root = image_folder(tmp_path_factory.mktemp("faces"), data)
    protocol = build_protocol(root, n_pairs=60)
    return data, protocol


def _report(protocol, vectors, data, system):
    return evaluate(protocol, data.with_vectors(vectors, FINGERPRINT).as_mapping(), system=system)


def _artefact():
    onnx = adapter_onnx(LinearHead(16).export_weights())
    return onnx, AdapterManifest.for_onnx(onnx, "linear", 16, FINGERPRINT)


def test_an_adapter_that_hurts_held_out_people_is_refused(held_out, tmp_path) -> None:
    data, protocol = held_out
    before = _report(protocol, data.vectors, data, "encoder")
    noisy = data.vectors + np.random.default_rng(0).normal(0, 0.3, data.vectors.shape).astype(np.float32)
    after = _report(protocol, noisy, data, "encoder + adapter")
    verdict = judge_adapter(before, after)
    assert not verdict.ship and verdict.worse
    assert "worse" in verdict.reason() and verdict.worse[0].name in verdict.reason()
    onnx, manifest = _artefact()
    with pytest.raises(AdapterRejectedError, match="worse"):
        ship_adapter(tmp_path, onnx, manifest, verdict)
    assert not (tmp_path / ADAPTER_ONNX).exists() and not (tmp_path / ADAPTER_MANIFEST).exists()


def test_an_adapter_that_changes_nothing_is_refused_too(held_out, tmp_path) -> None:
    data, protocol = held_out
    before = _report(protocol, data.vectors, data, "encoder")
    verdict = judge_adapter(before, _report(protocol, data.vectors.copy(), data, "same"))
    assert not verdict.worse and not verdict.better and not verdict.ship
    with pytest.raises(AdapterRejectedError, match="improves no figure"):
        ship_adapter(tmp_path, *_artefact(), verdict)


def test_a_better_adapter_ships_and_loads_only_under_its_base(held_out, tmp_path) -> None:
    data, protocol = held_out
    worse = data.vectors + np.random.default_rng(1).normal(0, 0.3, data.vectors.shape).astype(np.float32)
    verdict = judge_adapter(_report(protocol, worse, data, "encoder"), _report(protocol, data.vectors, data, "adapted"))
    assert verdict.ship and verdict.better and "better" in verdict.reason()
    onnx, manifest = _artefact()
    ship_adapter(tmp_path, onnx, manifest, verdict)
    with EmbeddingAdapter.load(tmp_path, base_fingerprint=FINGERPRINT) as adapter:
        assert adapter.fingerprint == adapter_fingerprint(FINGERPRINT, manifest.onnx_sha256) != FINGERPRINT
        assert adapter.apply(data.vectors[:3]).shape == (3, 16)
    with pytest.raises(ModelError, match="trained on encoder fingerprint"):
        EmbeddingAdapter.load(tmp_path, base_fingerprint="dlib_resnet_v1-ffffffffffffffff")
    tampered = json.loads((tmp_path / ADAPTER_MANIFEST).read_text())
    tampered["fingerprint"] = FINGERPRINT  # pretend the adapter leaves the space unchanged
    (tmp_path / ADAPTER_MANIFEST).write_text(json.dumps(tampered))
    with pytest.raises(ModelError, match="not derived"):
        EmbeddingAdapter.load(tmp_path, base_fingerprint=FINGERPRINT)
    tampered["surprise"] = 1
    (tmp_path / ADAPTER_MANIFEST).write_text(json.dumps(tampered))
    with pytest.raises(ModelError, match="unknown key"):
        EmbeddingAdapter.load(tmp_path, base_fingerprint=FINGERPRINT)
