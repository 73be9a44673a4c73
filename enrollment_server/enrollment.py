"""Enrollment: photos in, quality-gated templates out, one specific verdict per photo.

Per photo: decode (ImageError -> unreadable), detect/align/encode, the photo gates (models of
models.face.quality), then duplicates: the same image bytes (sha256) or a template this close to one the
person already has adds nothing. Identity checks, skipped only when the admin insists (`allow_duplicate_identity`):

- a *new* person whose face already matches someone enrolled at the site under `duplicate_identity_distance`, or
  whom the site's own rule would let in as someone enrolled, is flagged as a probable duplicate identity and not
  created;
- a photo added to an *existing* person is refused on its own when it matches someone else enrolled (probable
  duplicate identity: within that distance of someone else, or let in as someone else by the site's rule applied
  to the whole gallery, that person included, as a door would), or when it is farther than
  `same_person_distance` from every template the person already has (`not_this_person`): a mixed-up upload must
  not enrol another person, or a stranger nobody enrolled, under that name. Their other photos still go in.

The identity checks use the same open-set decision rules as the edges (models.decision.rules): the
duplicate-identity distance, and the site's own calibrated rule where it has one (`enrollment-server calibrate`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from enrollment_server.config import EnrollmentSection
from enrollment_server.store import Store, TemplateQuality
from models.decision.rules import DecisionRule, Neighbours
from models.errors import ConflictError, ImageError, NotFoundError
from models.face import quality as q
from models.face.pipeline import FacePipeline
from models.imageio import IMAGE_SUFFIXES, encode_jpeg, load_image

log = logging.getLogger(__name__)

THUMBNAIL_QUALITY = 85  # the aligned 150 px chip: about 5 KB


@dataclass(frozen=True)
class PhotoResult:
    source: str
    accepted: bool
    reason: str | None
    message: str
    figures: q.FaceFigures | None = None
    template_id: int | None = None
    matched_person: str | None = None
    distance: float | None = None

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "accepted": self.accepted,
            "reason": self.reason,
            "message": self.message,
            "figures": self.figures.to_json() if self.figures else None,
            "template_id": self.template_id,
            "matched_person": self.matched_person,
            "distance": None if self.distance is None else round(self.distance, 4),
        }


@dataclass(frozen=True)
class EnrollReport:
    person_id: str
    person_created: bool
    results: tuple[PhotoResult, ...] = field(default_factory=tuple)

    @property
    def added(self) -> int:
        return sum(r.accepted for r in self.results)

    def to_json(self) -> dict:
        return {
            "person_id": self.person_id,
            "person_created": self.person_created,
            "added": self.added,
            "rejected": len(self.results) - self.added,
            "photos": [r.to_json() for r in self.results],
        }


@dataclass(frozen=True)
class _Candidate:
    source: str
    data: bytes
    sha256: str
    embedding: np.ndarray
    figures: q.FaceFigures
    thumbnail: bytes | None
    note: str = ""  # what the gate chose, e.g. "the largest of 3 faces"


class Enroller:
    def __init__(self, store: Store, pipeline: FacePipeline, config: EnrollmentSection) -> None:
        self.store = store
        self.pipeline = pipeline
        self.config = config
        self.fingerprint = pipeline.fingerprint
        self._identity_rule = DecisionRule.distance(config.duplicate_identity_distance)
        # the face pipeline (ONNX sessions, aligner state) is not thread-safe: one enrollment at a time
        self._lock = threading.Lock()

    def enroll(
        self,
        person_id: str,
        name: str,
        site: str,
        photos: Sequence[tuple[str, bytes]],
        *,
        allow_duplicate_identity: bool = False,
    ) -> EnrollReport:
        """Add the photos that pass every gate to the person, creating the person when new (thread-safe)."""
        with self._lock:
            return self._enroll(person_id, name, site, photos, allow_duplicate_identity=allow_duplicate_identity)

    def _enroll(
        self,
        person_id: str,
        name: str,
        site: str,
        photos: Sequence[tuple[str, bytes]],
        *,
        allow_duplicate_identity: bool,
    ) -> EnrollReport:
        self.store.ensure_site(site)
        try:
            person = self.store.get_person(person_id)
            existing = True
            if person.site_id != site:
                raise ConflictError(f"person {person_id!r} is enrolled at site {person.site_id!r}, not {site!r}")
        except NotFoundError:
            existing = False
        results: list[PhotoResult] = []
        candidates: list[_Candidate] = []
        known = self._person_embeddings(person_id) if existing else np.zeros((0, 0), np.float32)
        for source, data in photos:
            verdict, candidate = self._gate(source, data)
            if candidate is None:
                results.append(verdict)
                continue
            near = self._near_duplicate(candidate.embedding, [known, *(c.embedding[None] for c in candidates)])
            if near is not None:
                results.append(
                    PhotoResult(
                        source,
                        False,
                        q.DUPLICATE_TEMPLATE,
                        f"adds nothing: {near:.3f} from a template this person already has",
                        candidate.figures,
                        distance=near,
                    )
                )
                continue
            candidates.append(candidate)
        if candidates and existing and not allow_duplicate_identity:
            candidates = self._belong_to_person(site, person_id, known, candidates, results)
        if candidates and not existing and not allow_duplicate_identity:
            match = self._matches_someone(site, person_id, np.stack([c.embedding for c in candidates]))
            if match is not None:
                other, distance = match
                msg = (
                    f"looks like already enrolled {other!r} (distance {distance:.3f}); "
                    "enroll with the duplicate-identity override if they are different people"
                )
                results.extend(
                    PhotoResult(
                        c.source,
                        False,
                        q.PROBABLE_DUPLICATE_IDENTITY,
                        msg,
                        c.figures,
                        matched_person=other,
                        distance=distance,
                    )
                    for c in candidates
                )
                return EnrollReport(person_id, False, tuple(self._in_order(photos, results)))
        created = False
        if candidates and not existing:
            self.store.add_person(person_id, site, name)
            created = True
        for c in candidates:
            try:
                template = self.store.add_template(
                    person_id,
                    c.embedding,
                    encoder_fingerprint=self.fingerprint,
                    image_sha256=c.sha256,
                    quality=TemplateQuality(
                        detector_score=c.figures.detector_score,
                        face_size_px=c.figures.face_px,
                        blur=c.figures.blur,
                        pose_score=max(0.0, 1.0 - abs(c.figures.yaw) / max(self.config.quality.max_yaw, 1e-6)),
                    ),
                    photo=c.data if self.config.keep_photos else None,
                    thumbnail=c.thumbnail,
                )
            except ConflictError:
                results.append(
                    PhotoResult(
                        c.source,
                        False,
                        q.DUPLICATE_IMAGE,
                        "this exact image is already enrolled for this person",
                        c.figures,
                    )
                )
                continue
            message = f"enrolled ({c.note})" if c.note else "enrolled"
            results.append(PhotoResult(c.source, True, None, message, c.figures, template_id=template.id))
        log.info(
            "enroll %s at %s: %d of %d photos added", person_id, site, sum(r.accepted for r in results), len(photos)
        )
        return EnrollReport(person_id, created, tuple(self._in_order(photos, results)))

    @staticmethod
    def _in_order(photos: Sequence[tuple[str, bytes]], results: list[PhotoResult]) -> list[PhotoResult]:
        rank = {source: i for i, (source, _) in enumerate(photos)}
        return sorted(results, key=lambda r: rank.get(r.source, len(rank)))

    def _gate(self, source: str, data: bytes) -> tuple[PhotoResult, _Candidate | None]:
        try:
            image = load_image(data)
        except ImageError as exc:
            return PhotoResult(source, False, q.UNREADABLE, str(exc).replace("<bytes>: ", "")), None
        faces = self.pipeline.embed(image)
        chips = self.pipeline.aligner.align(image, [f.detection for f in faces])
        verdict = q.assess_photo(faces, chips, self.config.quality)
        if not verdict.accepted or verdict.figures is None:
            return PhotoResult(source, False, verdict.reason, verdict.message, verdict.figures), None
        face = verdict.face  # the photo's one face, or its dominant one
        thumbnail = encode_jpeg(chips[face], THUMBNAIL_QUALITY) if self.config.keep_thumbnails else None
        return PhotoResult(source, True, None, verdict.message, verdict.figures), _Candidate(
            source,
            data,
            q.image_sha256(data),
            faces[face].embedding,
            verdict.figures,
            thumbnail,
            verdict.message.removeprefix("ok").removeprefix(": "),
        )

    def _belong_to_person(
        self, site: str, person_id: str, known: np.ndarray, candidates: list[_Candidate], results: list[PhotoResult]
    ) -> list[_Candidate]:
        """The candidates that may join an existing person; a verdict in `results` for each one that may not."""
        kept = []
        others = self._others_matched(site, person_id, np.stack([c.embedding for c in candidates]))
        for c, other in zip(candidates, others, strict=True):
            if other is not None:
                who, distance = other
                results.append(
                    PhotoResult(
                        c.source,
                        False,
                        q.PROBABLE_DUPLICATE_IDENTITY,
                        f"looks like {who!r}, enrolled under another id (distance {distance:.3f}), not {person_id!r}; "
                        "add it with the duplicate-identity override if it really is this person",
                        c.figures,
                        matched_person=who,
                        distance=distance,
                    )
                )
                continue
            if known.size:
                own = float(np.linalg.norm(known - c.embedding, axis=1).min())
                if own > self.config.same_person_distance:
                    results.append(
                        PhotoResult(
                            c.source,
                            False,
                            q.NOT_THIS_PERSON,
                            f"does not look like {person_id!r}: {own:.3f} from the nearest of their templates "
                            f"(the limit is {self.config.same_person_distance}); add it with the duplicate-identity "
                            "override if it really is this person",
                            c.figures,
                            distance=own,
                        )
                    )
                    continue
            kept.append(c)
        return kept

    def _person_embeddings(self, person_id: str) -> np.ndarray:
        rows = [t.embedding for t in self.store.list_templates(person_id=person_id, fingerprint=self.fingerprint)]
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def _near_duplicate(self, embedding: np.ndarray, others: Sequence[np.ndarray]) -> float | None:
        pool = [o for o in others if o.size]
        if not pool:
            return None
        d = float(np.linalg.norm(np.concatenate(pool) - embedding, axis=1).min())
        return d if d < self.config.quality.duplicate_template_distance else None

    def _matches_someone(self, site: str, person_id: str, embeddings: np.ndarray) -> tuple[str, float] | None:
        """The nearest other person any of `embeddings` is accepted as, if any."""
        hits = [h for h in self._others_matched(site, person_id, embeddings) if h is not None]
        return min(hits, key=lambda h: h[1]) if hits else None

    def _others_matched(self, site: str, person_id: str, embeddings: np.ndarray) -> list[tuple[str, float] | None]:
        """Per embedding, the person other than `person_id` it is taken for (with the distance): someone else
        within the duplicate-identity distance, or someone else the site's own rule would let it in as at a door.

        The door sees the whole gallery, `person_id` included when they are enrolled: a new photo of an enrolled
        person that the door would let in as that person is no one else's face. The site's rule accepts only
        d1 <= its cap (ratio, margin) or threshold (distance), so it flags more than the duplicate-identity
        distance only where that bound is the larger; with dlib's defaults (cap = duplicate distance = 0.5) a
        ratio or margin rule adds nothing, a lenient site distance rule does.
        """
        gallery = self.store.site_embeddings(site, self.fingerprint)
        labels = np.array(gallery.labels, dtype=object)
        others = labels != person_id
        if not others.any():
            return [None] * len(embeddings)
        nb = Neighbours.from_embeddings(embeddings, gallery.embeddings[others], labels[others])
        accepted = self._identity_rule.accepts(nb)
        site_rule = self.store.site_decision(site, self.fingerprint)
        if site_rule is not None:
            door = Neighbours.from_embeddings(embeddings, gallery.embeddings, labels)
            # when the door's nearest is someone else, it is the nearest other person in `nb` too
            accepted |= site_rule.rule.accepts(door) & (door.label1 != person_id)
        nearest = self._identity_rule.decide(nb)  # the other person and the distance, whichever rule accepted
        return [
            (d.candidate, d.distance) if ok and d.candidate is not None else None
            for d, ok in zip(nearest, accepted, strict=True)
        ]


def person_folders(root: Path) -> list[tuple[str, list[Path]]]:
    """(person_id, photos) for each sub-folder of root; the folder name is the person id (and default name)."""
    if not root.is_dir():
        raise ImageError(f"{root}: not a folder (expected one sub-folder of photos per person)")
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        photos = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        out.append((folder.name, photos))
    if not out:
        raise ImageError(f"{root}: no person sub-folders")
    return out


def import_folder(
    enroller: Enroller,
    root: Path,
    site: str,
    *,
    allow_duplicate_identity: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[EnrollReport]:
    reports = []
    for person_id, photos in person_folders(root):
        blobs = []
        for p in photos:
            try:
                blobs.append((str(p), p.read_bytes()))
            except OSError as exc:
                blobs.append((str(p), b""))
                log.warning("%s: cannot read (%s)", p, exc)
        name = person_id.replace("_", " ")
        reports.append(enroller.enroll(person_id, name, site, blobs, allow_duplicate_identity=allow_duplicate_identity))
        if progress:
            progress(len(photos))
    return reports
