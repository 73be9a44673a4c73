"""Rebuild a verified gallery from the retained MQTT messages of one site, arriving in any order.

What arrives on `faceattend/v1/site/{site}/gallery/...`:

- on subscribe, the broker replays the retained manifest and chunks in an order of its choosing, and replays
  them again after every reconnect (duplicates are the normal case);
- during an update, the server publishes the new chunks first and then the manifest, so a reader subscribed to
  the chunks sees a newer version's chunks before their manifest;
- stale retained chunks of an older version, or of indices the new version no longer has, can still come;
- an empty retained payload is the server clearing a topic, not data.

A chunk topic carries only its index, so a chunk's version is known only by its sha256 matching an entry of a
verified manifest. Chunks that match the manifest being assembled are kept (bounded by its blob_size, itself
bounded); chunks that match nothing yet go to a side pool bounded by `pool_cap_bytes` (oldest dropped first,
logged), which is searched when a newer manifest is verified. The pool only saves a download: a reader asks for
what is still missing (`missing_chunks`) by subscribing to those chunk topics again, which makes the broker send
their retained copies (edge_agent.gallery.sync does so), so a gallery of any size the contract allows completes
whatever was dropped on the way.

Ordering: manifests are compared by release `(epoch, version)` (models.contract.gallery). A release equal to the
one in service is a replay (ignored); an older one is refused with StaleGalleryError; a newer one whose blob is
byte for byte the one in service (a server restart starts a new epoch and re-publishes the same people) is taken
over at once, without a download.

Checks, in order: manifest size / envelope / fields, signing key id and Ed25519 signature, site, encoder
fingerprint (FingerprintMismatchError: the edge must refuse the gallery), release, per-chunk length and sha256,
the whole blob's sha256, the blob's own structure (`decode_blob`). Any failure raises a typed ContractError for
the caller to log (and ack as an error) while it keeps serving the previous gallery; the assembler stays usable.

Not thread-safe: feed it from one thread (e.g. paho's network thread, or a worker fed by a queue). Hashing and
decoding a large gallery takes a while; an edge with big galleries should feed from its own worker thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from models.contract import limits
from models.contract.gallery import Gallery, GalleryManifest, decode_blob, read_manifest, release_text
from models.contract.signing import Verifier
from models.contract.topics import TopicKind, parse_topic
from models.errors import ContractError, FingerprintMismatchError, IntegrityError, StaleGalleryError, TopicError

log = logging.getLogger(__name__)

DEFAULT_POOL_CAP_BYTES = 64 * limits.MIB


@dataclass(frozen=True, eq=False)
class Verified:
    """A publication that passed every check: its manifest, parsed and as received (what the signature covers,
    unknown fields of a newer minor version included, so it can be saved and verified again), and its gallery."""

    manifest: GalleryManifest
    manifest_bytes: bytes = field(repr=False)
    gallery: Gallery = field(repr=False)


@dataclass
class _Assembly:
    manifest: GalleryManifest
    manifest_bytes: bytes
    chunks: dict[int, bytes] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.chunks) == self.manifest.chunk_count


class GalleryAssembler:
    def __init__(
        self,
        verifier: Verifier,
        expected_fingerprint: str,
        site: str,
        *,
        current: Verified | None = None,
        pool_cap_bytes: int = DEFAULT_POOL_CAP_BYTES,
    ) -> None:
        """`current`: the publication already in service (e.g. loaded from disk), which is not rebuilt."""
        self._verifier = verifier
        self._fingerprint = expected_fingerprint
        self._site = site
        self._pool_cap = pool_cap_bytes
        self._completed = current
        self._assembly: _Assembly | None = None
        # (index, sha256) -> chunk, insertion-ordered so the oldest is dropped first
        self._pool: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._pool_bytes = 0
        # (release, blob sha256) of a publication whose blob failed its checks: its retained manifest is replayed
        # on every reconnect and would otherwise be downloaded and refused again each time
        self._failed: tuple[tuple[int, int], str] | None = None

    @property
    def completed(self) -> Verified | None:
        """The newest publication completed (or given as `current`)."""
        return self._completed

    @property
    def completed_version(self) -> int:
        return self._completed.manifest.version if self._completed else 0

    @property
    def pending(self) -> GalleryManifest | None:
        """The verified manifest being assembled, if any."""
        return self._assembly.manifest if self._assembly else None

    @property
    def pending_version(self) -> int | None:
        return self._assembly.manifest.version if self._assembly else None

    @property
    def received_chunks(self) -> int:
        """Chunks of the pending manifest received so far (0 when none is pending)."""
        return len(self._assembly.chunks) if self._assembly else 0

    def missing_chunks(self) -> list[int]:
        """Indices of the pending manifest's chunks not received yet, ascending."""
        if self._assembly is None:
            return []
        have = self._assembly.chunks
        return [i for i in range(self._assembly.manifest.chunk_count) if i not in have]

    def feed(self, topic: str, payload: bytes) -> Gallery | None:
        """Take one message; return the new gallery when this message completed it, else None."""
        parsed = parse_topic(topic)
        if parsed.site != self._site or parsed.kind not in (TopicKind.GALLERY_MANIFEST, TopicKind.GALLERY_BLOB):
            raise TopicError(f"topic {topic!r} is not a gallery topic of site {self._site}")
        if not payload:
            log.debug("cleared retained topic %s ignored", topic)
            return None
        if parsed.kind is TopicKind.GALLERY_MANIFEST:
            return self._on_manifest(bytes(payload))
        if parsed.index is None:  # parse_topic sets it for every blob topic; kept for the type checker
            raise TopicError(f"topic {topic!r} has no chunk index")
        return self._on_chunk(parsed.index, bytes(payload))

    # ---- manifests ----

    def _on_manifest(self, payload: bytes) -> Gallery | None:
        manifest = read_manifest(payload, self._verifier)  # signature first: nothing unverified is acted on
        release = manifest.release
        if manifest.site != self._site:
            # signed, but for another site: a misrouted or replayed publication
            raise ContractError(
                f"gallery manifest {release_text(release)} is for site {manifest.site}, not {self._site}"
            )
        if manifest.fingerprint != self._fingerprint:
            raise FingerprintMismatchError(
                f"gallery {release_text(release)} for site {self._site} was built under encoder fingerprint "
                f"{manifest.fingerprint}; this edge's encoder is {self._fingerprint}"
            )
        done = self._completed
        if done is not None:
            if release == done.manifest.release:
                if manifest.blob_sha256 == done.manifest.blob_sha256:
                    log.debug("gallery manifest %s ignored: in service already", release_text(release))
                    return None  # the retained manifest replayed on every resubscribe
                raise StaleGalleryError(
                    f"gallery manifest {release_text(release)} for site {self._site} has the release in service "
                    "with other content: a release is published once, so this one is not applied"
                )
            if release < done.manifest.release:
                raise StaleGalleryError(
                    f"gallery manifest {release_text(release)} for site {self._site} is older than "
                    f"{release_text(done.manifest.release)} in service: a replayed publication, or a server that "
                    "published without starting a new epoch (a server older than schema 1.1 on a restored "
                    "database, a clock set back); not applied"
                )
        if self._failed == (release, manifest.blob_sha256):
            log.debug("gallery manifest %s ignored: its blob already failed verification", release_text(release))
            return None
        current = self._assembly
        if current is not None:
            if release < current.manifest.release:
                log.info(
                    "gallery manifest %s ignored: %s is being assembled",
                    release_text(release),
                    release_text(current.manifest.release),
                )
                return None
            if release == current.manifest.release:
                if manifest.blob_sha256 == current.manifest.blob_sha256:
                    return None  # the retained manifest again (resubscribe after a reconnect)
                log.warning("gallery %s re-published with other content; starting over with it", release_text(release))
        if done is not None and _same_content(manifest, done.manifest):
            self._assembly = None  # whatever was pending is older than this release
            gallery = dataclasses.replace(
                done.gallery, version=manifest.version, epoch=manifest.epoch, decision=manifest.site_decision
            )
            self._completed = Verified(manifest, payload, gallery)
            log.info(
                "gallery %s for site %s: the content of %s in service, taken over without a download",
                release_text(release),
                self._site,
                release_text(done.manifest.release),
            )
            return gallery
        log.info(
            "gallery manifest %s for site %s verified (%d chunks, %d bytes)",
            release_text(release),
            self._site,
            manifest.chunk_count,
            manifest.blob_size,
        )
        self._assembly = _Assembly(manifest, payload)
        for i, digest in enumerate(manifest.chunk_sha256):
            chunk = self._pool.pop((i, digest), None)
            if chunk is not None:
                self._pool_bytes -= len(chunk)
                self._assembly.chunks[i] = chunk
        return self._finish_if_complete()

    # ---- chunks ----

    def _on_chunk(self, index: int, chunk: bytes) -> Gallery | None:
        digest = hashlib.sha256(chunk).hexdigest()
        current = self._assembly
        if current is not None and index < current.manifest.chunk_count:
            if current.manifest.chunk_sha256[index] == digest and len(chunk) == current.manifest.chunk_length(index):
                current.chunks[index] = chunk  # a duplicate simply overwrites itself
                return self._finish_if_complete()
            if index not in current.chunks:
                # while assembling, a chunk that does not match is either tampered with or from a concurrent
                # update; keep it aside (it may belong to the next manifest) and report it
                self._to_pool(index, digest, chunk)
                raise IntegrityError(
                    f"gallery chunk {index} ({len(chunk)} bytes, sha256 {digest[:12]}…) does not match "
                    f"manifest v{current.manifest.version} (sha256 {current.manifest.chunk_sha256[index][:12]}…): "
                    "stale, from a newer publication, or tampered with"
                )
        # no manifest wants it now: a newer version's chunk ahead of its manifest, or a stale one
        self._to_pool(index, digest, chunk)
        return None

    def _to_pool(self, index: int, digest: str, chunk: bytes) -> None:
        key = (index, digest)
        if key in self._pool:
            return
        if len(chunk) > self._pool_cap:
            log.warning("gallery chunk %d dropped: larger than the %d byte pool", index, self._pool_cap)
            return
        self._pool[key] = chunk
        self._pool_bytes += len(chunk)
        while self._pool_bytes > self._pool_cap:
            (old_index, _), old = self._pool.popitem(last=False)
            self._pool_bytes -= len(old)
            log.warning(
                "gallery chunk %d (%d bytes) with no matching manifest dropped: the %d byte pool is full "
                "(asked for again once its manifest is known)",
                old_index,
                len(old),
                self._pool_cap,
            )

    # ---- completion ----

    def _finish_if_complete(self) -> Gallery | None:
        current = self._assembly
        if current is None or not current.complete:
            return None
        manifest = current.manifest
        blob = b"".join(current.chunks[i] for i in range(manifest.chunk_count))
        # the assembly is over whatever happens next: a bad blob must not be re-checked on every duplicate
        self._assembly = None
        current.chunks.clear()
        digest = hashlib.sha256(blob).hexdigest()
        self._failed = (manifest.release, manifest.blob_sha256)  # cleared below once the blob proves good
        if digest != manifest.blob_sha256:
            raise IntegrityError(
                f"gallery v{manifest.version} blob sha256 {digest[:12]}… differs from the manifest's "
                f"{manifest.blob_sha256[:12]}… although every chunk matched"
            )
        gallery = decode_blob(blob, manifest)
        self._failed = None
        self._completed = Verified(manifest, current.manifest_bytes, gallery)
        log.info(
            "gallery %s for site %s assembled: %d embeddings of %d people",
            release_text(manifest.release),
            self._site,
            gallery.count,
            len(gallery.people),
        )
        return gallery


def _same_content(a: GalleryManifest, b: GalleryManifest) -> bool:
    # the blob holds dtype, dim, count and people, and the fingerprint was checked against ours for both
    return a.blob_sha256 == b.blob_sha256 and a.blob_size == b.blob_size and a.metric == b.metric
