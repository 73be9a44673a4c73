"""A site's own decision rule, calibrated on its own faces (`enrollment-server calibrate`).

The encoder's default rule was fitted on a development set; a site's cameras, light and people differ. Here the
threshold of one rule (its cap kept: the encoder's for that rule) is fitted at a target FPIR with
`models.decision.rules.calibrate`, against the gallery the doors are sent: every template of every active person.

- Genuine probes: each template of a person with two or more, against the gallery without that one template
  (DIR: accepted as the right person).
- Leave-one-person-out strangers: each person's templates against the gallery without that person. A person who is
  not enrolled is a stranger, and the site's own people are the strangers most like those at its door. No door
  has filtered them, so the threshold is fitted on them.
- The doors' unknown faces (`unknown_faces`, shared when the site opted in) only constrain it: they are the faces
  the rule in force *rejected*, so the look-alikes it let in are missing and a threshold fitted on them alone is
  too loose, and looser with each recalibration. A threshold is fitted on them too and the stricter of the two
  is kept, so the rule accepts at most the target share of each set (and of both together). With few unknown
  faces their threshold sits just below the most confident one: stricter, never looser.

The result says whether the fitted rule accepts more of these strangers than the rule in force (the site's
current rule, else the encoder's default): applying it would loosen the doors. Too little data is refused
(`DatasetError`) with what is missing, because a threshold fitted on a handful of faces says nothing about the
next hundred.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray

from enrollment_server.store import SiteRule, Store
from models.contract.gallery import SiteDecision
from models.contract.timestamps import format_utc
from models.decision.rules import (
    DecisionRule,
    Neighbours,
    OperatingPoint,
    calibrate,
    operating_point,
    pairwise_distances,
    template_to_identity_distances,
)
from models.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

MIN_PROBES: Final[int] = 20
MIN_STRANGERS: Final[int] = 100
MIN_PEOPLE: Final[int] = 2
_BLOCK: Final[int] = 1024  # probes per block of template distances (1024 x 10,000 templates: 80 MB)


@dataclass(frozen=True)
class SiteCalibration:
    site: str
    fingerprint: str
    point: OperatingPoint  # the rule kept, its FPIR on all the strangers and DIR on the genuine probes
    decision: SiteDecision
    unknown_faces: int  # strangers from the doors' unknown faces
    leave_one_out: int  # strangers from the site's own people, each against the gallery without them
    leave_one_out_threshold: float  # the threshold fitted on the leave-one-out strangers
    unknown_faces_threshold: float | None  # the one fitted on the unknown faces; None without any
    in_force: DecisionRule  # the site's current rule under this encoder, else the encoder's default
    in_force_source: Literal["site", "encoder default"]
    in_force_accepted: int  # strangers the rule in force accepts, against point.n_strangers_accepted

    @property
    def looser(self) -> bool:
        """The fitted rule lets in more of the site's strangers than the rule in force."""
        return self.point.n_strangers_accepted > self.in_force_accepted

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
    store: Store,
    site: str,
    fingerprint: str,
    rule: DecisionRule,
    target_fpir: float,
    *,
    default: DecisionRule,
    now: datetime,
) -> SiteCalibration:
    """Fit `rule`'s threshold on the site's faces under `fingerprint` (module docstring); `default` is the
    encoder's default rule, in force where the site has none of its own.

    Raises DatasetError naming what is missing when there are fewer than MIN_PEOPLE people, MIN_PROBES genuine
    probes or max(MIN_STRANGERS, 1 / target_fpir) strangers; ConfigError for a target outside (0, 1).
    """
    if isinstance(target_fpir, bool) or not 0.0 < target_fpir < 1.0:
        raise ConfigError(f"the target FPIR must be a rate in (0, 1), e.g. 0.01; got {target_fpir!r}")
    data = store.site_embeddings(site, fingerprint)
    labels = np.array(data.labels, dtype=object)
    people, person_of, templates = np.unique(labels, return_inverse=True, return_counts=True)
    is_probe = templates[person_of] >= 2
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
            f"{n_probes} genuine probes, i.e. templates of people with two or more (at least {MIN_PROBES} needed: "
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

    # each template against the gallery without itself (its person's other templates remain: a genuine probe)
    own = _identity_distances(data.embeddings, data.embeddings, person_of, len(people), exclude_self=True)
    identities = np.arange(len(people))
    mates = Neighbours.from_identity_distances(own[is_probe], identities)
    own[np.arange(len(labels)), person_of] = np.inf  # and without its person: a stranger
    leave_one_out = Neighbours.from_identity_distances(own, identities)
    fits = [calibrate(rule, leave_one_out, target_fpir).rule]
    strangers = [leave_one_out]
    if unknown:
        faces = np.stack([u.face.embedding for u in unknown])
        doors = Neighbours.from_identity_distances(
            _identity_distances(faces, data.embeddings, person_of, len(people)), identities
        )
        fits.append(calibrate(rule, doors, target_fpir).rule)
        strangers.append(doors)
    kept = min(fits, key=lambda r: r.oriented_threshold)  # the stricter: lower ratio / distance, higher margin
    everyone = Neighbours.concat(strangers)
    point = operating_point(kept, everyone, target_fpir, mates=mates, mate_labels=person_of[is_probe])
    current = store.site_decision(site, fingerprint)
    in_force = default if current is None else current.rule
    in_force_accepted = int(np.count_nonzero(in_force.accepts(everyone)))
    decision = SiteDecision(point.rule, point.target_fpir, len(people), n_probes, n_strangers, format_utc(now))
    log.info(
        "site %s calibrated: %s at FPIR %.4g (target %g), DIR %.3f on %d genuine probes, %d strangers; "
        "thresholds %s (leave-one-out) and %s (unknown faces)",
        site,
        point.rule.to_dict(),
        point.fpir,
        target_fpir,
        point.dir or 0.0,
        n_probes,
        n_strangers,
        fits[0].threshold,
        fits[1].threshold if unknown else None,
    )
    return SiteCalibration(
        site,
        fingerprint,
        point,
        decision,
        len(unknown),
        len(labels),
        fits[0].threshold,
        fits[1].threshold if unknown else None,
        in_force,
        "encoder default" if current is None else "site",
        in_force_accepted,
    )


def _identity_distances(
    probes: np.ndarray, gallery: np.ndarray, person_of: np.ndarray, people: int, *, exclude_self: bool = False
) -> NDArray[np.float64]:
    """(probes, people): each probe's distance to each person's nearest template in `gallery` (template j of
    person `person_of[j]`); with `exclude_self`, probe i is gallery template i and does not see itself."""
    out = np.empty((len(probes), people))
    for start in range(0, len(probes), _BLOCK):  # a block of template distances, not all of them at once
        block = pairwise_distances(probes[start : start + _BLOCK], gallery)
        if exclude_self:
            rows = np.arange(len(block))
            block[rows, start + rows] = np.inf
        out[start : start + len(block)] = template_to_identity_distances(block, person_of)[0]
    return out
