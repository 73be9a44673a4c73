"""Datasets for training: scanning, the cached embedding pass, person-disjoint splits, held-out protocols."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from training_data import clusters, image_folder

from models.errors import DatasetError
from models.face.detector import DetectorConfig
from models.training.dataset import embed_dataset, held_out_protocol, require_identities, scan_dataset, split_people
from models.types import Detection, FaceEmbedding


class FakePipeline:
    """Stands in for FacePipeline: a black image has no face; otherwise one face whose embedding is the colour."""

    fingerprint = "fake-0000000000000000"

    def __init__(self) -> None:
        self.detector = SimpleNamespace(config=DetectorConfig())
        self.embedded = 0

    def embed_many(self, images: list[np.ndarray]) -> list[list[FaceEmbedding]]:
        self.embedded += len(images)
        out = []
        for img in images:
            h, w = img.shape[:2]
            det = Detection((0.0, 0.0, float(w), float(h)), 0.99, ((0.0, 0.0),) * 5)
            colour = img.reshape(-1, 3).mean(axis=0).astype(np.float32) / 255
            out.append([FaceEmbedding(det, colour)] if colour.max() > 0 else [])
        return out


def _photos(root, spec: dict[str, list[tuple[int, int, int]]]):
    for person, colours in spec.items():
        (root / person).mkdir(parents=True)
        for k, c in enumerate(colours):
            Image.new("RGB", (24, 24), c).save(root / person / f"{k}.png")
    return root


def test_embed_dataset_caches_and_skips_faceless_images(tmp_path, cache_root) -> None:
    root = _photos(tmp_path / "faces", {"ann": [(200, 10, 10), (190, 20, 10), (0, 0, 0)], "bob": [(10, 10, 200)]})
    pipe = FakePipeline()
    data = embed_dataset(root, pipe)  # type: ignore[arg-type]
    assert data.images == ("ann/0.png", "ann/1.png", "bob/0.png") and data.missing == ("ann/2.png",)
    assert data.labels == ("ann", "ann", "bob") and data.fingerprint == pipe.fingerprint
    assert data.vectors[0] == pytest.approx(np.array([200, 10, 10]) / 255, abs=1e-6)
    assert data.as_mapping()["ann/2.png"] is None and data.counts() == {"ann": 2, "bob": 1}
    assert pipe.embedded == 4
    again = embed_dataset(root, pipe)  # type: ignore[arg-type]
    assert pipe.embedded == 4 and np.array_equal(again.vectors, data.vectors) and again.missing == data.missing
    Image.new("RGB", (24, 24), (5, 200, 5)).save(root / "bob" / "0.png")  # a changed photo is never served stale
    changed = embed_dataset(root, pipe)  # type: ignore[arg-type]
    assert pipe.embedded == 8 and changed.vectors[2] == pytest.approx(np.array([5, 200, 5]) / 255, abs=1e-6)


def test_a_corrupt_image_is_an_error_naming_it(tmp_path, cache_root) -> None:
    root = _photos(tmp_path / "faces", {"ann": [(200, 10, 10)], "bob": [(10, 10, 200)]})
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DatasetError, match=r"corrupt image.*broken\.jpg"):
        embed_dataset(root, FakePipeline())  # type: ignore[arg-type]


def test_scan_refuses_what_is_not_a_dataset(tmp_path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(tmp_path / "absent")
    (tmp_path / "empty" / "nobody").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no identity sub-folder with images"):
        scan_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="too few identities for training: 1 with >= 2 images"):
        require_identities({"a": 3, "b": 1}, 2, "training")


def test_split_is_person_disjoint_stratified_and_deterministic() -> None:
    counts = {
        f"p{i:02d}": n for i, n in enumerate([22, 20, 19, 16, 14, 9, 8, 6, 6, 5, 5, 5, 4, 4, 4, 3, 3, 3] + [2] * 5)
    }
    split = split_people(counts, test_fraction=0.5, val_fraction=0.25, seed=0)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert set().union(*parts) == set(counts) and sum(map(len, parts)) == len(counts)
    assert abs(len(split.test) - len(counts) / 2) <= 1
    # stratified: both sides get some of the five biggest identities, not all of them on one side
    big = {f"p{i:02d}" for i in range(5)}
    assert 2 <= len(big & set(split.test)) <= 3
    assert split == split_people(counts, test_fraction=0.5, val_fraction=0.25, seed=0)
    assert split != split_people(counts, test_fraction=0.5, val_fraction=0.25, seed=1)
    with pytest.raises(DatasetError):
        split_people(counts, test_fraction=1.0, val_fraction=0.0, seed=0)


def test_held_out_protocol_only_names_the_held_out_people(tmp_path) -> None:
    data = clusters(8, 4, seed=3)
    root = image_folder(tmp_path, data)
    chosen = data.identities[:4]
    protocol = held_out_protocol(root, chosen, max_pairs=300)
    assert {img.split("/")[0] for img in protocol.images} == set(chosen)
    assert len(protocol.genuine) == 12  # half of the 4 x 6 genuine pairs that exist
    with pytest.raises(DatasetError, match="too few identities"):
        held_out_protocol(root, data.identities[:1])
