"""One install per deployable: the edge agent runs without the server's stack and the server without the edge's,
the shared core without either; and each CLI names the extra to install when its own is missing.

Each check runs in a fresh interpreter whose import system refuses the other deployable's packages (a finder first
on sys.meta_path), imports every module of the deployable, and reports which watched packages got loaded anyway."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from models import extras

REPO = Path(__file__).resolve().parents[2]
SERVER_STACK = (
    "enrollment_server",
    "sqlalchemy",
    "psycopg",
    "fastapi",
    "starlette",
    "pydantic",
    "multipart",
    "uvicorn",
)
EDGE_STACK = ("edge_agent", "hnswlib")
TORCH_STYLE_MODULES = ("cost", "lossnet", "optimize", "train", "export", "transformer", "visualize")
HEAVY = ("torch", "matplotlib", "tensorrt", "pycuda", "dlib", "face_recognition", "tflite", "ai_edge_litert")

PROBE = """
import importlib, json, sys
forbidden = set(json.loads(sys.argv[1]))
for name in forbidden:
    sys.modules[name] = None  # what Python does for a package that is not installed: import fails, find_spec is None
for module in json.loads(sys.argv[2]):
    importlib.import_module(module)
print(json.dumps(sorted({n.split(".")[0] for n, m in sys.modules.items() if m is not None} & forbidden)))
"""


def _modules(package: str, skip: tuple[str, ...] = ()) -> list[str]:
    root = REPO / package
    names = [package]
    for info in pkgutil.walk_packages([str(root)], prefix=package + "."):
        if not info.name.startswith(skip):
            names.append(info.name)
    return names


def _probe(forbidden: tuple[str, ...], modules: list[str], script: str = PROBE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, json.dumps(forbidden), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_the_edge_agent_imports_without_the_server_stack():
    done = _probe(SERVER_STACK + HEAVY, _modules("edge_agent"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_enrollment_server_imports_without_the_edge_stack():
    done = _probe(EDGE_STACK + HEAVY, _modules("enrollment_server"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_shared_core_imports_without_either_deployable():
    # torch is for training only: the triplet-loss / verifier training and the style networks' training side
    training_side = ("models.training", *(f"models.style.{m}" for m in TORCH_STYLE_MODULES))
    core = _modules("models", skip=training_side)
    done = _probe(SERVER_STACK + EDGE_STACK + HEAVY, core)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_probe_really_refuses():
    done = _probe(("hnswlib",), ["edge_agent.gallery.ann"])
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr


@pytest.mark.parametrize(
    ("forbidden", "argv", "extra"),
    [
        (("hnswlib",), ["edge-agent", "check-config", "edge.yaml"], "edge"),
        (("fastapi",), ["edge-agent", "demo"], "server"),
        (("sqlalchemy",), ["enrollment-server", "list"], "server"),
    ],
)
def test_a_cli_names_the_missing_extra(forbidden, argv, extra):
    script = PROBE.replace(
        "for module in json.loads(sys.argv[2]):\n    importlib.import_module(module)\n"
        'print(json.dumps(sorted({n.split(".")[0] for n, m in sys.modules.items() if m is not None} & forbidden)))\n',
        "argv = json.loads(sys.argv[2])\n"
        "cli = importlib.import_module('edge_agent.cli' if argv[0] == 'edge-agent' else 'enrollment_server.cli')\n"
        "sys.exit(cli.main(argv[1:]))\n",
    )
    assert "cli.main" in script
    done = _probe(forbidden, argv, script)
    assert done.returncode in (2, 3), done.stderr
    assert f"pip install 'faceattend[{extra}]'" in done.stderr and "Traceback" not in done.stderr


def test_the_extras_checked_at_start_match_pyproject():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dist_to_import = {"python-multipart": "multipart", "psycopg[binary]": "psycopg"}
    for extra, imports in extras.EXTRAS.items():
        names = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in declared[extra]}
        assert {dist_to_import.get(n, n).replace("-", "_") for n in names} == set(imports), extra
    assert set(declared["demo"]) >= {"faceattend[edge,server]"}
