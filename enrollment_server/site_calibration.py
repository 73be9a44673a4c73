"""A site's own decision rule, calibrated on its own faces (`enrollment-server calibrate`).

The encoder's default rule was fitted on a development set; a site's cameras, light and people differ. Here the
threshold of one rule (its cap kept: the encoder's for that rule) is fitted at a target FPIR with
`models.decision.rules.calibrate`, on:

- the gallery: one template per active person (their first), as a site that enrols from one photo has;
- genuine probes: every other template of those people, against that gallery (DIR: accepted as the right person);
- strangers: the site's stored unknown faces (`unknown_faces`, shared by its doors when the site opted in), and
  leave-one-person-out, i.e. every template of each person against the gallery without them: a person who is not
  enrolled is a stranger, and the site's own people are the strangers most like those at its door.

Unknown faces are what the doors could not name: some may be enrolled people who were turned away, which makes
the threshold stricter, never looser. Too little data is refused (`DatasetError`) with what is missing, because a
threshold fitted on a handful of faces says nothing about the next hundred.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import numpy as np

from enrollment_server.store import SiteRule, Store
from models.contract.gallery import SiteDecision
from models.contract.timestamps import format_utc
from models.decision.rules import DecisionRule, Neighbours, OperatingPoint, calibrate, pairwise_distances
from models.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

MIN_PROBES: Final[int] = 20
MIN_STRANGERS: Final[int] = 100
MIN_PEOPLE: Final[int] = 2


@dataclass(frozen=True)
class SiteCalibration:
    site: str
    fingerprint: str
    point: OperatingPoint  # the calibrated rule, its FPIR on the strangers and DIR on the genuine probes
    decision: SiteDecision
    unknown_faces: int  # strangers from the doors' unknown faces
    leave_one_out: int  # strangers from the site's own people, each against the gallery without them

    def site_rule(self) -> SiteRule:
        return SiteRule(self.site, self.fingerprint, self.decision, self.point.fpir, self.point.dir)


def describe_rule(default: DecisionRule, site: SiteDecision | None) -> str:
    """The site's rule in one line for people: "ratio 0.84, cap 0.50 — calibrated 2026-12-06 on 212 people /
    3,000 strangers at 1 % strangers accepted", or "encoder default (ratio 0.82, cap 0.50)"."""

    def rule_text(rule: DecisionRule) -> str:
        text = f"{rule.rule} {rule.threshold:.2f}" if math.isfinite(rule.threshold) else f"{rule.rule} inf"
        if rule.max_distance is not None:
            text += f", cap {rule.max_distance:.2f}" if math.isfinite(rule.max_distance) else ", no cap"
        return text

    if site is None:
        return f"encoder default ({rule_text(default)})"
    return (
        f"{rule_text(site.rule)} — calibrated {site.calibrated[:10]} on {site.people:,} people / "
        f"{site.strangers:,} strangers at {site.target_fpir * 100:g} % strangers accepted"
    )


def calibrate_site(
    store: Store, site: str, fingerprint: str, rule: DecisionRule, target_fpir: float, *, now: datetime
) -> SiteCalibration:
    """Fit `rule`'s threshold on the site's faces under `fingerprint` (module docstring).

    Raises DatasetError naming what is missing when there are fewer than MIN_PEOPLE people, MIN_PROBES genuine
    probes or max(MIN_STRANGERS, 1 / target_fpir) strangers; ConfigError for a target outside (0, 1).
    """
    if isinstance(target_fpir, bool) or not 0.0 < target_fpir < 1.0:
        raise ConfigError(f"the target FPIR must be a rate in (0, 1), e.g. 0.01; got {target_fpir!r}")
    data = store.site_embeddings(site, fingerprint)
    labels = np.array(data.labels, dtype=object)
    people, first = np.unique(labels, return_index=True)  # rows are ordered by person, then template id
    person_of = np.searchsorted(people, labels)
    is_probe = np.ones(len(labels), dtype=bool)
    is_probe[first] = False
    unknown = store.list_unknown_faces(site, fingerprint=fingerprint)
    n_probes = int(is_probe.sum())
    n_strangers = len(unknown) + len(labels)
    # fewer than 1 / target strangers cannot show a single false accept at the target
    needed_strangers = max(MIN_STRANGERS, math.ceil(1.0 / target_fpir - 1e-9))
    missing = []
    if len(people) < MIN_PEOPLE:
        missing.append(f"{len(people)} enrolled people (at least {MIN_PEOPLE} needed)")
    if n_probes < MIN_PROBES:
        missing.append(
            f"{n_probes} genuine probes, i.e. templates beyond each person's first (at least {MIN_PROBES} needed: "
            "enrol a second photo of more people)"
        )
    if n_strangers < needed_strangers:
        missing.append(
            f"{n_strangers} strangers ({len(unknown)} unknown faces from the doors + {len(labels)} leave-one-out; "
            f"at least {needed_strangers} needed at FPIR {target_fpir:g}: share the doors' unknown faces "
            "(unknown_faces.share, unknown_visitors.sites) for longer, or enrol more people)"
        )
    if missing:
        raise DatasetError(f"site {site} cannot be calibrated under encoder {fingerprint}: {'; '.join(missing)}")

    gallery = data.embeddings[first]
    identities = np.arange(len(people))
    own = pairwise_distances(data.embeddings, gallery)
    mates = Neighbours.from_identity_distances(own[is_probe], identities)
    own[np.arange(len(labels)), person_of] = np.inf  # each template against the gallery without its person
    strangers = [Neighbours.from_identity_distances(own, identities)]
    if unknown:
        faces = np.stack([u.face.embedding for u in unknown])
        strangers.append(Neighbours.from_identity_distances(pairwise_distances(faces, gallery), identities))
    point = calibrate(rule, Neighbours.concat(strangers), target_fpir, mates=mates, mate_labels=person_of[is_probe])
    decision = SiteDecision(point.rule, point.target_fpir, len(people), n_probes, n_strangers, format_utc(now))
    log.info(
        "site %s calibrated: %s at FPIR %.4g (target %g), DIR %.3f on %d genuine probes, %d strangers",
        site,
        point.rule.to_dict(),
        point.fpir,
        target_fpir,
        point.dir or 0.0,
        n_probes,
        n_strangers,
    )
    return SiteCalibration(site, fingerprint, point, decision, len(unknown), len(labels))
