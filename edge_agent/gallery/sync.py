"""Keep an edge's gallery in step with its site's retained publication, and acknowledge each version to the server.

Threads: the MQTT network thread only enqueues (topic, payload); one worker thread feeds the `GalleryAssembler`
(signature, sha256, fingerprint, blob structure), and for a complete gallery newer than the one in service builds
its `GalleryIndex`, swaps it into the `IndexHolder`, saves the publication (`GalleryStore`) and publishes a
`GalleryAck` (QoS 1) on `faceattend/v1/edge/{device}/gallery/ack`. The inference thread never waits for any of it.

A refused update (forged or foreign-key manifest, tampered chunk, other encoder fingerprint, malformed blob) is
logged and acknowledged as an error naming the version (the manifest's claim when it could not be verified; no
ack when no version can be told) and the reason; the previous gallery stays in service and the worker goes on.
Identical consecutive error acks are sent once, so a forged retained manifest replayed at every reconnect, or a
flood of bad messages, does not turn into a flood of acks.

Memory is bounded against hostile input: a message larger than any valid one is dropped, the queue is bounded in
bytes (`queue_bytes`), and the assembler bounds its chunk pool. A legitimate message can still be dropped when the
queue is full (a replay arriving while a big index builds); then the worker subscribes again once it has drained
the queue, and the broker replays the retained publication (at most once per `resync_interval_s`).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.gallery.index import GalleryIndex, GalleryStore, IndexHolder, IndexParams
from models.contract import limits, timestamps, topics
from models.contract.assembler import DEFAULT_POOL_CAP_BYTES, GalleryAssembler
from models.contract.gallery import Gallery, GalleryManifest, encode_blob
from models.contract.mqtt_link import InboundMessage, MqttLink
from models.contract.signing import Verifier
from models.contract.status import GalleryAck
from models.errors import ConfigError, ContractError, FaceAttendError, GalleryIndexError, GalleryStoreError

log = logging.getLogger(__name__)

DEFAULT_QUEUE_BYTES = 64 * limits.MIB  # a whole 10k x 5 float32 publication (26 MB) with room for a replay
DEFAULT_RESYNC_INTERVAL_S = 5.0
# no valid gallery message is larger (a chunk is at most MAX_CHUNK_SIZE, a manifest at most MAX_MANIFEST_BYTES)
_MAX_MESSAGE_BYTES = max(limits.MAX_CHUNK_SIZE, limits.MAX_MANIFEST_BYTES)
_ITEM_OVERHEAD = 256  # bytes charged per queued message besides payload and topic: empty payloads are not free
_KEPT_MANIFESTS = 4  # verified manifest payloads kept to save with their gallery; the broker retains only one


@dataclass(frozen=True)
class SyncStatus:
    version: int | None  # in service; None before any gallery
    people: int
    templates: int
    last_error: str | None
    last_applied_at: str | None  # UTC ISO-8601
    pending_version: int | None  # a verified manifest whose chunks are still arriving
    dropped_messages: int  # dropped because the queue was full or the message oversized


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
        pool_cap_bytes: int = DEFAULT_POOL_CAP_BYTES,
    ) -> None:
        """`on_applied(index)` runs on the worker thread after each version is swapped in, saved and acknowledged.
        `fingerprint`: this edge's encoder fingerprint; galleries built under another are refused."""
        if queue_bytes < _MAX_MESSAGE_BYTES + _ITEM_OVERHEAD:
            raise ConfigError(f"gallery sync: queue_bytes must hold the largest message ({_MAX_MESSAGE_BYTES} bytes)")
        if resync_interval_s <= 0:
            raise ConfigError("gallery sync: resync_interval_s must be positive")
        self._link = link
        self._site = topics.validate_id(site, "site")
        self._device = topics.validate_id(device_id, "device")
        self._verifier = verifier
        self._fingerprint = fingerprint
        self._holder = holder
        self._store = GalleryStore(store_dir, verifier, fingerprint, site)
        self._on_applied = on_applied
        self._params = params or IndexParams()
        self._queue_cap = queue_bytes
        self._resync_interval_s = resync_interval_s
        self._pool_cap = pool_cap_bytes
        self._filter = topics.site_gallery_filter(site)
        self._manifest_topic = topics.gallery_manifest(site)
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

        # worker-thread state
        self._assembler: GalleryAssembler | None = None
        self._manifests: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._last_error_ack: tuple[int, str] | None = None
        self._last_resync = 0.0
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
        if self._holder.current is None:
            self._load_saved()
        current = self._holder.current
        self._assembler = GalleryAssembler(
            self._verifier,
            self._fingerprint,
            self._site,
            current_version=current.version if current is not None else 0,
            pool_cap_bytes=self._pool_cap,
        )
        self._stopping = threading.Event()
        self._worker = threading.Thread(
            target=self._run, args=(self._stopping,), name=f"faceattend-gallery-sync-{self._site}", daemon=True
        )
        self._worker.start()
        self._link.subscribe(self._filter, 1, self._on_message)  # remembered by the link, re-made on reconnect

    def stop(self, timeout: float | None = None) -> None:
        """Unsubscribe and end the worker once the message in hand is done (which may be an index build)."""
        if self._stopping is None or self._stopping.is_set() or self._worker is None:
            return
        self._stopping.set()
        self._link.unsubscribe(self._filter)
        self._queue.put(None)  # wakes the worker
        self._worker.join(timeout)
        if self._worker.is_alive():
            log.warning("gallery sync worker still busy after %s s; it stops after its current message", timeout)

    def status(self) -> SyncStatus:
        index = self._holder.current
        with self._queue_lock:
            dropped = self._dropped
        with self._status_lock:
            return SyncStatus(
                version=index.version if index is not None else None,
                people=index.people if index is not None else 0,
                templates=index.templates if index is not None else 0,
                last_error=self._last_error,
                last_applied_at=self._last_applied_at,
                pending_version=self._pending_version,
                dropped_messages=dropped,
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
            "gallery queue full (%d bytes): message on %s dropped; the retained gallery is fetched again later",
            self._queue_cap,
            msg.topic,
        )

    # ---- worker thread ----

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                item = self._queue.get(timeout=self._resync_interval_s)
            except queue.Empty:
                self._maybe_resync()  # idle: a resync may have waited for its interval
                continue
            if item is None:  # a wake-up from stop()
                continue
            topic, payload, cost = item
            with self._queue_lock:
                self._queued_bytes -= cost
            try:
                self._handle(topic, payload)
            except Exception:
                # a bug on one message must not end gallery updates for the life of the agent
                log.exception("gallery sync: unexpected failure on %s; going on", topic)
            self._maybe_resync()

    def _handle(self, topic: str, payload: bytes) -> None:
        assembler = self._assembler
        if assembler is None:  # set by start() before the worker exists; kept for the type checker
            return
        is_manifest = topic == self._manifest_topic
        version = assembler.pending_version
        try:
            gallery = assembler.feed(topic, payload)
        except ContractError as exc:
            self._refused(_claimed_version(payload) if is_manifest else version, exc)
            return
        finally:
            with self._status_lock:
                self._pending_version = assembler.pending_version
        if is_manifest and payload:
            self._keep_manifest(payload)
        if gallery is not None:
            self._apply(gallery)

    def _keep_manifest(self, payload: bytes) -> None:
        # the assembler took this manifest without error, so it verified it: keep its exact bytes to save with the
        # gallery it announces (re-parsing here is cheap; the payload is at most 512 KiB)
        manifest = GalleryManifest.from_json(payload)
        key = (manifest.version, manifest.blob_sha256)
        self._manifests[key] = payload
        self._manifests.move_to_end(key)
        while len(self._manifests) > _KEPT_MANIFESTS:
            self._manifests.popitem(last=False)

    def _apply(self, gallery: Gallery) -> None:
        started = time.perf_counter()
        try:
            index = GalleryIndex.build(gallery, self._params)
        except GalleryIndexError as exc:
            self._refused(gallery.version, exc)
            return
        built = time.perf_counter()
        # on disk before in service: a crash between the two must never leave an older saved gallery (which may
        # hold people this version removed) behind a version that was already reported as applied
        self._save(gallery)
        saved = time.perf_counter()
        old = self._holder.swap(index)
        with self._status_lock:
            self._last_applied_at = timestamps.utc_now()
        self._last_error_ack = None  # after a good version, a recurring refusal is news again
        self._ack(gallery.version, None)
        log.info(
            "gallery v%d in service (%d people, %d templates; v%s before): index %.2f s, saved in %.2f s",
            gallery.version,
            index.people,
            index.templates,
            old.version if old is not None else "-",
            built - started,
            saved - built,
        )
        if self._on_applied is not None:
            try:
                self._on_applied(index)
            except Exception:
                log.exception("gallery sync: on_applied callback failed for v%d", gallery.version)

    def _save(self, gallery: Gallery) -> None:
        blob = encode_blob(gallery)  # byte for byte the received blob: the format has one encoding per gallery
        manifest = self._manifests.get((gallery.version, hashlib.sha256(blob).hexdigest()))
        try:
            if manifest is None:
                raise GalleryStoreError(f"the verified manifest of v{gallery.version} is no longer at hand")
            self._store.save(manifest, blob)
        except GalleryStoreError as exc:
            # the previous file may hold people this version removed: it must not outlive the failure
            log.error("gallery v%d applied but not saved (%s); deleting the older saved gallery", gallery.version, exc)
            self._set_error(f"v{gallery.version} not saved: {exc}")
            try:
                self._store.remove()
            except GalleryStoreError as removal:
                log.error("%s", removal)

    def _load_saved(self) -> None:
        try:
            gallery = self._store.load()
            if gallery is None:
                log.info("no saved gallery for site %s: waiting for the broker's", self._site)
                return
            index = GalleryIndex.build(gallery, self._params)
        except (GalleryStoreError, GalleryIndexError) as exc:
            # start empty: the broker's retained gallery fills the index once it is reachable
            log.error("saved gallery not used: %s", exc)
            self._set_error(str(exc))
            return
        self._holder.swap(index)

    def _refused(self, version: int | None, exc: FaceAttendError) -> None:
        reason = f"{type(exc).__name__}: {exc}"[: limits.MAX_ERROR_CHARS]
        current = self._holder.current
        log.warning(
            "gallery update%s refused, v%s stays in service: %s",
            f" v{version}" if version is not None else "",
            current.version if current is not None else "-",
            reason,
        )
        self._set_error(reason)
        if version is None:
            return  # an ack must name a version; the log line is all there is
        if self._last_error_ack == (version, reason):
            return
        self._last_error_ack = (version, reason)
        self._ack(version, reason)

    def _ack(self, version: int, error: str | None) -> None:
        ack = GalleryAck(
            device_id=self._device,
            site=self._site,
            version=version,
            status="error" if error else "ok",
            error=error,
            ts=timestamps.utc_now(),
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
        log.info("gallery messages were dropped (%d so far): subscribing again for the retained replay", dropped)
        # a SUBSCRIBE to a filter already held makes the broker send its retained messages again
        self._link.subscribe(self._filter, 1, self._on_message)


def _claimed_version(payload: bytes) -> int | None:
    """The version a refused manifest claims (it may be forged), for the error ack; None when unreadable."""
    try:
        return GalleryManifest.from_json(payload).version
    except ContractError:
        return None
