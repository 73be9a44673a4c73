"""GalleryIndex (exact and hnswlib paths, exact re-rank, identities), IndexHolder, and the saved gallery on disk."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from edge_agent.gallery.ann import GRAPH_FILE, SIDECAR_FILE, AnnBuilder, HnswStage
from edge_agent.gallery.index import SAVED_FILE, GalleryIndex, GalleryStore, IndexHolder, IndexParams
from models.contract.gallery import Gallery, GalleryPerson, build_publication, signed_bytes
from models.contract.signing import Signer
from models.decision.rules import DecisionRule, Neighbours, pairwise_distances
from models.errors import (
    ConfigError,
    FingerprintMismatchError,
    GalleryFormatError,
    GalleryIndexError,
    GalleryStoreError,
    IntegrityError,
    SignatureError,
)

SITE = "hq"
FP = "dlib_resnet_v1-unit000000000000"
DIM = 128


def clustered(people: int, per_person: int, seed: int = 0, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: person centres sharing a mean direction (pairwise ~1.0, like face embeddings), templates
    around them (same person ~0.45 apart). Returns (centres, templates in person order)."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(DIM)
    centres = mean / np.linalg.norm(mean) + rng.standard_normal((people, DIM)) / np.sqrt(DIM)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t = centres[:, None, :] + spread * rng.standard_normal((people, per_person, DIM)) / np.sqrt(DIM)
    t /= np.linalg.norm(t, axis=2, keepdims=True)
    return centres.astype(np.float32), t.reshape(-1, DIM).astype(np.float32)


def make_gallery(
    embeddings: np.ndarray, labels: np.ndarray, n_people: int, version: int = 1, dtype: str = "float32"
) -> Gallery:
    people = tuple(GalleryPerson(f"p{i:05d}", f"Person {i}") for i in range(n_people))
    return Gallery(SITE, version, FP, "euclidean", dtype, embeddings, labels, people)


def probes_near(centres: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_10k() -> tuple[Gallery, np.ndarray]:
    centres, templates = clustered(2000, 5)
    return make_gallery(templates, np.repeat(np.arange(2000), 5), 2000), centres


def reference(gallery: Gallery, probes: np.ndarray) -> Neighbours:
    """Brute force by models.decision.rules, with person ids as labels."""
    ids = np.array([p.person_id for p in gallery.people], dtype=object)
    return Neighbours.from_embeddings(probes, gallery.embeddings, ids[gallery.labels])


# --- search -------------------------------------------------------------------------------------------------------


def test_exact_and_hnsw_paths_agree_on_a_10k_gallery_and_rerank_gives_exact_distances(synthetic_10k):
    gallery, centres = synthetic_10k
    exact = GalleryIndex.build(gallery)
    stage = HnswStage.build(exact.vectors, IndexParams())
    assert stage is not None
    ann = exact.with_stage(stage, 0.0)
    assert exact.exact and not ann.exact and ann.vectors is exact.vectors  # nothing copied
    probes = probes_near(centres, 500, seed=1)
    ref = reference(gallery, probes)

    got_exact = exact.search(probes, k=2).neighbours
    assert list(got_exact.label1) == list(ref.label1) and list(got_exact.label2) == list(ref.label2)
    np.testing.assert_allclose(got_exact.d1, ref.d1, rtol=1e-12)
    np.testing.assert_allclose(got_exact.d2, ref.d2, rtol=1e-12)

    got_ann = ann.search(probes, k=2).neighbours
    agree = got_ann.label1 == ref.label1
    assert agree.mean() >= 0.99
    # where hnswlib found the identity, its distance is the exact one, not hnswlib's squared approximation
    np.testing.assert_allclose(got_ann.d1[agree], ref.d1[agree], rtol=1e-12)
    # and every distance reported is a true distance to that person, so never below the exact nearest
    assert np.all(got_ann.d1 >= ref.d1 - 1e-12)


def test_templates_collapse_to_identities_nearest_first():
    # p0: three templates along the x axis, p1: one, p2: one; the probe sits at the origin
    emb = np.zeros((5, DIM), np.float32)
    emb[0, 0], emb[1, 0], emb[2, 0] = 0.1, 0.2, 0.9  # p0
    emb[3, 1] = 0.3  # p1
    emb[4, 2] = 0.5  # p2
    gallery = make_gallery(emb, np.array([0, 0, 0, 1, 2]), 3)
    index = GalleryIndex.build(gallery)
    matches = index.search(np.zeros(DIM, np.float32), k=5)
    assert list(matches.person_ids[0]) == ["p00000", "p00001", "p00002", None, None]
    np.testing.assert_allclose(matches.distances[0], [0.1, 0.3, 0.5, np.inf, np.inf], rtol=1e-6)
    assert (index.people, index.templates, index.version, index.fingerprint) == (3, 5, 1, FP)
    assert index.labels == {"p00000": "Person 0", "p00001": "Person 1", "p00002": "Person 2"}

    # both forms the decision rules take
    nb = matches.neighbours
    assert (nb.label1[0], nb.label2[0]) == ("p00000", "p00001")
    decision = DecisionRule.ratio(0.8).decide(nb)[0]
    assert decision.accepted and decision.person_id == "p00000" and decision.ratio == pytest.approx(1 / 3, rel=1e-6)
    one = DecisionRule.margin(0.1).decide_topk(
        matches.distances[0], matches.person_ids[0], gallery_identities=matches.gallery_people
    )
    assert one.accepted and one.margin == pytest.approx(0.2, rel=1e-6)


def test_distances_to_named_identities_are_exact_whether_listed_or_not(synthetic_10k):
    """The vote's exact distances (issue 13): to each named person's nearest template, also a person far outside any
    top-k list; inf for an id the gallery lacks and for a failed encoding; the same on the hnswlib path."""
    gallery, centres = synthetic_10k
    probes = probes_near(centres, 6, seed=9)
    probes[5] = np.nan
    names = ["p00007", "p01999", "nobody", "p00000"]
    ids = np.array([p.person_id for p in gallery.people], dtype=object)[gallery.labels]
    brute = pairwise_distances(probes[:5], gallery.embeddings)
    expected = np.stack([brute[:, ids == n].min(axis=1) if n in ids else np.full(5, np.inf) for n in names], axis=1)
    exact = GalleryIndex.build(gallery)
    staged = exact.with_stage(HnswStage.build(exact.vectors, IndexParams()), 0.0)
    for index in (exact, staged):
        got = index.distances_to(probes, names)
        assert got.shape == (6, 4) and np.isinf(got[5]).all() and np.isinf(got[:5, 2]).all()
        np.testing.assert_allclose(got[:5], expected, rtol=1e-12)
        listed = index.search(probes[:5], k=2)  # where search lists a person, both give the same distance
        for i in range(5):
            for person, d in zip(listed.person_ids[i], listed.distances[i], strict=True):
                assert index.distances_to(probes[i], [person])[0, 0] == pytest.approx(d, rel=1e-12)
    with pytest.raises(GalleryIndexError, match=r"\(n, 128\)"):
        GalleryIndex.build(gallery).distances_to(np.zeros((1, 64)), names)


def test_k1_on_a_larger_gallery_errs_towards_unknown():
    emb = np.eye(3, DIM, dtype=np.float32)
    index = GalleryIndex.build(make_gallery(emb, np.arange(3), 3))
    matches = index.search(emb[0] * 0.9, k=1)
    # the runner-up is not listed: d2 is lower-bounded by d1, so the ratio is 1 and the ratio rule rejects
    assert not DecisionRule.ratio(0.8).decide(matches.neighbours)[0].accepted


def test_empty_gallery_and_unusable_probes_have_no_neighbours():
    empty = GalleryIndex.build(make_gallery(np.zeros((0, DIM), np.float32), np.zeros(0, np.int32), 0))
    assert (empty.people, empty.templates) == (0, 0)
    matches = empty.search(np.ones((3, DIM), np.float32), k=2)
    assert matches.person_ids.tolist() == [[None, None]] * 3 and np.isinf(matches.distances).all()
    decisions = DecisionRule.distance(0.6).decide(matches.neighbours)
    assert [(d.accepted, d.candidate) for d in decisions] == [(False, None)] * 3

    index = GalleryIndex.build(make_gallery(np.eye(2, DIM, dtype=np.float32), np.arange(2), 2))
    probes = np.zeros((2, DIM), np.float32)
    probes[0, 0] = np.nan  # a failed encoding
    matches = index.search(probes, k=2)
    assert matches.person_ids[0].tolist() == [None, None] and np.isinf(matches.distances[0]).all()
    assert matches.person_ids[1].tolist() == ["p00000", "p00001"]


def test_float16_gallery_distances_are_to_the_stored_values():
    _, templates = clustered(20, 2, seed=4)
    gallery = make_gallery(templates, np.repeat(np.arange(20), 2), 20, dtype="float16")
    probes = templates[:5] + 0.01
    got = GalleryIndex.build(gallery).search(probes, k=1)
    expected = pairwise_distances(probes, gallery.embeddings.astype(np.float32)).min(axis=1)
    np.testing.assert_allclose(got.distances[:, 0], expected, rtol=1e-12)


def test_bad_queries_and_params_raise_typed_errors():
    index = GalleryIndex.build(make_gallery(np.eye(2, DIM, dtype=np.float32), np.arange(2), 2))
    with pytest.raises(GalleryIndexError, match=r"\(n, 128\)"):
        index.search(np.zeros((1, 64), np.float32))
    with pytest.raises(GalleryIndexError, match="k must be"):
        index.search(np.zeros(DIM, np.float32), k=0)
    with pytest.raises(ConfigError, match="ef"):
        IndexParams(ef=0)
    with pytest.raises(ConfigError, match="exact_max_templates"):
        IndexParams(exact_max_templates=-1)


def test_holder_swaps_one_reference():
    holder = IndexHolder()
    assert holder.current is None
    a = GalleryIndex.build(make_gallery(np.eye(2, DIM, dtype=np.float32), np.arange(2), 2, version=1))
    b = GalleryIndex.build(make_gallery(np.eye(2, DIM, dtype=np.float32), np.arange(2), 2, version=2))
    assert holder.swap(a) is None and holder.current is a
    taken = holder.current  # what a reader holds for its batch
    assert holder.swap(b) is a and holder.current is b
    assert taken.version == 1  # the reader's batch keeps the index it started with
    # a background upgrade of `a` must not undo the newer `b`
    assert not holder.replace(a, a) and holder.current is b
    assert holder.replace(b, a) and holder.current is a


# --- the hnswlib stage in the background, and on disk ------------------------------------------------------------


def test_a_big_gallery_serves_exact_at_once_and_gets_its_graph_in_the_background_then_from_disk(
    tmp_path, synthetic_10k
):
    gallery, centres = synthetic_10k
    params = IndexParams(exact_max_templates=5_000)
    probes = probes_near(centres, 200, seed=2)
    ref = reference(gallery, probes)
    holder = IndexHolder()
    exact = GalleryIndex.build(gallery)
    holder.swap(exact)
    builder = AnnBuilder(holder, tmp_path, params)
    try:
        builder.use(exact, "a" * 64)
        assert list(exact.search(probes, k=2).neighbours.label1) == list(ref.label1)  # serving meanwhile
        assert builder.wait_idle(120.0)
        upgraded = holder.current
        assert upgraded is not exact and not upgraded.exact and upgraded.release == exact.release
        assert builder.status().state == "hnswlib"
        assert (upgraded.search(probes, k=2).neighbours.label1 == ref.label1).mean() >= 0.99
        assert sorted(os.listdir(tmp_path)) == [GRAPH_FILE, SIDECAR_FILE]
    finally:
        builder.stop(10.0)

    # a restart: the graph comes from disk, checked against the gallery it was built from
    holder2 = IndexHolder(GalleryIndex.build(gallery))
    restarted = AnnBuilder(holder2, tmp_path, params)
    try:
        restarted.use(holder2.current, "a" * 64)
        assert restarted.wait_idle(60.0) and not holder2.current.exact
        loaded_in = restarted.status().seconds
        assert loaded_in is not None
    finally:
        restarted.stop(10.0)
    got = holder2.current.search(probes, k=2).neighbours
    np.testing.assert_array_equal(got.label1, upgraded.search(probes, k=2).neighbours.label1)

    # a graph whose file does not hash to its record is rebuilt, never handed to hnswlib
    graph = tmp_path / GRAPH_FILE
    damaged = bytearray(graph.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    graph.write_bytes(bytes(damaged))
    holder3 = IndexHolder(GalleryIndex.build(gallery))
    rebuilt = AnnBuilder(holder3, tmp_path, params)
    try:
        rebuilt.use(holder3.current, "a" * 64)
        assert rebuilt.wait_idle(120.0) and not holder3.current.exact
        assert json.loads((tmp_path / SIDECAR_FILE).read_text())["blob_sha256"] == "a" * 64
        # a new gallery (small: exact only) deletes the graph: it holds the old gallery's vectors
        small = GalleryIndex.build(make_gallery(np.eye(3, DIM, dtype=np.float32), np.arange(3), 3, version=2))
        holder3.swap(small)
        rebuilt.use(small, "b" * 64)
        assert rebuilt.wait_idle(10.0) and os.listdir(tmp_path) == []
        assert holder3.current is small and rebuilt.status().state == "exact"
    finally:
        rebuilt.stop(10.0)


def test_a_newer_gallery_abandons_a_graph_build_in_hand(tmp_path, synthetic_10k):
    gallery, _ = synthetic_10k
    holder = IndexHolder()
    old = GalleryIndex.build(gallery)
    holder.swap(old)
    builder = AnnBuilder(holder, tmp_path, IndexParams(exact_max_templates=0))
    try:
        builder.use(old, "a" * 64)
        new = GalleryIndex.build(make_gallery(np.eye(3, DIM, dtype=np.float32), np.arange(3), 3, version=2))
        holder.swap(new)
        builder.use(new, "b" * 64)
        assert builder.wait_idle(120.0)
        current = holder.current
        assert current.version == 2  # the old gallery's graph never replaced the newer gallery
        assert (
            not (tmp_path / SIDECAR_FILE).exists()
            or json.loads((tmp_path / SIDECAR_FILE).read_text())["blob_sha256"] == "b" * 64
        )
    finally:
        builder.stop(10.0)


# --- the saved gallery --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


def publication(gallery: Gallery, signer: Signer) -> tuple[bytes, bytes]:
    manifest, chunks = build_publication(gallery, signer, chunk_size=1024)
    return manifest.to_json(), b"".join(chunks)


def small_gallery(version: int, people: list[str]) -> Gallery:
    rng = np.random.default_rng(version)
    emb = (rng.standard_normal((2 * len(people), DIM)) * 0.1).astype(np.float32)
    persons = tuple(GalleryPerson(p, p.title()) for p in people)
    return Gallery(SITE, version, FP, "euclidean", "float32", emb, np.repeat(np.arange(len(people)), 2), persons)


def test_saved_gallery_round_trip_is_verified_again(tmp_path, signer):
    store = GalleryStore(tmp_path, signer.verifier, FP, SITE)
    assert store.load() is None
    gallery = small_gallery(3, ["ann", "ben"])
    store.save(*publication(gallery, signer))
    assert os.stat(store.path).st_mode & 0o077 == 0  # biometric data: owner only
    loaded = GalleryStore(tmp_path, signer.verifier, FP, SITE).load()
    assert loaded is not None and loaded.version == 3 and loaded.people == gallery.people
    np.testing.assert_array_equal(loaded.embeddings, gallery.embeddings)
    np.testing.assert_array_equal(loaded.labels, gallery.labels)


def tamper(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        ("blob", IntegrityError),
        ("manifest", SignatureError),
        ("other_key", SignatureError),
        ("other_fingerprint", FingerprintMismatchError),
        ("truncated", GalleryFormatError),
    ],
)
def test_a_saved_gallery_that_fails_verification_is_refused_and_deleted(tmp_path, signer, damage, cause):
    gallery = small_gallery(2, ["ann", "ben"])
    manifest, blob = publication(gallery, signer)
    store = GalleryStore(tmp_path, signer.verifier, FP, SITE)
    store.save(manifest, blob)
    reader = store
    if damage == "blob":
        tamper(store.path, 100)  # an embedding byte
    elif damage == "manifest":
        # a re-signed claim of another version, signature kept: the signature no longer covers the content
        obj = json.loads(manifest)
        obj["version"] = 9
        store.save(json.dumps(obj).encode(), blob)
    elif damage == "other_key":
        reader = GalleryStore(tmp_path, Signer.generate().verifier, FP, SITE)
    elif damage == "other_fingerprint":
        reader = GalleryStore(tmp_path, signer.verifier, "another_encoder-0000000000000000", SITE)
    else:
        store.path.write_bytes(store.path.read_bytes()[:-10])
    with pytest.raises(GalleryStoreError, match="refused and deleted") as info:
        reader.load()
    assert isinstance(info.value.__cause__, cause)
    assert not store.path.exists()
    assert reader.load() is None  # next start: nothing saved, the broker's gallery will come


def test_forged_saved_gallery_signed_by_another_key_claiming_ours_is_refused(tmp_path, signer):
    attacker = Signer.generate()
    manifest, chunks = build_publication(small_gallery(5, ["mallory"]), attacker)
    draft = dataclasses.replace(manifest, key_id=signer.key_id, signature="")
    forged = dataclasses.replace(draft, signature=attacker.sign_b64(signed_bytes(draft.to_object())))
    store = GalleryStore(tmp_path, signer.verifier, FP, SITE)
    store.save(forged.to_json(), b"".join(chunks))
    with pytest.raises(GalleryStoreError) as info:
        store.load()
    assert isinstance(info.value.__cause__, SignatureError) and not store.path.exists()


def test_a_removed_person_leaves_the_disk_and_no_stale_files_remain(tmp_path, signer):
    store = GalleryStore(tmp_path, signer.verifier, FP, SITE)
    v1 = small_gallery(1, ["ann", "mallory", "ben"])
    store.save(*publication(v1, signer))
    mallory_vector = v1.embeddings[2].tobytes()
    assert mallory_vector in store.path.read_bytes()
    # a save cut short by kill -9 left its temp file behind, holding the old gallery
    (tmp_path / f"{SAVED_FILE}.abc123.tmp").write_bytes(store.path.read_bytes())

    v2 = small_gallery(2, ["ann", "ben"])
    store.save(*publication(v2, signer))
    loaded = store.load()
    assert loaded is not None and [p.person_id for p in loaded.people] == ["ann", "ben"]
    assert sorted(os.listdir(tmp_path)) == [SAVED_FILE]
    data = store.path.read_bytes()
    assert b"mallory" not in data and mallory_vector not in data
