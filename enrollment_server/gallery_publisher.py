"""Publish a site's gallery to the edges: signed manifest + chunks, retained, over the wire contract.

One publication (`GalleryPublisher.publish`):

1. read every template of the site's active people under our encoder fingerprint (`Store.site_embeddings`);
2. allocate the next version number (`Store.next_gallery_version`; a number is never reused, even when this
   publication fails later) and take the publisher's epoch (below);
3. build the contract `Gallery`, encode, chunk and sign it (`models.contract.gallery.build_publication`);
4. publish every chunk retained QoS 1 and wait for all their PUBACKs, THEN publish the manifest retained QoS 1 and
   wait for its PUBACK. Waiting for the chunks first means a retained manifest always has its chunks retained
   before it: an edge that subscribes at any moment after the manifest's PUBACK can assemble the gallery;
5. clear (empty retained payload) the chunk topics a previous, larger gallery left beyond our chunk count, so the
   broker does not replay dead chunks to every edge forever;
6. record the version with its exact signed manifest in the store. Only a version whose manifest the broker
   acknowledged is recorded: `Store.list_devices` computes each edge's lag against recorded versions, so a
   recorded version must be one the edges can actually get.

Every wait is bounded by `ack_timeout_s` (one deadline for the whole publication); running out raises
PublishTimeoutError and records nothing. paho keeps what it had queued and may still deliver it after a
reconnect: chunks without a manifest are ignored by edges (pooled, then dropped); a manifest acknowledged after
the timeout makes that version live although unrecorded, and the next publication supersedes it.

Epochs (wire schema 1.1, models.contract.gallery). Edges order publications by release (epoch, version). The
version counter lives in the database, so a database restored from a backup, or moved to PostgreSQL, counts again
from a number the edges have passed. The epoch is what keeps releases growing: a publisher takes a new one,
`max(now in ms, the newest recorded epoch + 1)`, for its first publication of a site and whenever the newest
recorded release of the site is not of its own epoch (another process published meanwhile), and keeps it while
it continues its own count. A server process can prove nothing about the database it starts on (a restore looks
like any restart), so every process starts a new epoch: its first publication of a site is a new version even
when nobody changed, which edges holding the same blob take over without a download. Versions stay the
operator's counter; epochs only order.

The site's decision rule (`enrollment-server calibrate --apply`, `Store.site_rule`) goes into every manifest while
it belongs to the publisher's encoder fingerprint; one calibrated under another encoder is left out, with a
warning, and the edges apply their encoder's default. A changed rule is a change like a changed person:
`republish_latest` publishes a new version for it.

An empty gallery (nobody enrolled, or everybody removed) is a valid gallery of count 0: publishing it is how the
edges forget the last person.

`republish_latest` is for server start and broker reconnects: retained messages live in the broker's memory and
persistence file, so a broker crash between autosaves loses them. The first call of a process (or after another
publisher recorded a version) publishes a new version under a new epoch (above). Later calls rebuild from the
store's *current* data and compare with the latest recorded version. Unchanged (same blob sha256, fingerprint,
dtype, signing key) -> re-send the recorded, already signed manifest and its chunks as they are: the same
release, so edges that have it ignore the replay and nothing is re-applied anywhere. Changed (people added /
removed while the broker was gone, or another encoder / dtype / key configured) -> a normal new version.
Rebuilding "the store data at that version" is impossible: the store keeps the manifest of every version but not
its embeddings (templates are deleted with their person, and photos are not kept), and a stale version would
anyway be the wrong thing to restore. `republish_on_connect` runs this after every connect of the link, on a
thread of its own.

Concurrency: one publication at a time per publisher (a lock), because chunk topics carry only an index and two
interleaved publications of one site would overwrite each other's chunks. Two *processes* publishing the same
site at once (e.g. `enrollment-server publish` while the server also publishes) have the same problem and are
not guarded against: the server should be the only publisher of a running site. Never call `publish` or
`republish_latest` on the MQTT network thread (a connection listener or message handler): they wait for PUBACKs
that only that thread can deliver. Hand them to a worker thread instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from enrollment_server.store import GalleryVersion, SiteEmbeddings, Store
from models.contract import limits, topics
from models.contract.gallery import (
    DTYPES,
    Gallery,
    GalleryManifest,
    GalleryPerson,
    SiteDecision,
    build_publication,
    release_text,
)
from models.contract.mqtt_link import MqttLink, PublishHandle
from models.contract.signing import Signer
from models.errors import ConfigError, ContractError, FaceAttendError, MqttError, PublishTimeoutError
from models.face.encoders import DLIB_RESNET

log = logging.getLogger(__name__)

METRIC = "euclidean"
# An empty gallery's dimension, which has no stored template to take it from: the default encoder's (the server
# passes its configured encoder's).
DEFAULT_DIM = DLIB_RESNET.dim
DEFAULT_ACK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PublishedGallery:
    site: str
    version: int
    count: int  # embeddings (templates)
    people: int
    chunk_count: int
    blob_size: int
    sha256: str  # of the whole blob, as in the manifest
    seconds: float  # the whole call
    build_seconds: float  # store read, encode, chunk, sign
    publish_seconds: float  # from the first chunk sent to the manifest's PUBACK (plus clearing leftovers)
    republished: bool = False  # True: the recorded version re-sent unchanged by republish_latest
    cleared: int = 0  # leftover chunk topics of a previous, larger gallery cleared
    epoch: int = 0  # with `version`, the release edges order by

    @property
    def release(self) -> tuple[int, int]:
        return (self.epoch, self.version)


class GalleryPublisher:
    def __init__(
        self,
        store: Store,
        link: MqttLink,
        signer: Signer,
        fingerprint: str,
        dtype: str = "float32",
        chunk_size: int = limits.DEFAULT_CHUNK_SIZE,
        *,
        dim: int = DEFAULT_DIM,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        progress_every_s: float = 2.0,
    ) -> None:
        """`dim` is the dimension of an empty gallery; a non-empty one takes its stored templates' own."""
        if dtype not in DTYPES:
            raise ConfigError(f"gallery dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not 1 <= chunk_size <= limits.MAX_CHUNK_SIZE:
            raise ConfigError(f"gallery chunk_size must be in [1, {limits.MAX_CHUNK_SIZE}], got {chunk_size}")
        if not fingerprint:
            raise ConfigError("gallery publisher needs the encoder fingerprint")
        if not 1 <= dim <= limits.MAX_DIM:
            raise ConfigError(f"gallery dim must be in [1, {limits.MAX_DIM}], got {dim}")
        if ack_timeout_s <= 0:
            raise ConfigError("ack_timeout_s must be positive")
        self._store = store
        self._link = link
        self._signer = signer
        self._fingerprint = fingerprint
        self._dtype = dtype
        self._chunk_size = chunk_size
        self._dim = dim
        self._ack_timeout_s = ack_timeout_s
        self._progress_every_s = progress_every_s
        self._lock = threading.Lock()
        # the most chunk topics this process has written per site, recorded or not: a publication that timed
        # out after its chunks went out is not in the store, but its chunks may be retained at the broker
        self._high_water: dict[str, int] = {}
        self._epochs: dict[str, int] = {}  # the epoch this publisher counts its versions of a site under

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    # ---- public ----

    def publish(self, site: str) -> PublishedGallery:
        """Publish the site's current gallery as a new version; see the module docstring for the steps.

        Raises PublishTimeoutError (nothing recorded) when the broker does not acknowledge in time, MqttError when
        the link refuses, NotFoundError for an unknown site, StoreError when the database fails.
        """
        topics.validate_id(site, "site")
        with self._lock:
            return self._publish_new(site, time.perf_counter())

    def republish_latest(self, site: str) -> PublishedGallery:
        """Make sure the broker holds the site's current gallery (server start, reconnect after a broker loss).

        Re-sends the latest recorded version unchanged when the store's data still produces it byte for byte,
        otherwise publishes a new version (also when none was ever recorded).
        """
        topics.validate_id(site, "site")
        with self._lock:
            start = time.perf_counter()
            latest = self._store.latest_gallery_version(site)
            if latest is None:
                log.info("site %s has no recorded gallery yet: publishing the first", site)
                return self._publish_new(site, start)
            if latest.epoch != self._epochs.get(site):
                log.info(
                    "site %s: recorded gallery v%d (epoch %d) is not of this publisher's epoch (a server start, a "
                    "restored database, another publisher): publishing a new version under a new epoch",
                    site,
                    latest.version,
                    latest.epoch,
                )
                return self._publish_new(site, start)
            try:
                recorded = GalleryManifest.from_json(latest.manifest_json.encode("utf-8"))
            except ContractError as exc:
                log.warning(
                    "site %s: recorded manifest v%d unreadable (%s): publishing a new version",
                    site,
                    latest.version,
                    exc,
                )
                return self._publish_new(site, start)
            was = (recorded.fingerprint, recorded.dtype, recorded.key_id)
            now = (self._fingerprint, self._dtype, self._signer.key_id)
            if was != now:
                # another encoder, dtype or signing key (rotated): the recorded publication is not what edges
                # configured like this server must get
                log.info(
                    "site %s: recorded gallery v%d is %s, configured %s: publishing a new version",
                    site,
                    recorded.version,
                    "/".join(was),
                    "/".join(now),
                )
                return self._publish_new(site, start)
            data = self._store.site_embeddings(site, self._fingerprint)
            gallery = self._gallery(site, recorded.version, data, recorded.epoch)
            # build_publication with the recorded chunk size reproduces the recorded chunks exactly when the data
            # is unchanged; its fresh manifest (other `created`, other signature bytes) is only compared, never sent
            rebuilt, chunks = build_publication(gallery, self._signer, recorded.chunk_size)
            was_content = (recorded.blob_sha256, recorded.chunk_sha256, recorded.site_decision)
            if (rebuilt.blob_sha256, rebuilt.chunk_sha256, gallery.decision) != was_content:
                log.info(
                    "site %s changed since gallery v%d was recorded: publishing a new version", site, latest.version
                )
                return self._publish_new(site, start)
            built = time.perf_counter()
            log.info("site %s: re-sending recorded gallery v%d (%d chunks)", site, recorded.version, len(chunks))
            # the recorded text is the manifest exactly as first sent: same signature, same `created`
            self._send(site, recorded.version, chunks, latest.manifest_json.encode("utf-8"))
            cleared = self._clear_leftovers(site, len(chunks), self._previous_chunk_count(site, recorded.chunk_count))
            done = time.perf_counter()
            return PublishedGallery(
                site=site,
                version=recorded.version,
                count=recorded.count,
                people=recorded.people,
                chunk_count=recorded.chunk_count,
                blob_size=recorded.blob_size,
                sha256=recorded.blob_sha256,
                seconds=done - start,
                build_seconds=built - start,
                publish_seconds=done - built,
                republished=True,
                cleared=cleared,
                epoch=recorded.epoch,
            )

    def republish_on_connect(self, sites: Sequence[str] | Callable[[], Sequence[str]]) -> None:
        """After every connect of the link (the first one included, so this also covers server start), run
        `republish_latest` for each site on a background thread: a broker that crashed may have come back without
        its retained messages, and the connection listener itself must not wait for PUBACKs (network thread).

        `sites` may be a callable, read at each run, so that sites created meanwhile are covered. Failures are
        logged and retried at the next connect. Connects during a run queue exactly one more run. Register before
        the link's start() for the first connect to count.
        """
        if callable(sites):
            runner = _Republisher(self, sites)
        else:
            listed = tuple(topics.validate_id(s, "site") for s in sites)
            runner = _Republisher(self, lambda: listed)
        self._link.add_connection_listener(runner.on_connection)

    # ---- one new version ----

    def _publish_new(self, site: str, start: float) -> PublishedGallery:
        data = self._store.site_embeddings(site, self._fingerprint)
        foreign = self._store.count_foreign_templates(site, self._fingerprint)
        if foreign:
            # e.g. made before an upgrade changed the encoder's space (issue 13's flip averaging): their people are
            # not recognised by them until they are made again, which the admin must know
            log.warning(
                "site %s: %d templates were made by another encoder than %s and are left out of the gallery: "
                "run `enrollment-server reencode` (it makes them again from kept photos or face chips)",
                site,
                foreign,
                self._fingerprint,
            )
        previous = self._store.latest_gallery_version(site)
        recorded_chunks = int(previous.manifest().get("chunk_count", 0)) if previous is not None else 0
        previous_chunks = self._previous_chunk_count(site, recorded_chunks)
        version = self._store.next_gallery_version(site)
        gallery = self._gallery(site, version, data, self._epoch_for(site, previous))
        manifest, chunks = build_publication(gallery, self._signer, self._chunk_size)
        manifest_bytes = manifest.to_json()
        built = time.perf_counter()
        log.info(
            "site %s: publishing gallery %s (%d embeddings of %d people, %d bytes in %d chunks; built in %.2f s)",
            site,
            release_text(manifest.release),
            manifest.count,
            manifest.people,
            manifest.blob_size,
            manifest.chunk_count,
            built - start,
        )
        self._send(site, version, chunks, manifest_bytes)
        cleared = self._clear_leftovers(site, len(chunks), previous_chunks)
        sent = time.perf_counter()
        self._store.record_gallery_version(
            site,
            version,
            fingerprint=self._fingerprint,
            count=manifest.count,
            people=manifest.people,
            blob_sha256=manifest.blob_sha256,
            # the exact bytes that were signed and sent, so republish_latest can re-send them unchanged
            manifest=manifest_bytes.decode("utf-8"),
            epoch=manifest.epoch,
        )
        done = time.perf_counter()
        log.info("site %s: gallery v%d published and recorded in %.2f s", site, version, done - start)
        return PublishedGallery(
            site=site,
            version=version,
            count=manifest.count,
            people=manifest.people,
            chunk_count=manifest.chunk_count,
            blob_size=manifest.blob_size,
            sha256=manifest.blob_sha256,
            seconds=done - start,
            build_seconds=built - start,
            publish_seconds=sent - built,
            cleared=cleared,
            epoch=manifest.epoch,
        )

    def _epoch_for(self, site: str, latest: GalleryVersion | None) -> int:
        """This publisher's epoch for the site: kept while the newest recorded release is its own, else a new one
        above every recorded epoch (module docstring)."""
        mine = self._epochs.get(site)
        if mine is not None and latest is not None and latest.epoch == mine:
            return mine
        epoch = max(time.time_ns() // 1_000_000, latest.epoch + 1 if latest is not None else 0)
        self._epochs[site] = epoch
        log.info(
            "site %s: gallery epoch %d begins (the newest recorded release: %s)",
            site,
            epoch,
            release_text(latest.release) if latest is not None else "none",
        )
        return epoch

    def _gallery(self, site: str, version: int, data: SiteEmbeddings, epoch: int) -> Gallery:
        """The contract gallery of the store's rows: the people table in row order (person_id, bytewise)."""
        index: dict[str, int] = {}
        people: list[GalleryPerson] = []
        labels = np.empty(len(data.labels), dtype=np.int32)
        for row, person_id in enumerate(data.labels):
            j = index.get(person_id)
            if j is None:
                j = index[person_id] = len(people)
                people.append(GalleryPerson(person_id, data.names[person_id]))
            labels[row] = j
        embeddings = data.embeddings if len(data) else np.zeros((0, self._dim), dtype=np.float32)
        return Gallery(
            site,
            version,
            self._fingerprint,
            METRIC,
            self._dtype,
            embeddings,
            labels,
            tuple(people),
            epoch=epoch,
            decision=self._site_decision(site),
        )

    def _site_decision(self, site: str) -> SiteDecision | None:
        decision = self._store.site_decision(site, self._fingerprint)
        stored = None if decision is not None else self._store.site_rule(site)
        if stored is not None:  # calibrated under another encoder
            log.warning(
                "site %s: its calibrated rule belongs to encoder %s, this server publishes %s: left out, the edges "
                "apply their encoder's default (run enrollment-server calibrate --apply again)",
                site,
                stored.fingerprint,
                self._fingerprint,
            )
        return decision

    def _previous_chunk_count(self, site: str, recorded: int) -> int:
        return max(recorded, self._high_water.get(site, 0))

    # ---- the wire ----

    def _send(self, site: str, version: int, chunks: Sequence[bytes], manifest: bytes) -> None:
        deadline = time.monotonic() + self._ack_timeout_s
        self._high_water[site] = max(self._high_water.get(site, 0), len(chunks))
        handles = [
            self._link.publish(topics.gallery_blob(site, i), chunk, qos=1, retain=True)
            for i, chunk in enumerate(chunks)
        ]
        self._await(handles, deadline, f"site {site} gallery v{version}: chunks")
        # only now the manifest: a retained manifest must never point at chunks the broker has not taken
        handle = self._link.publish(topics.gallery_manifest(site), manifest, qos=1, retain=True)
        self._await([handle], deadline, f"site {site} gallery v{version}: manifest")

    def _clear_leftovers(self, site: str, chunk_count: int, previous_chunk_count: int) -> int:
        """Empty retained payloads on chunk topics [chunk_count, previous): the broker then forgets them."""
        if previous_chunk_count <= chunk_count:
            return 0
        stale = range(chunk_count, previous_chunk_count)
        handles = [self._link.publish(topics.gallery_blob(site, i), b"", qos=1, retain=True) for i in stale]
        try:
            self._await(handles, time.monotonic() + self._ack_timeout_s, f"site {site}: clearing {len(stale)} chunks")
        except MqttError as exc:
            # the new gallery is live and complete: leftovers only cost edges some ignored downloads, so this is
            # not worth failing the publication for; the next publication tries again (high-water mark kept)
            log.warning("site %s: leftover chunk topics %d..%d not cleared: %s", site, stale[0], stale[-1], exc)
            return 0
        self._high_water[site] = chunk_count
        log.info("site %s: cleared %d leftover chunk topics of a larger gallery", site, len(stale))
        return len(stale)

    def _await(self, handles: Sequence[PublishHandle], deadline: float, what: str) -> None:
        """Wait for every PUBACK before `deadline`, logging progress on long waits."""
        total = len(handles)
        next_report = time.monotonic() + self._progress_every_s
        for done, handle in enumerate(handles):
            while not handle.wait(max(0.0, min(deadline, next_report) - time.monotonic())):
                now = time.monotonic()
                if handle.failed:
                    raise MqttError(f"{what}: the link dropped the publication ({done}/{total} acknowledged)")
                if now >= deadline:
                    raise PublishTimeoutError(
                        f"{what}: {done}/{total} acknowledged by the broker within {self._ack_timeout_s:.0f} s"
                    )
                log.info("%s: %d/%d acknowledged", what, done, total)
                next_report = now + self._progress_every_s
            if handle.rejected:
                # MQTT 5: the broker took the message but refused it (typically an ACL); retrying cannot help
                raise MqttError(f"{what}: the broker refused message {done} (reason code {handle.reason_code:#x})")
        if total > 1:
            log.debug("%s: all %d acknowledged", what, total)


class _Republisher:
    """Runs republish_latest for a set of sites off the network thread, at most one run at a time."""

    def __init__(self, publisher: GalleryPublisher, sites: Callable[[], Sequence[str]]) -> None:
        self._publisher = publisher
        self._sites = sites
        self._lock = threading.Lock()
        self._pending = False
        self._thread: threading.Thread | None = None

    def on_connection(self, connected: bool) -> None:
        if not connected:
            return
        with self._lock:
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="faceattend-gallery-republish", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                # decided under the lock on_connection takes: a connect either sees this thread and leaves the
                # pending flag to it, or sees None and starts a new one
                if not self._pending:
                    self._thread = None
                    return
                self._pending = False
            try:
                sites = list(self._sites())
            except FaceAttendError as exc:
                log.warning("gallery re-publication after connecting: cannot list the sites: %s", exc)
                continue
            for site in sites:
                try:
                    result = self._publisher.republish_latest(site)
                except FaceAttendError as exc:
                    log.warning(
                        "site %s: gallery not re-published after connecting: %s (next connect retries)", site, exc
                    )
                    continue
                log.info(
                    "site %s: gallery v%d %s after connecting",
                    site,
                    result.version,
                    "re-sent" if result.republished else "published",
                )
