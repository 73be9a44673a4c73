"""Model manifests, weights read from site-packages and checked, the encoder fingerprint."""

import dataclasses

import onnx
import pytest

from models import registry
from models.errors import ConfigError, ModelError
from models.face.fingerprint import encoder_fingerprint
from models.registry import DETECTOR, ENCODER


def test_detector_bytes_are_the_pinned_onnx():
    data = registry.detector_onnx_bytes()
    assert len(data) == 1_736_694
    assert registry.sha256_bytes(data) == DETECTOR.sha256
    graph = onnx.load_model_from_string(data).graph
    assert [i.name for i in graph.input] == ["input"]


def test_encoder_source_is_the_pinned_dlib_file():
    assert registry.sha256_bytes(registry.encoder_source_bytes()) == ENCODER.sha256


def test_sha_mismatch_and_missing_package_are_model_errors(monkeypatch):
    tampered = dataclasses.replace(ENCODER, sha256="0" * 64)
    with pytest.raises(ModelError, match=r"sha256 .* the manifest pins 0000"):
        registry._verified(tampered, b"not the weights", registry.source_path(ENCODER))
    absent = dataclasses.replace(DETECTOR, source_module="no_such_weight_package", source_package="nope")
    with pytest.raises(ModelError, match="not installed"):
        registry.source_path(absent)
    missing_file = dataclasses.replace(DETECTOR, source_file="gone.py")
    with pytest.raises(ModelError, match="missing"):
        registry.source_path(missing_file)


def test_encoder_onnx_is_converted_once_and_cached(cache_root):
    registry.encoder_onnx_path.cache_clear()
    try:
        path = registry.encoder_onnx_path()
        assert path.is_relative_to(cache_root) and path.stat().st_size > 20_000_000
        mtime = path.stat().st_mtime_ns
        registry.encoder_onnx_path.cache_clear()
        assert registry.encoder_onnx_path() == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        registry.encoder_onnx_path.cache_clear()


def test_manifests_serialise():
    for m in registry.MANIFESTS.values():
        j = m.to_json()
        assert j["source"]["sha256"] == m.sha256 and j["inputs"] and j["outputs"]


def test_fingerprint_is_stable_and_sensitive_to_what_changes_the_space():
    base = encoder_fingerprint()
    assert base == encoder_fingerprint() and base.value.startswith("dlib_resnet_v1-")
    assert base.fields["alignment"]["method"] == "dlib5"
    templated = encoder_fingerprint(alignment="template")
    template = tuple(map(tuple, templated.fields["alignment"]["template"]))
    shifted = tuple((x + 1.0, y) for x, y in template)
    others = [
        templated,
        encoder_fingerprint(alignment="template", template=shifted),
        encoder_fingerprint(dim=64),
        encoder_fingerprint(normalisation="l2"),
        encoder_fingerprint(metric="cosine"),
        encoder_fingerprint(dataclasses.replace(ENCODER, sha256="1" * 64)),
        encoder_fingerprint(dataclasses.replace(ENCODER, preprocessing="something else")),
    ]
    assert len({base.value, *(o.value for o in others)}) == len(others) + 1
    with pytest.raises(ConfigError):
        encoder_fingerprint(alignment="nope")
