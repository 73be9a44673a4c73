"""The approximate first stage of large galleries: an hnswlib graph, built off the inference path, kept on disk.

Exact search costs time linear in the gallery (about 1-2 ms a probe at 50k templates on a 2-core x86, 5-15 ms at
200k: it reads every vector), hnswlib well under a millisecond whatever the size; but building the graph takes
12-15 s of a core at 50k and about a minute at 200k. So nothing waits for it: a new gallery goes into service at
once with exact search (edge_agent.gallery.sync), and for galleries above `IndexParams.exact_max_templates` the
`AnnBuilder` thread loads or builds the graph and swaps in the same index with it (`IndexHolder.replace`: only if
that index is still the one in service). The exact re-rank keeps every reported distance exact either way.

On disk, beside the saved gallery: `gallery.hnsw` (hnswlib's own format) and `gallery.hnsw.json`, which names the
blob sha256 the graph was built from, the build parameters, the template count and dimension, and the sha256 of
the graph file. The graph is loaded only when all of them match the gallery in service and the file hashes right:
hnswlib trusts what it reads, so a torn, truncated or foreign file is rebuilt, never loaded. It is derived data
(deleting it costs one rebuild) and is deleted with the gallery it was built from, since it holds that gallery's
vectors (`AnnFiles.keep_only`, on the builder's thread right after the next publication went into service): a
removed person leaves the disk with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np
from numpy.typing import NDArray

from edge_agent.gallery.index import CandidateStage, GalleryIndex, IndexHolder, IndexParams
from models.cache import atomic_write_bytes
from models.contract.gallery import release_text
from models.errors import GalleryIndexError

log = logging.getLogger(__name__)

GRAPH_FILE = "gallery.hnsw"
SIDECAR_FILE = "gallery.hnsw.json"
_SIDECAR_FORMAT = 1
SPACE = "l2"  # squared Euclidean: orders candidates as the Euclidean distance does; the re-rank is exact anyway
_ADD_SLICE = 2048  # items per add_items call: a build can be abandoned between slices
_HASH_BLOCK = 4 << 20


class HnswStage(CandidateStage):
    """hnswlib over an index's vectors (row i = label i)."""

    def __init__(self, graph: hnswlib.Index, params: IndexParams) -> None:
        self._graph = graph
        self.description = f"hnswlib M={params.m} ef_construction={params.ef_construction} ef={params.ef}"

    @classmethod
    def build(
        cls, vectors: NDArray[np.float32], params: IndexParams, stop: threading.Event | None = None
    ) -> HnswStage | None:
        """The graph over `vectors`, or None when `stop` was set meanwhile. Deterministic with one build thread:
        items go in row order, slice by slice, exactly as one add_items call would insert them."""
        count, dim = vectors.shape
        graph = hnswlib.Index(space=SPACE, dim=dim)
        try:
            graph.init_index(
                max_elements=max(1, count), M=params.m, ef_construction=params.ef_construction, random_seed=params.seed
            )
            for start in range(0, count, _ADD_SLICE):
                if stop is not None and stop.is_set():
                    return None
                end = min(count, start + _ADD_SLICE)
                graph.add_items(vectors[start:end], np.arange(start, end), num_threads=params.build_threads)
        except (RuntimeError, MemoryError) as exc:
            raise GalleryIndexError(f"hnswlib build over {count} templates failed: {exc}") from exc
        graph.set_ef(params.ef)  # a search setting, not saved with the graph
        return cls(graph, params)

    def knn(self, q: NDArray[np.float32], count: int) -> NDArray[np.intp]:
        try:
            # one thread: batches are a few faces, and hnswlib would start a thread pool per call; hnswlib
            # searches with max(ef, count), so the ef set at build needs no change here
            found, _ = self._graph.knn_query(q, k=count, num_threads=1)
        except RuntimeError as exc:
            raise GalleryIndexError(f"hnswlib search failed: {exc}") from exc
        return found.astype(np.intp)

    def save(self, path: Path) -> None:
        self._graph.save_index(str(path))

    @classmethod
    def load(cls, path: Path, params: IndexParams, count: int, dim: int) -> HnswStage:
        graph = hnswlib.Index(space=SPACE, dim=dim)
        try:
            graph.load_index(str(path), max_elements=max(1, count))
        except (RuntimeError, MemoryError) as exc:
            raise GalleryIndexError(f"hnswlib cannot load {path}: {exc}") from exc
        if graph.get_current_count() != count:
            raise GalleryIndexError(f"{path} holds {graph.get_current_count()} templates, the gallery {count}")
        graph.set_ef(params.ef)
        return cls(graph, params)


@dataclass(frozen=True)
class _Key:
    """What a saved graph must have been built from to be used."""

    blob_sha256: str
    templates: int
    dim: int
    m: int
    ef_construction: int
    seed: int

    @classmethod
    def of(cls, blob_sha256: str, index: GalleryIndex, params: IndexParams) -> _Key:
        return cls(blob_sha256, index.templates, index.dim, params.m, params.ef_construction, params.seed)


class AnnFiles:
    """The saved graph of one gallery directory."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self.graph = directory / GRAPH_FILE
        self.sidecar = directory / SIDECAR_FILE

    def keep_only(self, blob_sha256: str | None) -> None:
        """Delete the graph unless it was built from `blob_sha256` (it holds its gallery's vectors), and any
        leftover of an interrupted save."""
        leftovers = [*self._dir.glob(f"{GRAPH_FILE}.*.tmp"), *self._dir.glob(f"{SIDECAR_FILE}.*.tmp")]
        stale = blob_sha256 is None or self._read_sidecar().get("blob_sha256") != blob_sha256
        for path in [*leftovers, *((self.sidecar, self.graph) if stale else ())]:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot delete %s: %s", path, exc)

    def load(self, key: _Key, params: IndexParams) -> HnswStage | None:
        """The saved graph when it was built from `key` and its file hashes right, else None (and it is deleted)."""
        sidecar = self._read_sidecar()
        if not sidecar:
            return None
        expected = {"format": _SIDECAR_FORMAT, **key.__dict__}
        if {k: sidecar.get(k) for k in expected} != expected:
            log.info("saved hnswlib graph %s was built from another gallery or with other parameters", self.graph)
            self.keep_only(None)
            return None
        try:
            digest = _sha256_file(self.graph)
        except OSError as exc:
            log.warning("saved hnswlib graph %s unreadable (%s): rebuilding it", self.graph, exc)
            self.keep_only(None)
            return None
        if digest != sidecar.get("sha256"):
            log.warning("saved hnswlib graph %s does not match its recorded sha256: rebuilding it", self.graph)
            self.keep_only(None)
            return None
        return HnswStage.load(self.graph, params, key.templates, key.dim)

    def save(self, stage: HnswStage, key: _Key) -> None:
        """Graph first, then the sidecar naming its sha256: the sidecar is the commit point."""
        tmp = self._dir / f"{GRAPH_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self.sidecar.unlink(missing_ok=True)  # no sidecar ever names a graph being replaced
            stage.save(tmp)
            digest = _sha256_file(tmp)
            os.replace(tmp, self.graph)
            record = {"format": _SIDECAR_FORMAT, **key.__dict__, "sha256": digest}
            atomic_write_bytes(self.sidecar, json.dumps(record, sort_keys=True).encode())
        except OSError as exc:
            log.warning("hnswlib graph not saved to %s (%s): it is rebuilt at the next start", self.graph, exc)
        finally:
            tmp.unlink(missing_ok=True)

    def _read_sidecar(self) -> dict:
        try:
            data = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class AnnStatus:
    state: str  # "exact" (no graph wanted), "loading", "building", "hnswlib", "failed"
    seconds: float | None  # the last load or build


class AnnBuilder:
    """One background thread that keeps the hnswlib stage in step with the gallery in service: `use(index, sha)`
    after every swap. For a big gallery it loads the saved graph or builds (and saves) it, then swaps the same
    index with it in; in every case it first deletes a saved graph of another gallery. All file work happens on
    this one thread, in submission order, so an abandoned build can never leave its graph behind a newer gallery.
    A newer submission abandons a build in hand between two of its slices."""

    def __init__(self, holder: IndexHolder, directory: Path, params: IndexParams) -> None:
        self._holder = holder
        self._files = AnnFiles(directory)
        self._params = params
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._job: tuple[GalleryIndex | None, str | None] | None = None
        self._cancel = threading.Event()  # set to abandon the job in hand
        self._closed = False
        self._idle = True
        self._status = AnnStatus("exact", None)
        self._thread: threading.Thread | None = None

    def use(self, index: GalleryIndex, blob_sha256: str) -> None:
        """`index` (exact) went into service: give it its graph if it is big enough, and forget other graphs."""
        self._submit(index, blob_sha256)

    def use_nothing(self) -> None:
        """No gallery is in service: forget every saved graph."""
        self._submit(None, None)

    def _submit(self, index: GalleryIndex | None, blob_sha256: str | None) -> None:
        wanted = index is not None and index.templates > self._params.exact_max_templates
        with self._lock:
            if self._closed:
                return
            self._cancel.set()
            self._job = (index, blob_sha256)
            self._idle = False
            self._status = AnnStatus("loading" if wanted else "exact", None)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="faceattend-gallery-ann", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def status(self) -> AnnStatus:
        with self._lock:
            return self._status

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once every job submitted so far is done (for tests and benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._idle:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining)
        return True

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._closed = True
            self._cancel.set()
            self._job = None
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        _lower_priority()
        while True:
            with self._lock:
                while self._job is None and not self._closed:
                    self._idle = True
                    self._wake.notify_all()
                    self._wake.wait()
                if self._closed:
                    self._idle = True
                    self._wake.notify_all()
                    return
                job, self._job = self._job, None
                self._cancel.clear()
            if job is None:  # for the type checker: the loop above leaves only with a job
                continue
            try:
                self._serve(*job)
            except Exception:
                # a bug or an hnswlib failure must not end the thread: exact search keeps serving
                log.exception("gallery hnswlib stage failed; exact search keeps serving")
                self._set_status(AnnStatus("failed", None))

    def _serve(self, index: GalleryIndex | None, blob_sha256: str | None) -> None:
        self._files.keep_only(blob_sha256)  # another gallery's graph holds vectors of people perhaps removed
        if index is None or blob_sha256 is None or index.templates <= self._params.exact_max_templates:
            return
        key = _Key.of(blob_sha256, index, self._params)
        started = time.perf_counter()
        stage = self._files.load(key, self._params)
        how = "loaded"
        if stage is None:
            self._set_status(AnnStatus("building", None))
            stage = HnswStage.build(index.vectors, self._params, self._cancel)
            if stage is None:
                log.info("gallery %s hnswlib build abandoned: a newer gallery came", release_text(index.release))
                return
            how = "built"
            self._files.save(stage, key)  # even when superseded meanwhile: the next job deletes it on this thread
        seconds = time.perf_counter() - started
        if self._holder.replace(index, index.with_stage(stage, seconds)):
            self._set_status(AnnStatus("hnswlib", seconds))
            log.info(
                "gallery %s: %s %s in %.2f s; it picks the candidates from now on (%d templates)",
                release_text(index.release),
                stage.description,
                how,
                seconds,
                index.templates,
            )
        else:
            log.info("gallery %s hnswlib stage %s, but a newer gallery is in service", release_text(index.release), how)

    def _set_status(self, status: AnnStatus) -> None:
        with self._lock:
            if not self._cancel.is_set():
                self._status = status


def _lower_priority() -> None:
    # Linux schedules threads as tasks: a nice value on this thread's id leaves the cameras' threads first in line
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError) as exc:
        log.debug("gallery hnswlib thread keeps its priority: %s", exc)
