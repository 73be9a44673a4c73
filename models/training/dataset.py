"""Folder-per-identity datasets as labelled embeddings, person-disjoint splits, and held-out protocols.

Embedding reuses ``models.evaluation.embed.embed_ours`` (the face nearest the image centre, as ``model-tool eval`` does)
and caches the result under the cache root, keyed by the encoder fingerprint, the detector settings and the sha256
of every image: re-running a training or a calibration on the same photos costs no second pass, and a changed
photo, encoder or detector setting can never be served a stale embedding.

Images without a face are left out (logged, listed in ``missing``); a corrupt image is an error, since a site's
training folder with a broken file is a mistake to fix rather than noise to skip.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from models.cache import atomic_write_bytes, cache_dir
from models.errors import DatasetError, ImageError, ModelError
from models.evaluation.scoring import (
    Protocol,
    build_protocol,
    load_embeddings_npz,
    load_identities,
    save_embeddings_npz,
)
from models.registry import sha256_bytes

if TYPE_CHECKING:
    from models.face.pipeline import FacePipeline

log = logging.getLogger(__name__)

_CACHE_VERSION = 1
MIN_IMAGES = 2  # an identity needs two images to give a positive pair (triplets, genuine pairs)


@dataclass(frozen=True, eq=False)
class LabelledEmbeddings:
    """One row per image with a face: ``images`` (paths relative to the dataset root, ``identity/file``),
    ``labels`` (the identity of each row) and ``vectors`` (n, dim) float32, all under encoder ``fingerprint``.
    ``missing``: images of the same identities without a usable face (left out of ``vectors``)."""

    images: tuple[str, ...]
    labels: tuple[str, ...]
    vectors: NDArray[np.float32]
    fingerprint: str
    missing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        v = self.vectors
        if v.ndim != 2 or v.shape[0] != len(self.images) or len(self.labels) != len(self.images):
            raise DatasetError(
                f"labelled embeddings: {len(self.images)} images, {len(self.labels)} labels, vectors {v.shape}"
            )
        if not np.isfinite(v).all():
            raise DatasetError("labelled embeddings: non-finite vector (a missing face belongs in 'missing')")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.labels)))

    def label_codes(self) -> NDArray[np.int64]:
        """Each row's identity as an index into ``identities``."""
        code = {name: i for i, name in enumerate(self.identities)}
        return np.array([code[x] for x in self.labels], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for x in self.labels:
            out[x] = out.get(x, 0) + 1
        return out

    def subset(self, identities: Collection[str]) -> LabelledEmbeddings:
        keep = set(identities)
        rows = [i for i, x in enumerate(self.labels) if x in keep]
        return LabelledEmbeddings(
            images=tuple(self.images[i] for i in rows),
            labels=tuple(self.labels[i] for i in rows),
            vectors=self.vectors[rows],
            fingerprint=self.fingerprint,
            missing=tuple(m for m in self.missing if _identity_of(m) in keep),
        )

    def with_vectors(self, vectors: NDArray[np.float32], fingerprint: str) -> LabelledEmbeddings:
        """The same images in another embedding space (e.g. through an adapter)."""
        return LabelledEmbeddings(self.images, self.labels, np.asarray(vectors, np.float32), fingerprint, self.missing)

    def as_mapping(self) -> dict[str, NDArray[np.float32] | None]:
        """{image: vector, or None without a face}: the form ``models.evaluation.scoring`` takes."""
        out: dict[str, NDArray[np.float32] | None] = dict(zip(self.images, self.vectors, strict=True))
        out.update(dict.fromkeys(self.missing))
        return out


def _identity_of(relpath: str) -> str:
    return Path(relpath).parts[0]


def scan_dataset(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """{identity: [relative image paths]} of a folder-per-identity dataset, or DatasetError saying what is wrong."""
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder (expected one sub-folder of images per identity)")
    ids = load_identities(path)
    if not ids:
        raise DatasetError(f"{path}: no identity sub-folder with images (.jpg, .jpeg, .png) in it")
    return ids


def require_identities(counts: Mapping[str, int], minimum: int, what: str) -> None:
    """DatasetError unless ``counts`` holds at least ``minimum`` identities with two or more images."""
    usable = sum(1 for n in counts.values() if n >= MIN_IMAGES)
    if usable < minimum:
        raise DatasetError(
            f"too few identities for {what}: {usable} with >= {MIN_IMAGES} images ({len(counts)} in all), "
            f"at least {minimum} needed"
        )


def _cache_path(
    root: Path, ids: Mapping[str, list[str]], system: Mapping[str, object], cache_root: Path | None
) -> Path:
    """Where the embeddings of every image of `ids` by `system` (what makes them what they are) are cached."""
    files = [[rel, sha256_bytes((root / rel).read_bytes())] for v in ids.values() for rel in v]
    desc = {"version": _CACHE_VERSION, **system, "files": files}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return (cache_root or cache_dir()) / "embeddings" / f"{key[:32]}.npz"


def _from_cache(
    path: Path | None,
    base: Path,
    images: Sequence[str],
    embed: Callable[[Sequence[str]], dict[str, np.ndarray | None]],
    progress: Callable[[int], None] | None,
) -> tuple[dict[str, np.ndarray | None], bool]:
    """The cached rows when they cover exactly `images`, else `embed(images)`; and whether they are fresh."""
    rows = _load_cached(path) if path is not None else None
    if rows is not None and set(rows) == set(images):
        log.info("embeddings of %s from the cache %s", base, path)
        if progress:
            progress(len(images))
        return rows, False
    return embed(images), True


def _load_cached(path: Path) -> dict[str, np.ndarray | None] | None:
    if not path.is_file():
        return None
    try:
        rows = load_embeddings_npz(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("embedding cache %s is unreadable (%s); embedding again", path, exc)
        return None
    return {k: None if v is None or np.isnan(v).any() else v for k, v in rows.items()}


def _save_cached(path: Path, rows: Mapping[str, np.ndarray | None]) -> None:
    buf = io.BytesIO()
    save_embeddings_npz(buf, rows)  # np.savez writes to a file object as well as to a path
    atomic_write_bytes(path, buf.getvalue())


def embed_dataset(
    root: str | os.PathLike[str],
    pipeline: FacePipeline,
    *,
    progress: Callable[[int], None] | None = None,
    use_cache: bool = True,
    cache_root: Path | None = None,
) -> LabelledEmbeddings:
    """Every image of a folder-per-identity dataset through ``pipeline`` (cached, see the module docstring, under
    ``cache_root``/embeddings, by default the faceattend cache)."""
    from models.evaluation.embed import embed_ours

    base = Path(root)
    ids = scan_dataset(base)
    system = {"fingerprint": pipeline.fingerprint, "detector": asdict(pipeline.detector.config)}
    cache = _cache_path(base, ids, system, cache_root) if use_cache else None
    images = [rel for v in ids.values() for rel in v]
    rows, fresh = _from_cache(cache, base, images, lambda todo: embed_ours(base, todo, pipeline, progress), progress)
    return _labelled(base, ids, rows, pipeline.fingerprint, cache if fresh else None)


def embed_dataset_peer(
    root: str | os.PathLike[str],
    *,
    progress: Callable[[int], None] | None = None,
    use_cache: bool = True,
    cache_root: Path | None = None,
) -> LabelledEmbeddings:
    """The same for the ``face_recognition`` peer (``models.evaluation.embed.embed_peer``: dlib's HOG detector and
    encoder), cached beside ours under the peer's and dlib's versions."""
    import importlib.metadata

    from models.evaluation.embed import PEER_SYSTEM, embed_peer

    base = Path(root)
    ids = scan_dataset(base)
    versions = {}
    for key, names in (
        ("face_recognition", ("face_recognition",)),
        ("face_recognition_models", ("face_recognition_models",)),
        ("dlib", ("dlib-bin", "dlib")),
    ):
        for name in names:
            try:
                versions[key] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            raise ModelError(f"the peer needs {names[0]}: pip install --no-deps face_recognition==1.3.0 (and dlib-bin)")
    cache = _cache_path(base, ids, {"system": PEER_SYSTEM, **versions}, cache_root) if use_cache else None
    images = [rel for v in ids.values() for rel in v]
    rows, fresh = _from_cache(cache, base, images, lambda todo: embed_peer(base, todo, progress), progress)
    return _labelled(base, ids, rows, f"{PEER_SYSTEM}-{versions['face_recognition']}", cache if fresh else None)


def _labelled(
    base: Path,
    ids: Mapping[str, list[str]],
    rows: dict[str, np.ndarray | None],
    fingerprint: str,
    save_to: Path | None,
) -> LabelledEmbeddings:
    """Rows -> LabelledEmbeddings (images without a face in ``missing``), saved to the cache when fresh."""
    from models.imageio import load_image

    images = [rel for v in ids.values() for rel in v]
    missing = [rel for rel in images if rows[rel] is None]
    for rel in missing:  # embed_ours logs and skips unreadable files; for a training set that is an error
        try:
            load_image(base / rel)
        except ImageError as exc:
            raise DatasetError(f"corrupt image in the dataset: {exc}") from exc
    if missing:
        log.warning("%d of %d images have no face and are left out, e.g. %s", len(missing), len(images), missing[0])
    if save_to is not None:
        _save_cached(save_to, rows)
    present = [rel for rel in images if rows[rel] is not None]
    if not present:
        raise DatasetError(f"{base}: no face found in any of its {len(images)} images")
    vectors = np.stack([np.asarray(rows[rel], dtype=np.float32) for rel in present])
    return LabelledEmbeddings(
        images=tuple(present),
        labels=tuple(_identity_of(rel) for rel in present),
        vectors=vectors,
        fingerprint=fingerprint,
        missing=tuple(missing),
    )


@dataclass(frozen=True)
class PersonSplit:
    """Identities assigned to train / validation / test: no person is in two of them."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int


def _systematic(ranked: Sequence[str], fraction: float, rng: np.random.Generator) -> list[str]:
    # every (1 / fraction)-th identity from a random start along the count ranking: each split gets large and small
    # identities alike, which matters when a handful of people hold most of the images
    u = float(rng.random())
    return [x for i, x in enumerate(ranked) if math.floor((i + 1) * fraction + u) > math.floor(i * fraction + u)]


def split_people(counts: Mapping[str, int], *, test_fraction: float, val_fraction: float, seed: int) -> PersonSplit:
    """Person-disjoint split, stratified by images per identity; deterministic for a seed.

    ``test_fraction`` of all identities go to test, then ``val_fraction`` of the rest to validation.
    """
    for name, f in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= f < 1.0:
            raise DatasetError(f"{name} must be in [0, 1), got {f}")
    rng = np.random.default_rng(seed)
    names = sorted(counts)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    ranked = sorted(shuffled, key=lambda n: -counts[n])  # stable: equal counts stay in random order
    test = set(_systematic(ranked, test_fraction, rng))
    rest = [n for n in ranked if n not in test]
    val = set(_systematic(rest, val_fraction, rng))
    return PersonSplit(
        train=tuple(sorted(n for n in rest if n not in val)),
        val=tuple(sorted(val)),
        test=tuple(sorted(test)),
        seed=seed,
    )


def held_out_protocol(root: str | os.PathLike[str], identities: Collection[str], max_pairs: int = 300) -> Protocol:
    """The DESIGN.md evaluation protocol (``models.evaluation.scoring.build_protocol``, unchanged) on some identities
    only.

    The protocol reads a folder, so the identities are presented as a temporary folder of links to the real ones
    (image paths stay ``identity/file``, the keys of the embeddings). Pairs: up to ``max_pairs`` each, at most half
    of the distinct pairs that exist (the protocol draws them at random until it has that many).
    """
    base = Path(root).resolve()
    with tempfile.TemporaryDirectory(prefix="faceattend-protocol-") as tmp:
        view = Path(tmp)
        for name in sorted(identities):
            (view / name).symlink_to(base / name, target_is_directory=True)
        ids = load_identities(view)
        sizes = [len(v) for v in ids.values()]
        same = sum(n * (n - 1) // 2 for n in sizes)
        total = sum(sizes)
        cross = total * (total - 1) // 2 - same
        if same < 1 or cross < 1:
            raise DatasetError(f"too few identities to evaluate on: {len(ids)} held out, {same} genuine pairs")
        return build_protocol(view, n_pairs=max(1, min(max_pairs, same // 2, cross // 2)))
