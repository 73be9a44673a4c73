"""The matcher's index over a verified gallery, the holder that swaps it atomically, and the last good gallery on disk.

Search is two-stage. Stage 1 picks candidate templates: a BLAS brute force (|g|² - 2 q·g in float32, exact but
for float32 rounding of near-ties) or, once it exists, a `CandidateStage` (edge_agent.gallery.ann: hnswlib,
approximate). Stage 2 re-ranks the candidates exactly, as differences in float64 on the gallery's own vectors
(the same Euclidean distance `models.decision.rules.pairwise_distances` computes, not hnswlib's squared one),
collapses templates to identities (each identity's nearest template) and keeps the k nearest identities. Asking
for k x (most templates of one person) x 2 candidates guarantees the exact top-k identities whenever stage 1 is
exact. Whatever stage 1 is, the reported distances are exact distances to the gallery's templates.

An index is in service the moment it exists: `GalleryIndex.build` only takes the vectors (and their squared
norms, milliseconds at 50k templates), so a new gallery serves at once with exact search. Above
`IndexParams.exact_max_templates` the hnswlib stage is built (or loaded from disk) off the inference path and an
index with it replaces the exact one (`with_stage`, `IndexHolder.replace`): same gallery, same release.

Why the cutoff sits at 15,000 templates (measured on a 2-core x86 CPU, one thread, 128-d, batch of 1 / 4 / 16
probes): exact 0.26 / 0.96 / 1.7 ms against hnswlib 0.32 / 1.2 / 4.8 ms at 10k templates, exact 0.46 / 2.0 / 3.7
against 0.35 / 1.4 / 6.1 ms at 20k, exact 1.1 / 8.3 / 12 ms against 0.43 / 1.9 / 9.9 ms at 50k. Below the cutoff
exact is as fast and has no recall loss; above it exact still serves while the graph is built (a 50k build takes
12-15 s of one core here, which is why nothing waits for it).

Why M=24, ef_construction=100, ef=256 (synthetic 10k people x 5 unit-vector templates; the hardest probes are
mixtures of two random people, where the decision needs both d1 and d2): an approximate search only over-estimates
distances, and a missed runner-up over-estimates d2, which makes the ratio and margin rules *accept* more (the
false-accept direction). On 2,000 such probes at ef=256, d1 / d2 came out exact for 98.6 % / 97.0 % at M=16 (18
extra accepts under ratio 0.8), 99.9 % / 99.6 % at M=24 (2 extra accepts); M=32 was no better for a longer build.
ef_construction 100 builds in about half the time of 200 (11 s against 21 s at 50k, one thread); 64 builds in 8 s
but misses d2 twice as often (99.0 %). The large query ef costs 0.6-0.9 ms per probe, small beside the encoder.
Mated probes: top-1 identity 100 %. One build thread: two take 7 s at 50k but give a non-deterministic graph.

Persistence: the last applied publication is saved as one file (`gallery.fagp`: the signed manifest bytes and the
blob, exactly as received) written atomically; at start-up it is verified again like a fresh download (signature
under the configured key, every sha256, the encoder fingerprint, the blob structure), so an edge serves its last
gallery with the broker down, with exact search from the first second. A new publication replaces the file (a
removed person leaves the disk with it); a file that fails verification is deleted, because it can never become
valid under this configuration and may hold people removed since. The hnswlib graph beside it is derived data,
keyed by the blob's sha256 (edge_agent.gallery.ann).
"""

from __future__ import annotations

import abc
import logging
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, NDArray

from models.cache import atomic_write_bytes, fsync_dir
from models.contract import limits, topics
from models.contract.assembler import GalleryAssembler, Verified
from models.contract.gallery import Gallery, GalleryManifest, release_text
from models.contract.signing import Verifier
from models.decision.rules import Neighbours
from models.errors import ConfigError, ContractError, GalleryFormatError, GalleryIndexError, GalleryStoreError

log = logging.getLogger(__name__)

SUPPORTED_METRICS = ("euclidean",)
# headroom over k x (templates per person): lets the approximate stage miss a template and still list the identity
CANDIDATE_HEADROOM = 2
# float64 elements per re-rank chunk (probes x candidates x dim): 128 MiB at most
_RERANK_ELEMENTS = 1 << 24

SAVED_FILE = "gallery.fagp"
_FILE_MAGIC = b"FAGP"
_FILE_FORMAT = 1
_FILE_HEADER = struct.Struct("<4sHI")  # magic, format, manifest length; then the manifest, then the blob
_MAX_FILE_BYTES = _FILE_HEADER.size + limits.MAX_MANIFEST_BYTES + limits.MAX_BLOB_BYTES


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched; the defaults are the measured choice of the module docstring."""

    m: int = 24
    ef_construction: int = 100
    ef: int = 256
    # above this many templates an hnswlib stage is built in the background (exact search serves meanwhile)
    exact_max_templates: int = 15_000
    # one thread: a gallery update must not take cores from the live camera pipeline; it is rare, and a slower
    # build (about 15 s for 50k templates here) costs nothing while exact search serves the new gallery
    build_threads: int = 1
    seed: int = 100  # hnswlib's level generator: the same gallery gives the same graph with one build thread

    def __post_init__(self) -> None:
        for name in ("m", "ef_construction", "ef", "build_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"gallery index: {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.exact_max_templates, bool) or not isinstance(self.exact_max_templates, int):
            raise ConfigError(
                f"gallery index: exact_max_templates must be an integer, got {self.exact_max_templates!r}"
            )
        if self.exact_max_templates < 0:
            raise ConfigError(f"gallery index: exact_max_templates must be >= 0, got {self.exact_max_templates}")


@dataclass(frozen=True, eq=False)
class Matches:
    """Per probe, the k nearest identities, nearest first, with their exact Euclidean distances.

    `person_ids` (n, k) object array: person ids, None where there are fewer than k identities (or none: empty
    gallery, non-finite probe); `distances` (n, k) float64, inf where `person_ids` is None. Row i is what
    `DecisionRule.decide_topk(distances[i], person_ids[i], gallery_identities=gallery_people)` takes;
    `neighbours` is the whole batch for `DecisionRule.decide`.
    """

    person_ids: np.ndarray = field(repr=False)
    distances: NDArray[np.float64] = field(repr=False)
    gallery_people: int

    def __len__(self) -> int:
        return int(self.distances.shape[0])

    @property
    def neighbours(self) -> Neighbours:
        # from_topk lower-bounds d2 when k=1 lists a single identity of a larger gallery: towards "unknown"
        return Neighbours.from_topk(self.distances, self.person_ids, gallery_identities=self.gallery_people)


class CandidateStage(abc.ABC):
    """An approximate stage 1 over an index's vectors (row i of the gallery is label i)."""

    description: str  # for logs and status, e.g. "hnswlib M=24 ef_construction=100 ef=256"

    @abc.abstractmethod
    def knn(self, q: NDArray[np.float32], count: int) -> NDArray[np.intp]:
        """(n, count) row indices of candidate templates per probe; raises GalleryIndexError."""


class GalleryIndex:
    """A searchable, immutable view of one gallery release. `GalleryIndex.build` is quick (exact search needs no
    structure); `with_stage` gives the same index with an approximate stage 1. `search` is safe from any thread."""

    def __init__(
        self,
        gallery: Gallery,
        vectors: NDArray[np.float32],
        stage: CandidateStage | None,
        build_seconds: float,
        *,
        sqnorms: NDArray[np.float32] | None = None,
    ) -> None:
        """Use `build` and `with_stage`."""
        self._gallery = gallery
        self._vectors = vectors
        self._sqnorms = np.einsum("ij,ij->i", vectors, vectors) if sqnorms is None else sqnorms
        self._labels = gallery.labels.astype(np.intp)
        self._person_ids = np.array([p.person_id for p in gallery.people] + [None], dtype=object)  # [-1] = None
        self._names: Mapping[str, str] = MappingProxyType({p.person_id: p.name for p in gallery.people})
        counts = np.bincount(self._labels, minlength=len(gallery.people))
        self._max_per_person = int(counts.max()) if counts.size else 0
        # person id -> its template rows, for exact distances to chosen identities (distances_to)
        pieces = np.split(np.argsort(self._labels, kind="stable"), np.cumsum(counts)[:-1]) if counts.size else []
        self._rows: Mapping[str, NDArray[np.intp]] = MappingProxyType(
            {p.person_id: rows for p, rows in zip(gallery.people, pieces, strict=True)}
        )
        self._stage = stage
        self._build_seconds = build_seconds

    @classmethod
    def build(cls, gallery: Gallery) -> GalleryIndex:
        """An exact index, ready at once: the vectors as float32 and their squared norms."""
        if gallery.metric not in SUPPORTED_METRICS:
            raise GalleryIndexError(f"gallery v{gallery.version}: no index for metric {gallery.metric!r}")
        started = time.perf_counter()
        # float16 galleries widen exactly; float32 ones are used as they are (read-only, no copy)
        vectors = np.ascontiguousarray(gallery.embeddings, dtype=np.float32)
        index = cls(gallery, vectors, None, time.perf_counter() - started)
        log.info(
            "gallery v%d index: %d templates of %d people, exact, ready in %.3f s",
            gallery.version,
            gallery.count,
            len(gallery.people),
            index.build_seconds,
        )
        return index

    def with_stage(self, stage: CandidateStage, build_seconds: float) -> GalleryIndex:
        """The same gallery with `stage` picking the candidates (arrays shared, nothing copied)."""
        return GalleryIndex(self._gallery, self._vectors, stage, build_seconds, sqnorms=self._sqnorms)

    @property
    def vectors(self) -> NDArray[np.float32]:
        """(templates, dim) float32, read-only: what a candidate stage is built over."""
        return self._vectors

    @property
    def stage(self) -> CandidateStage | None:
        return self._stage

    # ---- what is in service ----

    @property
    def gallery(self) -> Gallery:
        return self._gallery

    @property
    def site(self) -> str:
        return self._gallery.site

    @property
    def version(self) -> int:
        return self._gallery.version

    @property
    def epoch(self) -> int:
        return self._gallery.epoch

    @property
    def release(self) -> tuple[int, int]:
        return self._gallery.release

    @property
    def fingerprint(self) -> str:
        return self._gallery.fingerprint

    @property
    def people(self) -> int:
        return len(self._names)

    @property
    def templates(self) -> int:
        return int(self._vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    @property
    def labels(self) -> Mapping[str, str]:
        """person_id -> name."""
        return self._names

    @property
    def build_seconds(self) -> float:
        return self._build_seconds

    @property
    def exact(self) -> bool:
        """True when searches are brute force, False when an approximate stage picks the candidates."""
        return self._stage is None

    # ---- search ----

    def search(self, embeddings: ArrayLike, k: int = 2) -> Matches:
        """The k nearest identities of each probe (`embeddings` (n, dim) or (dim,)); ask k >= 2 for the ratio and
        margin rules, which need the runner-up identity. Non-finite probes get no neighbour."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise GalleryIndexError(f"k must be an integer >= 1, got {k!r}")
        probes = np.asarray(embeddings, dtype=np.float32)
        if probes.ndim == 1:
            probes = probes[None, :]
        if probes.ndim != 2 or probes.shape[1] != self.dim:
            raise GalleryIndexError(f"probes must be (n, {self.dim}), got shape {probes.shape}")
        n = probes.shape[0]
        person_ids = np.full((n, k), None, dtype=object)
        distances = np.full((n, k), np.inf)
        valid = np.flatnonzero(np.isfinite(probes).all(axis=1))
        if self.templates and valid.size:
            q = probes[valid]
            count = min(self.templates, k * self._max_per_person * CANDIDATE_HEADROOM)
            candidates = self._candidates(q, count)
            labels, dist = _nearest_identities(self._labels[candidates], self._rerank(q, candidates), k)
            person_ids[valid] = self._person_ids[labels]  # label -1 (padding) -> None
            distances[valid] = dist
        return Matches(person_ids, distances, self.people)

    def distances_to(self, embeddings: ArrayLike, person_ids: Sequence[str | None]) -> NDArray[np.float64]:
        """Exact distances (n, len(person_ids)) of each probe to each named identity's nearest template, whether or
        not a top-k search would list it (float64 differences, as `search` re-ranks); inf for an id the gallery does
        not hold (or None) and for a non-finite probe."""
        probes = np.asarray(embeddings, dtype=np.float64)
        if probes.ndim == 1:
            probes = probes[None, :]
        if probes.ndim != 2 or probes.shape[1] != self.dim:
            raise GalleryIndexError(f"probes must be (n, {self.dim}), got shape {probes.shape}")
        out = np.full((probes.shape[0], len(person_ids)), np.inf)
        valid = np.flatnonzero(np.isfinite(probes).all(axis=1))
        if valid.size == 0:
            return out
        q = probes[valid]
        for j, person_id in enumerate(person_ids):
            rows = self._rows.get(person_id) if person_id is not None else None
            if rows is None or rows.size == 0:
                continue
            diff = self._vectors[rows].astype(np.float64)[None, :, :] - q[:, None, :]
            out[valid, j] = np.linalg.norm(diff, axis=2).min(axis=1)
        return out

    def _candidates(self, q: NDArray[np.float32], count: int) -> NDArray[np.intp]:
        if self._stage is not None:
            return self._stage.knn(q, count)
        if count >= self.templates:
            return np.broadcast_to(np.arange(self.templates), (q.shape[0], self.templates))
        # |q|² is the same for a whole row, so it does not change the order. einsum, not `q @ V.T`: numpy's BLAS
        # spreads one probe's product over its thread pool, which on a busy edge (cameras, inference) costs ten
        # times the work itself (a probe against 50k templates on a loaded 2-core x86: 16-20 ms against 1-2 ms);
        # einsum's own loop stays on this thread and is as fast for the few probes a door asks at once
        approx = self._sqnorms[None, :] - 2.0 * np.einsum("kj,ij->ki", q, self._vectors)
        return np.argpartition(approx, count - 1, axis=1)[:, :count]

    def _rerank(self, q: NDArray[np.float32], candidates: NDArray[np.intp]) -> NDArray[np.float64]:
        n, count = candidates.shape
        out = np.empty((n, count))
        q64 = q.astype(np.float64)
        step = max(1, _RERANK_ELEMENTS // max(1, count * self.dim))
        for s in range(0, n, step):
            diff = self._vectors[candidates[s : s + step]].astype(np.float64) - q64[s : s + step, None, :]
            out[s : s + step] = np.linalg.norm(diff, axis=2)
        return out


def _nearest_identities(
    labels: NDArray[np.intp], distances: NDArray[np.float64], k: int
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Per row, the k nearest distinct labels (each at its nearest template's distance); -1 / inf pad."""
    n, count = distances.shape
    order = np.argsort(distances, axis=1, kind="stable")
    dist = np.take_along_axis(distances, order, axis=1)
    lab = np.take_along_axis(labels, order, axis=1)
    # rows are sorted by distance, so the first occurrence of (row, label) is that identity's nearest template
    key = lab.astype(np.int64) + np.arange(n, dtype=np.int64)[:, None] * (int(lab.max()) + 1)
    first = np.zeros(n * count, dtype=bool)
    first[np.unique(key.ravel(), return_index=True)[1]] = True
    first = first.reshape(n, count)
    rank = np.cumsum(first, axis=1) - 1
    rows, cols = np.nonzero(first & (rank < k))
    out_labels = np.full((n, k), -1, dtype=np.intp)
    out_dist = np.full((n, k), np.inf)
    out_labels[rows, rank[rows, cols]] = lab[rows, cols]
    out_dist[rows, rank[rows, cols]] = dist[rows, cols]
    return out_labels, out_dist


class IndexHolder:
    """The index in service. A reader takes `current` once per batch and uses that reference throughout: no lock on
    the read path, and a swap is one reference assignment (atomic), so a batch sees the old or the new gallery,
    never a mix. None until a first gallery is loaded (every face is then unknown)."""

    def __init__(self, index: GalleryIndex | None = None) -> None:
        self._index = index
        self._swap_lock = threading.Lock()  # writers only: makes swap's returned "old" exact with several writers

    @property
    def current(self) -> GalleryIndex | None:
        return self._index

    def swap(self, new: GalleryIndex) -> GalleryIndex | None:
        with self._swap_lock:
            old, self._index = self._index, new
        return old

    def replace(self, expected: GalleryIndex, new: GalleryIndex) -> bool:
        """Swap in `new` only while `expected` is in service (a background upgrade must not undo a newer gallery)."""
        with self._swap_lock:
            if self._index is not expected:
                return False
            self._index = new
        return True


class GalleryStore:
    """The edge's last good gallery on disk (see the module docstring): `save` after applying a verified
    publication, `load` at start-up."""

    def __init__(self, directory: Path | str, verifier: Verifier, fingerprint: str, site: str) -> None:
        self._dir = Path(directory)
        self._verifier = verifier
        self._fingerprint = fingerprint
        self._site = topics.validate_id(site, "site")

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def path(self) -> Path:
        return self._dir / SAVED_FILE

    def save(self, manifest: bytes, blob: bytes) -> None:
        """Atomically replace the saved gallery with this publication (manifest bytes as signed, the whole blob)."""
        if len(manifest) > limits.MAX_MANIFEST_BYTES:
            raise GalleryStoreError(f"manifest of {len(manifest)} bytes exceeds {limits.MAX_MANIFEST_BYTES}")
        header = _FILE_HEADER.pack(_FILE_MAGIC, _FILE_FORMAT, len(manifest))
        try:
            atomic_write_bytes(self.path, header + manifest + blob)
            fsync_dir(self._dir)  # the rename itself must survive a power cut, or the old file comes back
        except OSError as exc:
            raise GalleryStoreError(f"cannot save the gallery to {self.path}: {exc}") from exc
        log.info("gallery saved to %s (%d bytes)", self.path, _FILE_HEADER.size + len(manifest) + len(blob))

    def load(self) -> Gallery | None:
        """The saved gallery (see `load_publication`)."""
        publication = self.load_publication()
        return None if publication is None else publication.gallery

    def load_publication(self) -> Verified | None:
        """The saved publication, verified again; None when there is none. A file that fails verification is
        deleted and GalleryStoreError raised (its cause: SignatureError, IntegrityError, FingerprintMismatchError,
        ...)."""
        self._remove_leftovers()
        try:
            with self.path.open("rb") as fh:
                data = fh.read(_MAX_FILE_BYTES + 1)  # bounded: a planted huge file cannot exhaust memory
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise GalleryStoreError(f"cannot read the saved gallery {self.path}: {exc}") from exc
        try:
            publication = self._verify(data)
        except ContractError as exc:
            self.remove()
            raise GalleryStoreError(
                f"saved gallery {self.path} refused and deleted: {type(exc).__name__}: {exc}"
            ) from exc
        log.info(
            "saved gallery %s of site %s loaded and verified (%d people)",
            release_text(publication.manifest.release),
            self._site,
            len(publication.gallery.people),
        )
        return publication

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
            fsync_dir(self._dir)
        except OSError as exc:
            raise GalleryStoreError(f"cannot delete the saved gallery {self.path}: {exc}") from exc

    def _verify(self, data: bytes) -> Verified:
        """The same checks as a download, by feeding a fresh assembler the manifest and the blob's chunks."""
        if not _FILE_HEADER.size <= len(data) <= _MAX_FILE_BYTES:
            raise GalleryFormatError(f"{len(data)} bytes: not the size of a saved gallery")
        magic, fmt, manifest_len = _FILE_HEADER.unpack_from(data)
        if magic != _FILE_MAGIC or fmt != _FILE_FORMAT:
            raise GalleryFormatError(f"not a saved gallery of format {_FILE_FORMAT} (magic {magic!r}, format {fmt})")
        if manifest_len > limits.MAX_MANIFEST_BYTES or _FILE_HEADER.size + manifest_len > len(data):
            raise GalleryFormatError(f"manifest length {manifest_len} does not fit the {len(data)} byte file")
        manifest = data[_FILE_HEADER.size : _FILE_HEADER.size + manifest_len]
        blob = data[_FILE_HEADER.size + manifest_len :]
        # parsed here only for the chunk layout; the assembler verifies these very bytes before using them
        layout = GalleryManifest.from_json(manifest)
        if len(blob) != layout.blob_size:
            raise GalleryFormatError(f"blob of {len(blob)} bytes, the manifest announces {layout.blob_size}")
        assembler = GalleryAssembler(self._verifier, self._fingerprint, self._site)
        gallery = assembler.feed(topics.gallery_manifest(self._site), manifest)
        for i in range(layout.chunk_count):
            start = i * layout.chunk_size
            gallery = assembler.feed(topics.gallery_blob(self._site, i), blob[start : start + layout.chunk_size])
        if gallery is None or assembler.completed is None:
            # every chunk was fed: only a manifest disagreeing with its own layout gets here
            raise GalleryFormatError("the saved blob did not complete its manifest")
        return assembler.completed

    def _remove_leftovers(self) -> None:
        # temp files of a write cut short (kill -9, power loss) may hold vectors of people removed since
        for leftover in self._dir.glob(f"{SAVED_FILE}.*.tmp"):
            try:
                leftover.unlink()
                log.info("removed leftover %s of an interrupted save", leftover)
            except OSError as exc:
                log.warning("cannot remove leftover %s: %s", leftover, exc)
