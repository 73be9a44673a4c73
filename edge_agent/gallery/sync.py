"""Keep an edge's gallery in step with its site's retained publication, and acknowledge each version to the server.

Fetching, driven by the manifest. The edge holds one subscription, to its site's manifest (retained: delivered
at every (re)subscribe). A verified manifest newer than the release in service starts an assembly, and only then
does the edge subscribe to the site's chunks (`.../gallery/blob/+`): the broker sends their retained copies, which
the server published before the manifest, so they are this manifest's. When chunks stay missing (dropped by the
bounded queue, evicted from the assembler's pool, a tampered one that never matched) the edge asks for exactly
those again, by subscribing to each missing chunk's topic, a batch that fits the queue at a time, backing off from
`chunk_retry_s` when nothing new arrives. Once the assembly completes or fails it unsubscribes from the chunks:
an edge in step downloads a manifest per reconnect, not the whole gallery. So a gallery of any size the contract
allows completes whatever gets lost on the way, with memory bounded by the queue and the assembly itself.

Threads: the MQTT network thread only enqueues (topic, payload); one worker thread feeds the `GalleryAssembler`
(signature, release order, sha256, fingerprint, blob structure), and for a complete gallery newer than the one in
service builds its exact `GalleryIndex` (milliseconds), saves the publication (`GalleryStore`), swaps the index
into the `IndexHolder` and publishes a `GalleryAck` (QoS 1) on `faceattend/v1/edge/{device}/gallery/ack`; then the
`AnnBuilder` thread gives a big gallery its hnswlib stage in the background. The inference thread never waits.

A refused update (forged or foreign-key manifest, a release older than the one in service, tampered chunk, other
encoder fingerprint, malformed blob) is logged at WARNING and acknowledged as an error naming the release (the
manifest's claim when it could not be verified; no ack when no version can be told) and the reason; the previous
gallery stays in service and the worker goes on. Identical consecutive error acks are sent once, so a forged or
stale retained manifest replayed at every reconnect, or a flood of bad messages, does not become a flood of acks.

Memory is bounded against hostile input: a message larger than any valid one is dropped, the queue is bounded in
bytes (`queue_bytes`), and the assembler bounds its chunk pool. A dropped manifest is fetched again by
re-subscribing to the manifest topic once the queue has drained (at most once per `resync_interval_s`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.gallery.ann import AnnBuilder
from edge_agent.gallery.index import GalleryIndex, GalleryStore, IndexHolder, IndexParams
from models.contract import limits, timestamps, topics
from models.contract.assembler import DEFAULT_POOL_CAP_BYTES, GalleryAssembler, Verified
from models.contract.gallery import GalleryManifest, encode_blob, release_text
from models.contract.mqtt_link import InboundMessage, MqttLink
from models.contract.signing import Verifier
from models.contract.status import GalleryAck
from models.errors import ConfigError, ContractError, FaceAttendError, GalleryIndexError, GalleryStoreError

log = logging.getLogger(__name__)

DEFAULT_QUEUE_BYTES = 64 * limits.MIB  # a whole 10k x 5 float32 publication (26 MB) with room for a replay
DEFAULT_RESYNC_INTERVAL_S = 5.0
DEFAULT_CHUNK_RETRY_S = 2.0  # no new chunk for this long: ask again for the missing ones (doubling, up to the max)
MAX_CHUNK_RETRY_S = 60.0
# no valid gallery message is larger (a chunk is at most MAX_CHUNK_SIZE, a manifest at most MAX_MANIFEST_BYTES)
_MAX_MESSAGE_BYTES = max(limits.MAX_CHUNK_SIZE, limits.MAX_MANIFEST_BYTES)
_ITEM_OVERHEAD = 256  # bytes charged per queued message besides payload and topic: empty payloads are not free
_TICK_S = 0.25  # how often the worker looks at a fetch in progress


@dataclass(frozen=True)
class SyncStatus:
    version: int | None  # in service; None before any gallery
    people: int
    templates: int
    last_error: str | None
    last_applied_at: str | None  # UTC ISO-8601
    pending_version: int | None  # a verified manifest whose chunks are still arriving
    dropped_messages: int  # dropped because the queue was full or the message oversized
    epoch: int | None = None  # of `version`
    missing_chunks: int = 0  # of the pending manifest
    chunk_requests: int = 0  # times missing chunks were asked for again
    search: str = "exact"  # stage 1 of the index in service: exact, or hnswlib (loading / building meanwhile)


class GallerySync:
    def __init__(
        self,
        link: MqttLink,
        site: str,
        device_id: str,
        verifier: Verifier,
        fingerprint: str,
        holder: IndexHolder,
        store_dir: Path | str,
        on_applied: Callable[[GalleryIndex], None] | None = None,
        *,
        params: IndexParams | None = None,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        resync_interval_s: float = DEFAULT_RESYNC_INTERVAL_S,
        chunk_retry_s: float = DEFAULT_CHUNK_RETRY_S,
        pool_cap_bytes: int = DEFAULT_POOL_CAP_BYTES,
    ) -> None:
        """`on_applied(index)` runs on the worker thread after each version is swapped in, saved and acknowledged.
        `fingerprint`: this edge's encoder fingerprint; galleries built under another are refused."""
        if queue_bytes < _MAX_MESSAGE_BYTES + _ITEM_OVERHEAD:
            raise ConfigError(f"gallery sync: queue_bytes must hold the largest message ({_MAX_MESSAGE_BYTES} bytes)")
        if resync_interval_s <= 0 or chunk_retry_s <= 0:
            raise ConfigError("gallery sync: resync_interval_s and chunk_retry_s must be positive")
        self._link = link
        self._site = topics.validate_id(site, "site")
        self._device = topics.validate_id(device_id, "device")
        self._verifier = verifier
        self._fingerprint = fingerprint
        self._holder = holder
        self._store = GalleryStore(store_dir, verifier, fingerprint, site)
        self._on_applied = on_applied
        self._params = params or IndexParams()
        self._ann = AnnBuilder(holder, self._store.directory, self._params)
        self._queue_cap = queue_bytes
        self._resync_interval_s = resync_interval_s
        self._chunk_retry_s = chunk_retry_s
        self._pool_cap = pool_cap_bytes
        self._manifest_topic = topics.gallery_manifest(site)
        self._chunks_filter = topics.site_gallery_chunks(site)
        self._ack_topic = topics.gallery_ack(device_id)

        self._queue: queue.SimpleQueue[tuple[str, bytes, int] | None] = queue.SimpleQueue()
        self._queue_lock = threading.Lock()  # guards the three fields below (network thread and worker)
        self._queued_bytes = 0
        self._dropped = 0
        self._resync_wanted = False

        self._status_lock = threading.Lock()  # guards the status fields below (worker writes, anyone reads)
        self._last_error: str | None = None
        self._last_applied_at: str | None = None
        self._pending_version: int | None = None
        self._missing = 0
        self._chunk_requests = 0

        # worker-thread state
        self._assembler: GalleryAssembler | None = None
        self._in_service: Verified | None = None  # the publication this sync put in service
        self._last_error_ack: tuple[tuple[int, int], str] | None = None
        self._last_resync = 0.0
        self._fetching: tuple[int, int] | None = None  # the release whose chunks are subscribed to
        self._all_chunks = False  # the chunks filter is held
        self._singles: set[int] = set()  # chunk topics asked for one by one
        self._progress_at = 0.0  # last time a chunk of the pending manifest arrived (or was asked for)
        self._retry_s = chunk_retry_s
        self._worker: threading.Thread | None = None
        self._stopping: threading.Event | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        """Put the saved gallery in service (if any, and none is yet), then start the worker and subscribe. Returns
        once the saved gallery serves; does nothing while running. After a stop() that timed out, it first waits
        for the previous worker to finish its message."""
        if self._stopping is not None and not self._stopping.is_set():
            return
        if self._worker is not None:
            self._worker.join()
        self._ann = AnnBuilder(self._holder, self._store.directory, self._params)  # a stopped one is done for
        if self._holder.current is None:
            self._in_service = self._load_saved()
        elif self._in_service is not None:
            self._ann.use(self._holder.current, self._in_service.manifest.blob_sha256)
        self._assembler = GalleryAssembler(
            self._verifier, self._fingerprint, self._site, current=self._in_service, pool_cap_bytes=self._pool_cap
        )
        self._stopping = threading.Event()
        self._worker = threading.Thread(
            target=self._run, args=(self._stopping,), name=f"faceattend-gallery-sync-{self._site}", daemon=True
        )
        self._worker.start()
        # remembered by the link, re-made on reconnect; chunks are subscribed to only while a manifest needs them
        self._link.subscribe(self._manifest_topic, 1, self._on_message)

    def stop(self, timeout: float | None = None) -> None:
        """Unsubscribe and end the worker once the message in hand is done, and the background graph builder."""
        if self._stopping is None or self._stopping.is_set() or self._worker is None:
            return
        self._stopping.set()
        self._link.unsubscribe(self._manifest_topic)
        self._queue.put(None)  # wakes the worker
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.warning("gallery sync worker still busy after %s s; it stops after its current message", timeout)
        self._ann.stop(timeout)

    def wait_search_ready(self, timeout: float | None = None) -> bool:
        """True once the background work on the gallery in service (its hnswlib stage) is done."""
        return self._ann.wait_idle(timeout)

    def status(self) -> SyncStatus:
        index = self._holder.current
        with self._queue_lock:
            dropped = self._dropped
        ann = self._ann.status()
        with self._status_lock:
            return SyncStatus(
                version=index.version if index is not None else None,
                people=index.people if index is not None else 0,
                templates=index.templates if index is not None else 0,
                last_error=self._last_error,
                last_applied_at=self._last_applied_at,
                pending_version=self._pending_version,
                dropped_messages=dropped,
                epoch=index.epoch if index is not None else None,
                missing_chunks=self._missing,
                chunk_requests=self._chunk_requests,
                search="exact" if index is None or (index.exact and ann.state == "exact") else ann.state,
            )

    # ---- network thread ----

    def _on_message(self, msg: InboundMessage) -> None:
        """Enqueue only: everything else happens on the worker."""
        size = len(msg.payload)
        if size > _MAX_MESSAGE_BYTES:
            with self._queue_lock:
                self._dropped += 1
            log.warning("gallery message on %s dropped: %d bytes, larger than any valid one", msg.topic, size)
            return
        cost = size + len(msg.topic) + _ITEM_OVERHEAD
        with self._queue_lock:
            fits = self._queued_bytes + cost <= self._queue_cap
            if fits:
                self._queued_bytes += cost
                self._queue.put((msg.topic, msg.payload, cost))
                return
            self._dropped += 1
            first_of_burst = not self._resync_wanted
            self._resync_wanted = True
        log.log(
            logging.WARNING if first_of_burst else logging.DEBUG,
            "gallery queue full (%d bytes): message on %s dropped; it is asked for again later",
            self._queue_cap,
            msg.topic,
        )

    # ---- worker thread ----

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            timeout = _TICK_S if self._fetching is not None else self._resync_interval_s
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is not None:
                topic, payload, cost = item
                with self._queue_lock:
                    self._queued_bytes -= cost
                try:
                    self._handle(topic, payload)
                except Exception:
                    # a bug on one message must not end gallery updates for the life of the agent
                    log.exception("gallery sync: unexpected failure on %s; going on", topic)
            try:
                self._maybe_ask_again()
                self._maybe_resync()
            except FaceAttendError as exc:
                log.warning("gallery sync: cannot (un)subscribe now: %s", exc)

    def _handle(self, topic: str, payload: bytes) -> None:
        assembler = self._assembler
        if assembler is None:  # set by start() before the worker exists; kept for the type checker
            return
        is_manifest = topic == self._manifest_topic
        pending = assembler.pending
        received = assembler.received_chunks
        try:
            gallery = assembler.feed(topic, payload)
        except ContractError as exc:
            self._refused(_claimed_release(payload) if is_manifest else (pending.release if pending else None), exc)
            gallery = None
        if assembler.received_chunks > received or assembler.pending is not pending:
            self._progress()
        if gallery is not None and assembler.completed is not None:
            self._apply(assembler.completed)
        self._follow_pending()

    # ---- fetching chunks ----

    def _follow_pending(self) -> None:
        """Hold the chunk subscriptions the pending manifest needs, and none without one."""
        assembler = self._assembler
        pending = assembler.pending if assembler is not None else None
        missing = assembler.missing_chunks() if assembler is not None else []
        with self._status_lock:
            self._pending_version = pending.version if pending is not None else None
            self._missing = len(missing)
        if pending is None:
            if self._fetching is not None:
                self._unsubscribe_chunks()
                self._fetching = None
            return
        if self._fetching != pending.release:
            # a new manifest: its chunks, published before it, are retained; subscribing fetches them all
            self._unsubscribe_singles()
            if not self._all_chunks:
                self._link.subscribe(self._chunks_filter, 1, self._on_message)
                self._all_chunks = True
            self._fetching = pending.release
            self._progress()
            log.info(
                "gallery %s: fetching %d chunks (%d already at hand)",
                release_text(pending.release),
                pending.chunk_count,
                pending.chunk_count - len(missing),
            )
        elif self._singles and not self._singles.intersection(missing) and missing:
            self._ask_again(missing)  # the batch asked for is in: the next one at once

    def _progress(self) -> None:
        self._progress_at = time.monotonic()
        self._retry_s = self._chunk_retry_s

    def _maybe_ask_again(self) -> None:
        if self._fetching is None or time.monotonic() - self._progress_at < self._retry_s:
            return
        with self._queue_lock:
            if self._queued_bytes:  # what is queued may hold them
                return
        missing = self._assembler.missing_chunks() if self._assembler is not None else []
        if missing:
            self._ask_again(missing)
            self._progress_at = time.monotonic()
            self._retry_s = min(self._retry_s * 2, MAX_CHUNK_RETRY_S)

    def _ask_again(self, missing: list[int]) -> None:
        """Subscribe to the topics of (a queue's worth of) the missing chunks: the broker sends their retained
        copies. Re-subscribing to a topic held already makes it send them again."""
        pending = self._assembler.pending if self._assembler is not None else None
        if pending is None:
            return
        budget = max(1, (self._queue_cap // 2) // (pending.chunk_size + _ITEM_OVERHEAD))
        batch = missing[:budget]
        if self._all_chunks:
            self._link.unsubscribe(self._chunks_filter)
            self._all_chunks = False
        for index in self._singles - set(batch):
            self._link.unsubscribe(topics.gallery_blob(self._site, index))
        for index in batch:
            self._link.subscribe(topics.gallery_blob(self._site, index), 1, self._on_message)
        self._singles = set(batch)
        with self._status_lock:
            self._chunk_requests += 1
        log.info(
            "gallery %s: asking the broker again for %d of %d missing chunks",
            release_text(pending.release),
            len(batch),
            len(missing),
        )

    def _unsubscribe_singles(self) -> None:
        for index in self._singles:
            self._link.unsubscribe(topics.gallery_blob(self._site, index))
        self._singles = set()

    def _unsubscribe_chunks(self) -> None:
        self._unsubscribe_singles()
        if self._all_chunks:
            self._link.unsubscribe(self._chunks_filter)
            self._all_chunks = False

    # ---- applying ----

    def _apply(self, publication: Verified) -> None:
        gallery = publication.gallery
        started = time.perf_counter()
        try:
            index = GalleryIndex.build(gallery)
        except GalleryIndexError as exc:
            self._refused(gallery.release, exc)
            return
        built = time.perf_counter()
        # on disk before in service: a crash between the two must never leave an older saved gallery (which may
        # hold people this version removed) behind a version that was already reported as applied
        self._save(publication)
        saved = time.perf_counter()
        old = self._holder.swap(index)
        self._in_service = publication
        self._ann.use(index, publication.manifest.blob_sha256)
        with self._status_lock:
            self._last_applied_at = timestamps.utc_now()
        self._last_error_ack = None  # after a good version, a recurring refusal is news again
        self._ack(gallery.release, None)
        log.info(
            "gallery %s in service (%d people, %d templates; %s before): index %.3f s, saved in %.2f s",
            release_text(gallery.release),
            index.people,
            index.templates,
            release_text(old.release) if old is not None else "none",
            built - started,
            saved - built,
        )
        if self._on_applied is not None:
            try:
                self._on_applied(index)
            except Exception:
                log.exception("gallery sync: on_applied callback failed for v%d", gallery.version)

    def _save(self, publication: Verified) -> None:
        blob = encode_blob(publication.gallery)  # byte for byte the received blob: one encoding per gallery
        try:
            self._store.save(publication.manifest_bytes, blob)
        except GalleryStoreError as exc:
            # the previous file may hold people this version removed: it must not outlive the failure
            version = publication.manifest.version
            log.error("gallery v%d applied but not saved (%s); deleting the older saved gallery", version, exc)
            self._set_error(f"v{version} not saved: {exc}")
            try:
                self._store.remove()
            except GalleryStoreError as removal:
                log.error("%s", removal)

    def _load_saved(self) -> Verified | None:
        try:
            publication = self._store.load_publication()
            if publication is None:
                log.info("no saved gallery for site %s: waiting for the broker's", self._site)
                self._ann.use_nothing()
                return None
            index = GalleryIndex.build(publication.gallery)
        except (GalleryStoreError, GalleryIndexError) as exc:
            # start empty: the broker's retained gallery fills the index once it is reachable
            log.error("saved gallery not used: %s", exc)
            self._set_error(str(exc))
            self._ann.use_nothing()
            return None
        self._holder.swap(index)
        self._ann.use(index, publication.manifest.blob_sha256)
        return publication

    # ---- refusals and acks ----

    def _refused(self, release: tuple[int, int] | None, exc: FaceAttendError) -> None:
        reason = f"{type(exc).__name__}: {exc}"[: limits.MAX_ERROR_CHARS]
        current = self._holder.current
        log.warning(
            "gallery update%s refused, %s stays in service: %s",
            f" {release_text(release)}" if release is not None else "",
            release_text(current.release) if current is not None else "no gallery",
            reason,
        )
        self._set_error(reason)
        if release is None:
            return  # an ack must name a version; the log line is all there is
        if self._last_error_ack == (release, reason):
            return
        self._last_error_ack = (release, reason)
        self._ack(release, reason)

    def _ack(self, release: tuple[int, int], error: str | None) -> None:
        epoch, version = release
        ack = GalleryAck(
            device_id=self._device,
            site=self._site,
            version=version,
            status="error" if error else "ok",
            error=error,
            ts=timestamps.utc_now(),
            epoch=epoch,
        )
        try:
            # not awaited: paho keeps a QoS 1 message until its PUBACK and resends it after a reconnect
            self._link.publish(self._ack_topic, ack.to_json(), qos=1)
        except FaceAttendError as exc:
            log.warning("gallery ack for v%d not sent: %s", version, exc)

    def _set_error(self, message: str) -> None:
        with self._status_lock:
            self._last_error = message

    def _maybe_resync(self) -> None:
        now = time.monotonic()
        with self._queue_lock:
            if not self._resync_wanted or self._queued_bytes or now - self._last_resync < self._resync_interval_s:
                return
            self._resync_wanted = False
            dropped = self._dropped
        self._last_resync = now
        log.info("gallery messages were dropped (%d so far): subscribing to the manifest again", dropped)
        # a SUBSCRIBE to a filter already held makes the broker send its retained message again; missing chunks
        # are asked for by the fetch (_maybe_ask_again)
        self._link.subscribe(self._manifest_topic, 1, self._on_message)


def _claimed_release(payload: bytes) -> tuple[int, int] | None:
    """The release a refused manifest claims (it may be forged), for the error ack; None when unreadable."""
    try:
        return GalleryManifest.from_json(payload).release
    except ContractError:
        return None
