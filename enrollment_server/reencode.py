"""`enrollment-server reencode`: bring templates made by another encoder into the server's current one.

A template's embedding is only comparable under the encoder fingerprint it was made with. When an upgrade changes
the encoder's space (issue 13 made dlib embeddings the mean of each chip and its mirror image) or a site moves to
another encoder, every stored template falls out of the galleries until it is made again. The server can make it
again without the person, from what it kept of the enrollment:

- the enrollment photo (`enrollment.keep_photos`): detected, aligned and encoded exactly as enrollment does, the
  photo's one face or its dominant one (the quality gate's choice);
- otherwise the aligned chip kept as the template's thumbnail (JPEG, schema 3): encoded directly when the chip fits
  the current encoder, i.e. the old fingerprint is of the same model (same weights, so the same chip size and
  alignment family). The JPEG round trip moves an embedding by a few hundredths, well under the distance of
  two photos of a person;
- otherwise nothing can be done: the template is reported, and its person must be enrolled again.

The template is updated in place (its id, photo, thumbnail and quality figures stay), so a site's history and the
console's crops are kept; back up the database first if you may go back to the old version.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from enrollment_server.store import Store, Template
from models.errors import ImageError
from models.face import quality as q
from models.face.pipeline import FacePipeline
from models.imageio import load_image

log = logging.getLogger(__name__)

FROM_PHOTO, FROM_CHIP = "photo", "chip"


@dataclass(frozen=True)
class Left:
    """A template that could not be made again, and why."""

    template_id: int
    person_id: str
    fingerprint: str
    reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ReencodeReport:
    site: str
    fingerprint: str  # the current one
    foreign: int  # templates of another encoder found
    from_photo: int
    from_chip: int
    left: tuple[Left, ...]
    dry_run: bool

    @property
    def reencoded(self) -> int:
        return self.from_photo + self.from_chip

    def to_json(self) -> dict:
        return {
            "site": self.site,
            "fingerprint": self.fingerprint,
            "foreign_templates": self.foreign,
            "reencoded": {FROM_PHOTO: self.from_photo, FROM_CHIP: self.from_chip},
            "left": [x.to_json() for x in self.left],
            "dry_run": self.dry_run,
        }


def _model_of(fingerprint: str) -> str:
    """The model name a fingerprint value starts with ("<model name>-<hash>", models/face/fingerprint.py)."""
    return fingerprint.rsplit("-", 1)[0]


class Reencoder:
    def __init__(self, store: Store, pipeline: FacePipeline) -> None:
        self._store = store
        self._pipeline = pipeline
        self.fingerprint = pipeline.fingerprint
        self._model = pipeline.encoder.spec.manifest.name
        self._chip = pipeline.encoder.spec.chip_size

    def run(self, site: str, *, dry_run: bool = False, progress: Callable[[int], None] | None = None) -> ReencodeReport:
        self._store.get_site(site)  # NotFoundError for an unknown site
        foreign = [t for t in self._store.list_templates(site_id=site) if t.encoder_fingerprint != self.fingerprint]
        counts = {FROM_PHOTO: 0, FROM_CHIP: 0}
        left: list[Left] = []
        for template in foreign:
            try:
                how, embedding = self._embedding(template)
            except _CannotReencode as exc:
                left.append(Left(template.id, template.person_id, template.encoder_fingerprint, str(exc)))
            else:
                counts[how] += 1
                if not dry_run:
                    self._store.replace_embedding(template.id, embedding, encoder_fingerprint=self.fingerprint)
            if progress is not None:
                progress(1)
        report = ReencodeReport(
            site, self.fingerprint, len(foreign), counts[FROM_PHOTO], counts[FROM_CHIP], tuple(left), dry_run
        )
        log.info(
            "site %s: %d templates of another encoder, %d made again from photos, %d from chips, %d left%s",
            site,
            report.foreign,
            report.from_photo,
            report.from_chip,
            len(report.left),
            " (dry run: nothing stored)" if dry_run else "",
        )
        return report

    def _embedding(self, template: Template) -> tuple[str, np.ndarray]:
        photo = self._store.template_photo(template.id)
        if photo is not None:
            return FROM_PHOTO, self._from_photo(photo)
        chip = self._store.template_thumbnail(template.id)
        if chip is None:
            raise _CannotReencode("neither the photo nor the aligned chip was kept: enroll the person again")
        if _model_of(template.encoder_fingerprint) != self._model:
            raise _CannotReencode(
                f"made by model {_model_of(template.encoder_fingerprint)}, whose chip does not fit {self._model}; "
                "no photo kept: enroll the person again"
            )
        return FROM_CHIP, self._from_chip(chip)

    def _from_photo(self, data: bytes) -> np.ndarray:
        try:
            image = load_image(data)
        except ImageError as exc:
            raise _CannotReencode(f"the kept photo is unreadable ({exc})") from exc
        faces = self._pipeline.embed(image)
        chips = self._pipeline.aligner.align(image, [f.detection for f in faces])
        verdict = q.assess_photo(faces, chips, q.QualityConfig(min_detector_score=0.0, min_blur=0.0))
        if verdict.reason in (q.NO_FACE, q.SEVERAL_FACES):
            raise _CannotReencode(f"the kept photo: {verdict.message}")
        return faces[verdict.face].embedding

    def _from_chip(self, data: bytes) -> np.ndarray:
        try:
            chip = load_image(data)
        except ImageError as exc:
            raise _CannotReencode(f"the kept chip is unreadable ({exc})") from exc
        if chip.shape != (self._chip, self._chip, 3):
            raise _CannotReencode(f"the kept chip is {chip.shape[1]}x{chip.shape[0]}, the encoder takes {self._chip}")
        return self._pipeline.encoder.encode(chip[None])[0]


class _CannotReencode(Exception):
    """Why one template cannot be made again (reported per template, never raised out of the module)."""
