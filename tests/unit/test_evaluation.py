"""Evaluation: the reference protocol and scorer reproduced exactly, per-rule open-set figures, outputs.

The reference scripts live in ../shared/eval (outside the repository, `facesets.REFERENCE_EVAL`); they are loaded by
path or run as subprocesses here and never imported by library code. Tests that need them, or the development set,
are marked `evaluation` (deselected where ../shared is absent); the rest run on generated data and the test face set.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import facesets
import numpy as np
import pytest

from models.decision.rules import DecisionRule
from models.evaluation.scoring import (
    EvaluationError,
    Protocol,
    build_protocol,
    evaluate,
    load_embeddings_npz,
    load_identities,
    plot_roc,
    save_embeddings_npz,
    score,
    write_summary,
)


@pytest.fixture(scope="module")
def reference_protocol() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reference_protocol", facesets.REFERENCE_EVAL / "protocol.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the script's CLI sits behind `if __name__ == '__main__'`
    return module


def _reference_json(module: ModuleType, root: Path, n_pairs: int, **kw: int) -> dict:
    # what the reference CLI writes, read back: tuples become lists
    return json.loads(json.dumps(module.build(str(root), n_pairs=n_pairs, **kw)))


def _run_reference_scorer(proto: Path, npz: Path, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(facesets.REFERENCE_EVAL / "score.py"), str(proto), str(npz), *extra],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder-per-identity dataset of empty image files (the protocol only lists names): 12 people with 2-7
    images, 3 people with one image, a non-image file and an empty folder that must be skipped."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(5)
    for i in range(12):
        d = root / f"person_{i:02d}"
        d.mkdir()
        for j in range(int(rng.integers(2, 8))):
            (d / f"img_{j}.{'png' if j % 3 == 0 else 'jpg'}").write_bytes(b"")
        (d / "notes.txt").write_text("not an image")
    for i in range(3):
        d = root / f"single_{i}"
        d.mkdir()
        (d / "only.JPG").write_bytes(b"")
    (root / "empty").mkdir()
    (root / "README.md").write_text("x")
    return root


def _synthetic_embeddings(protocol: Protocol, seed: int = 0, missing: int = 0) -> dict[str, np.ndarray | None]:
    """Clustered 128-d embeddings at dlib's scale: identity centres ~0.9 apart, images ~0.45 from each other."""
    rng = np.random.default_rng(seed)
    centres: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray | None] = {}
    for img in protocol.images:
        who = Path(img).parts[0]
        if who not in centres:
            centres[who] = rng.normal(0.0, 0.056, 128)
        out[img] = centres[who] + rng.normal(0.0, 0.028, 128)
    for img in list(out)[:: max(1, len(out) // max(1, missing))][:missing]:
        out[img] = None if len(img) % 2 else np.full(128, np.nan)
    return out


# --- protocol -----------------------------------------------------------------------------------------------------
@pytest.mark.evaluation
def test_protocol_equals_reference_on_dev_set(reference_protocol: ModuleType) -> None:
    ours = build_protocol(facesets.DEV_FACES, 300)
    assert ours.to_json() == _reference_json(reference_protocol, facesets.DEV_FACES, 300)
    assert len(ours.images) == 170 and len(ours.gallery) == 23 and len(ours.probes) == 27


def test_protocol_on_the_test_face_set(test_faces: Path) -> None:
    """Every person with two photos or more is enrolled with one and probed with another; every one-photo person is
    a stranger; the pairs are distinct, of the same person or of two people, and name only the set's photos."""
    sizes = {person: len(facesets.photos(person)) for person in facesets.people()}
    multi = sorted(p for p, n in sizes.items() if n >= 2)
    proto = build_protocol(test_faces, 100)
    assert [who for who, _ in proto.gallery] == multi
    assert len(proto.probes) == len(sizes)
    assert sorted(who for _, who in proto.probes if who is not None) == multi
    assert sorted(image.split("/")[0] for image, who in proto.probes if who is None) == sorted(
        p for p, n in sizes.items() if n == 1
    )
    enrolled = dict(proto.gallery)
    assert all(enrolled[who] != image for image, who in proto.probes if who is not None)
    assert len(proto.genuine) == len(set(proto.genuine)) == 100 == len(proto.impostor) == len(set(proto.impostor))
    assert all(a.split("/")[0] == b.split("/")[0] and a != b for a, b in proto.genuine)
    assert all(a.split("/")[0] != b.split("/")[0] for a, b in proto.impostor)
    assert all((test_faces / image).is_file() for image in proto.images)
    with pytest.raises(EvaluationError, match="genuine"):  # fewer distinct same-person pairs than that
        build_protocol(test_faces, sum(n * (n - 1) // 2 for n in sizes.values()) + 1)


@pytest.mark.evaluation
@pytest.mark.parametrize(("n_pairs", "seed", "kw"), [(40, 65599408, {}), (25, 7, {"n_gallery": 5, "n_strangers": 2})])
def test_protocol_equals_reference_on_toy_set(
    reference_protocol: ModuleType, toy_dataset: Path, n_pairs: int, seed: int, kw: dict
) -> None:
    ours = build_protocol(toy_dataset, n_pairs, seed, **kw)
    assert ours.to_json() == _reference_json(reference_protocol, toy_dataset, n_pairs, seed=seed, **kw)
    assert load_identities(toy_dataset) == reference_protocol.load(str(toy_dataset))


def test_protocol_json_roundtrip(toy_dataset: Path, tmp_path: Path) -> None:
    proto = build_protocol(toy_dataset, 30)
    path = tmp_path / "proto.json"
    proto.save(path)
    assert Protocol.load(path) == proto
    with pytest.raises(EvaluationError):
        Protocol.from_json({"genuine": []})


def test_protocol_impossible_pair_count_raises(toy_dataset: Path) -> None:
    with pytest.raises(EvaluationError, match="genuine"):
        build_protocol(toy_dataset, 10_000)


# --- the reference scorer -----------------------------------------------------------------------------------------
@pytest.mark.evaluation
@pytest.mark.parametrize(("missing", "extra"), [(0, ()), (6, ()), (0, ("--cosine",))])
def test_score_equals_reference_scorer(toy_dataset: Path, tmp_path: Path, missing: int, extra: tuple) -> None:
    proto = build_protocol(toy_dataset, 60)
    emb = _synthetic_embeddings(proto, seed=missing, missing=missing)
    proto_path, npz = tmp_path / "proto.json", tmp_path / "emb.npz"
    proto.save(proto_path)
    save_embeddings_npz(npz, emb)
    ours = score(proto, emb, cosine=bool(extra)).rounded()
    assert ours == _run_reference_scorer(proto_path, npz, *extra)
    assert ours["missing"] == missing
    # and through the .npz reader
    assert score(proto, load_embeddings_npz(npz), cosine=bool(extra)).rounded() == ours


@pytest.mark.evaluation
def test_score_equals_reference_scorer_dev_protocol(tmp_path: Path) -> None:
    """The dev-set protocol (all 170 image names) with synthetic embeddings: exercises the 300+300 pairs path."""
    proto = build_protocol(facesets.DEV_FACES, 300)
    emb = _synthetic_embeddings(proto, seed=11)
    proto_path, npz = tmp_path / "proto.json", tmp_path / "emb.npz"
    proto.save(proto_path)
    save_embeddings_npz(npz, emb)
    assert score(proto, emb).rounded() == _run_reference_scorer(proto_path, npz)


def test_score_requires_every_protocol_image(toy_dataset: Path) -> None:
    proto = build_protocol(toy_dataset, 20)
    emb = _synthetic_embeddings(proto)
    del emb[proto.images[0]]
    with pytest.raises(EvaluationError, match="no entry"):
        score(proto, emb)


def test_npz_roundtrip_keeps_order_dtype_and_missing(tmp_path: Path) -> None:
    emb = {"b/1.jpg": np.arange(4, dtype=np.float32), "a/1.jpg": None, "c/2.png": np.ones(4, dtype=np.float32)}
    save_embeddings_npz(tmp_path / "e.npz", emb)
    back = load_embeddings_npz(tmp_path / "e.npz")
    assert list(back) == list(emb)
    assert back["b/1.jpg"].dtype == np.float32
    assert np.isnan(back["a/1.jpg"]).all()  # type: ignore[arg-type]


# --- beyond the reference -----------------------------------------------------------------------------------------
def test_evaluate_stranger_sets_and_rules(toy_dataset: Path) -> None:
    proto = build_protocol(toy_dataset, 60)
    emb = _synthetic_embeddings(proto, seed=3)
    seen: list[tuple[str, int, int]] = []
    rep = evaluate(proto, emb, system="toy", progress=lambda s, d, t: seen.append((s, d, t)))
    assert seen and seen[-1][1] == seen[-1][2]
    n_gallery = len(proto.gallery)
    n_ref = sum(p is None for _, p in proto.probes)
    sizes = {s.name: s.n_strangers for s in rep.stranger_sets}
    assert sizes == {"reference": n_ref, "loo": n_gallery + n_ref, "loo_all": len(proto.images)}
    assert rep.n_mates == n_gallery
    assert rep.rank1 == pytest.approx(rep.reference.rank1)
    for rule in ("distance", "ratio", "margin"):
        for name, n in sizes.items():
            for target in (1e-2, 1e-3):
                op = rep.point(rule, name, target)
                assert op.n_strangers == n
                assert op.resolvable == (n * target >= 1)
                assert op.fpir <= target or op.n_strangers_accepted == 0
                assert op.dir is not None and 0.0 <= op.dir <= rep.rank1 + 1e-12
    far = {p.target_fpir: p for p in rep.verification.far_points}
    assert far[1e-2].fpir <= 1e-2 and rep.verification.recommended == far[1e-3].rule.threshold
    assert 0.0 <= rep.verification.eer <= 0.5
    json.dumps(rep.to_dict(include_curves=True), allow_nan=False)


# one pair of each kind leaves 9 of the 10 verification folds empty: NaN accuracy, as in the reference
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_leave_one_identity_out_by_hand() -> None:
    """Three enrolled people on a line and one stranger; 2-d embeddings so the distances are obvious."""
    proto = Protocol(
        genuine=(("a/1", "a/2"),),
        impostor=(("a/1", "b/1"),),
        gallery=(("a", "a/1"), ("b", "b/1"), ("c", "c/1")),
        probes=(("a/2", "a"), ("b/2", "b"), ("c/2", "c"), ("s/1", None)),
        images=("a/1", "a/2", "b/1", "b/2", "c/1", "c/2", "s/1"),
    )
    emb = {
        "a/1": np.array([0.0, 0.0]),
        "a/2": np.array([0.1, 0.0]),
        "b/1": np.array([1.0, 0.0]),
        "b/2": np.array([1.2, 0.0]),
        "c/1": np.array([3.0, 0.0]),
        "c/2": np.array([3.3, 0.0]),
        "s/1": np.array([5.0, 0.0]),
    }
    rule = DecisionRule.distance()
    rep = evaluate(proto, emb, rules=(rule,), fpirs=(0.25,))
    # loo strangers: a/2 without a -> b at 0.9; b/2 without b -> a at 1.2 (c at 1.8); c/2 without c -> b at 2.3;
    # s/1 -> c at 2.0. Sorted 0.9, 1.2, 2.0, 2.3: 25 % of 4 allows one, so the threshold is 0.9.
    op = rep.point("distance", "loo", 0.25)
    assert op.n_strangers == 4 and op.n_strangers_accepted == 1
    assert op.rule.threshold == pytest.approx(0.9)
    assert op.dir == 1.0  # mates at 0.1, 0.2, 0.3
    ratio = evaluate(proto, emb, rules=(DecisionRule.ratio(0.5, max_distance=math.inf),), fpirs=(0.25,))
    # loo ratios: a/2 0.9/2.9, b/2 1.2/1.8, c/2 2.3/3.3, s/1 2.0/3.8; mates 0.1/0.9, 0.2/1.8, 0.3/2.3
    op = ratio.point("ratio", "loo", 0.25)
    assert op.rule.threshold == pytest.approx(0.9 / 2.9)
    assert op.dir == 1.0


def test_evaluate_rejects_duplicate_rule_kinds(toy_dataset: Path) -> None:
    proto = build_protocol(toy_dataset, 20)
    with pytest.raises(EvaluationError):
        evaluate(proto, _synthetic_embeddings(proto), rules=(DecisionRule.ratio(0.7), DecisionRule.ratio(0.8)))


def test_roc_png_and_summary(toy_dataset: Path, tmp_path: Path) -> None:
    proto = build_protocol(toy_dataset, 60)
    ours = evaluate(proto, _synthetic_embeddings(proto, seed=1), system="ours")
    peer = evaluate(proto, _synthetic_embeddings(proto, seed=2, missing=4), system="peer")
    png = plot_roc([ours, peer], tmp_path / "out" / "roc.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert b"IEND" in data[-16:]
    summary = write_summary([ours, peer], tmp_path / "summary.json")
    loaded = json.loads(summary.read_text())
    assert [s["system"] for s in loaded["systems"]] == ["ours", "peer"]
    assert loaded["systems"][1]["reference"]["missing"] == 4


@pytest.mark.slow
@pytest.mark.peer
@pytest.mark.evaluation
def test_peer_embeddings_score_equals_reference(tmp_path: Path) -> None:
    """The real peer (face_recognition) on the dev set: ~1-2 minutes of CPU for 170 images."""
    root = facesets.DEV_FACES
    proto = build_protocol(root, 300)
    proto_path, npz = tmp_path / "proto.json", tmp_path / "peer.npz"
    proto.save(proto_path)
    subprocess.run(
        [sys.executable, str(facesets.REFERENCE_EVAL / "embed_peer.py"), str(root), str(proto_path), str(npz)],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    emb = load_embeddings_npz(npz)
    expected = _run_reference_scorer(proto_path, npz)
    assert score(proto, emb).rounded() == expected
    rep = evaluate(proto, emb, system="face_recognition")
    assert rep.reference.rounded() == expected
    assert rep.point("ratio", "loo_all", 1e-2).n_strangers == 170
