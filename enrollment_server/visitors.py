"""Unknown visitors: the faces the doors decided as unknown, grouped by identity, and what the admin does with a group.

Grouping. A site's stored faces (under the server's encoder fingerprint) are clustered by average linkage on their
embeddings' Euclidean distances, cut at `enrollment.duplicate_identity_distance`: the distance at which the server
already calls two faces one person (a new person that close to someone enrolled is flagged). Average linkage, not
single: one blurry face between two strangers must not chain them into one group. The input is ordered by (time,
id), so the same faces always give the same groups. A group's key is its oldest face's id; an action names the faces
it applies to (`face_ids`), so a group that changed since the page was drawn (a new face arrived) is never acted on
by a stale key.

Per group: its faces best first (the edge's quality weight, then newest), the times and doors it was seen at, and the
enrolled person nearest to its best face (a hint for "this is <person>", shown with the distance).

Actions (each deletes the group's faces once done: the faces served their purpose and are the most sensitive data
the server holds):

- `assign`: "this is <person>": the group's best crops (`unknown_visitors.best_crops`) are enrolled for that person
  through the same quality gate as any photo (Enroller); nothing is deleted when no crop passes;
- `enroll`: "new person": the same, creating the person; the duplicate-identity check applies (a group that looks
  like someone enrolled is refused unless the admin insists);
- `ignore`: the faces are deleted.

Retention (`purge`): faces older than `max_age_days`, all but each site's newest `max_faces`, and every face of a
site no longer listed in `unknown_visitors.sites` are deleted; the visitor ingest runs it at start, after every
stored face and on a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from enrollment_server.config import UnknownVisitorsSection
from enrollment_server.enrollment import Enroller, EnrollReport
from enrollment_server.store import SiteEmbeddings, Store, StoredUnknownFace
from models.decision.rules import pairwise_distances
from models.errors import NotFoundError, StoreValueError

log = logging.getLogger(__name__)

MAX_GROUP_FACES = 64  # face ids listed per group (the group's size is reported in full)


@dataclass(frozen=True)
class VisitorFace:
    id: int
    device_id: str
    camera: str
    ts: datetime
    quality: float
    distance: float | None


@dataclass(frozen=True)
class VisitorGroup:
    key: int  # the oldest face's id
    site: str
    size: int
    faces: tuple[VisitorFace, ...]  # best first, at most MAX_GROUP_FACES
    face_ids: tuple[int, ...]  # every face of the group (what an action applies to)
    first_seen: datetime
    last_seen: datetime
    doors: tuple[str, ...]  # "device/camera", most sightings first
    nearest_person: str | None  # the enrolled identity nearest to the best face
    nearest_name: str | None
    nearest_distance: float | None


@dataclass(frozen=True)
class VisitorAction:
    """What an action did: the enrollment report (assign / enroll) and how many stored faces it deleted."""

    report: EnrollReport | None
    deleted: int


def cluster(embeddings: np.ndarray, threshold: float) -> list[list[int]]:
    """Row indices grouped by average-linkage clustering cut at `threshold` (Euclidean); groups in order of their
    first row, rows in input order. Deterministic for a given input order."""
    n = int(embeddings.shape[0])
    if n == 0:
        return []
    if n == 1:
        return [[0]]
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    tree = linkage(pdist(np.asarray(embeddings, dtype=np.float64)), method="average")
    labels = fcluster(tree, t=threshold, criterion="distance")
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _best_first(faces: Sequence[StoredUnknownFace]) -> list[StoredUnknownFace]:
    """The edge's quality weight first, then the newest, then the id (a total order: the same faces, the same list)."""
    return sorted(faces, key=lambda s: (-s.face.quality, -s.face.ts.timestamp(), s.id))


class Visitors:
    """The unknown visitors of every opted-in site, over one store; named faces are enrolled by `enroller`."""

    def __init__(self, store: Store, config: UnknownVisitorsSection, enroller: Enroller) -> None:
        self.store = store
        self.config = config
        self.enroller = enroller
        self.fingerprint = enroller.fingerprint
        self.threshold = enroller.config.duplicate_identity_distance

    def enabled(self, site: str) -> bool:
        return site in self.config.sites

    # -- reading ---------------------------------------------------------------------------------------------------

    def groups(self, site: str) -> list[VisitorGroup]:
        """The site's visitor groups, most recently seen first."""
        stored = self.store.list_unknown_faces(site, fingerprint=self.fingerprint)
        if not stored:
            return []
        embeddings = np.stack([s.face.embedding for s in stored])
        gallery = self.store.site_embeddings(site, self.fingerprint)
        out = [self._group(site, [stored[i] for i in rows], gallery) for rows in cluster(embeddings, self.threshold)]
        return sorted(out, key=lambda g: (g.last_seen, g.key), reverse=True)

    def _group(self, site: str, members: list[StoredUnknownFace], gallery: SiteEmbeddings) -> VisitorGroup:
        ranked = _best_first(members)
        doors: dict[str, int] = {}
        for s in members:
            door = f"{s.face.device_id}/{s.face.camera}"
            doors[door] = doors.get(door, 0) + 1
        nearest: tuple[str | None, str | None, float | None] = (None, None, None)
        if len(gallery):
            d = pairwise_distances(ranked[0].face.embedding[None, :], gallery.embeddings)[0]
            j = int(np.argmin(d))
            person = gallery.labels[j]
            nearest = (person, gallery.names.get(person), round(float(d[j]), 4))
        return VisitorGroup(
            key=min(s.id for s in members),
            site=site,
            size=len(members),
            faces=tuple(
                VisitorFace(s.id, s.face.device_id, s.face.camera, s.face.ts, s.face.quality, s.face.distance)
                for s in ranked[:MAX_GROUP_FACES]
            ),
            face_ids=tuple(s.id for s in ranked),
            first_seen=min(s.face.ts for s in members),
            last_seen=max(s.face.ts for s in members),
            doors=tuple(sorted(doors, key=lambda k: (-doors[k], k))),
            nearest_person=nearest[0],
            nearest_name=nearest[1],
            nearest_distance=nearest[2],
        )

    def crop(self, face_id: int) -> bytes:
        crops = self.store.unknown_face_crops([face_id])
        if face_id not in crops:
            raise NotFoundError(f"no unknown face {face_id}")
        return crops[face_id]

    # -- actions ---------------------------------------------------------------------------------------------------

    def assign(self, site: str, face_ids: Sequence[int], person_id: str) -> VisitorAction:
        """ "This is <person>": enroll the group's best crops for an existing person of the site."""
        person = self.store.get_person(person_id)
        if person.site_id != site:
            raise StoreValueError(f"person {person_id!r} is enrolled at site {person.site_id!r}, not {site!r}")
        return self._enroll_faces(site, face_ids, person_id, person.display_name, allow_duplicate_identity=False)

    def enroll(
        self, site: str, face_ids: Sequence[int], person_id: str, name: str, *, allow_duplicate_identity: bool
    ) -> VisitorAction:
        """ "New person": create the person from the group's best crops (the duplicate-identity check applies)."""
        try:
            self.store.get_person(person_id)
        except NotFoundError:
            return self._enroll_faces(
                site, face_ids, person_id, name, allow_duplicate_identity=allow_duplicate_identity
            )
        raise StoreValueError(f"person {person_id!r} already exists: use 'this is {person_id}' instead")

    def ignore(self, site: str, face_ids: Sequence[int]) -> VisitorAction:
        members = self._members(site, face_ids)
        deleted = self.store.delete_unknown_faces([m.id for m in members])
        log.info("unknown visitors of %s: %d faces ignored (deleted)", site, deleted)
        return VisitorAction(None, deleted)

    def _members(self, site: str, face_ids: Sequence[int]) -> list[StoredUnknownFace]:
        wanted = sorted({int(i) for i in face_ids})
        if not wanted:
            raise StoreValueError("face_ids: give at least one face")
        members = self.store.list_unknown_faces(site, ids=wanted)
        missing = sorted(set(wanted) - {m.id for m in members})
        if missing:
            raise NotFoundError(f"no unknown face {missing[0]} at site {site!r} (named or ignored meanwhile?)")
        return members

    def _enroll_faces(
        self, site: str, face_ids: Sequence[int], person_id: str, name: str, *, allow_duplicate_identity: bool
    ) -> VisitorAction:
        members = self._members(site, face_ids)
        best = _best_first(members)[: self.config.best_crops]
        crops = self.store.unknown_face_crops([m.id for m in best])
        photos = [
            (f"face {m.id} ({m.face.device_id}/{m.face.camera}, {m.face.ts:%Y-%m-%d %H:%M})", crops[m.id])
            for m in best
            if m.id in crops
        ]
        report = self.enroller.enroll(person_id, name, site, photos, allow_duplicate_identity=allow_duplicate_identity)
        deleted = self.store.delete_unknown_faces([m.id for m in members]) if report.added else 0
        log.info(
            "unknown visitors of %s: %d of %d crops enrolled as %s; %d faces deleted",
            site,
            report.added,
            len(photos),
            person_id,
            deleted,
        )
        return VisitorAction(report, deleted)

    # -- retention -------------------------------------------------------------------------------------------------

    def purge(self, *, now: datetime | None = None) -> int:
        """Apply the retention limits (and forget sites no longer opted in); returns how many faces were deleted."""
        moment = now or datetime.now(timezone.utc)
        removed = self.store.purge_unknown_faces(
            sites=self.config.sites,
            older_than=moment - timedelta(days=self.config.max_age_days),
            keep=self.config.max_faces,
        )
        if removed:
            log.info("unknown visitors: %d faces past the retention limits deleted", removed)
        return removed
