"""Thresholds for a target false accept rate, with bootstrap confidence intervals, as a decision-config fragment.

- distance rule (1:1 verification): from every genuine and impostor pair of a labelled dataset, the largest
  distance that accepts at most ``target`` of the impostor pairs (``models.decision.rules.calibrate``, which counts
  accepted impostors exactly); TAR on the genuine pairs.
- margin and ratio rules (open set): strangers are every image against a gallery of every *other* identity's
  images (leave-one-identity-out), mates every image against the gallery of all other images (several templates
  per person, as a site enrols). Calibrated at ``target`` FPIR; DIR on the mates. The gallery stays fixed in the
  bootstrap (only the probes are resampled), so these intervals are somewhat narrower than the truth.

Bootstrap: pairs that share a person are not independent (one odd photo makes many odd pairs), so the resampling
unit is the identity: identities are drawn with replacement and every pair is weighted by how often its people
were drawn (a pair of two copies of one person is left out). The interval is the percentile interval of the
threshold (and of TAR / DIR) over the resamples.

The output (``decision_fragment``) is YAML whose ``decision`` mapping is exactly what
``models.decision.rules.DecisionRule.from_dict`` reads (rule, threshold, max_distance); everything else, the interval
and the encoder fingerprint included, is comments, because the strict loader rejects unknown keys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from models.decision.rules import (
    DecisionRule,
    Neighbours,
    OperatingPoint,
    calibrate,
    pairwise_distances,
    template_to_identity_distances,
)
from models.errors import ConfigError, DatasetError
from models.evaluation.scoring import PairMetric
from models.training.dataset import MIN_IMAGES, LabelledEmbeddings

log = logging.getLogger(__name__)

DECISION_SECTION: Final[str] = "decision"
_PAIR_CHUNK: Final[int] = 1 << 16


def check_target(name: str, target: float) -> float:
    """A FAR / FPIR target must be a number in (0, 1): ConfigError otherwise (before any long work starts)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) < 1.0:
        raise ConfigError(f"{name} must be a rate in (0, 1), e.g. 1e-3; got {target!r}")
    return float(target)


@dataclass(frozen=True)
class CalibrationSettings:
    n_bootstrap: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_bootstrap < 0:
            raise ConfigError(f"bootstrap resamples must be >= 0, got {self.n_bootstrap}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"confidence level must be in (0, 1), got {self.level}")


@dataclass(frozen=True, eq=False)
class PairScores:
    """Every pair of a labelled dataset: dissimilarities and the identity index of each side."""

    genuine: NDArray[np.float64]
    genuine_identity: NDArray[np.int64]
    impostor: NDArray[np.float64]
    impostor_identities: NDArray[np.int64]  # (m, 2)
    n_identities: int


def pair_scores(data: LabelledEmbeddings, metric: PairMetric | None = None) -> PairScores:
    """All n (n - 1) / 2 pairs; Euclidean distance unless ``metric`` (e.g. a verifier) is given."""
    codes = data.label_codes()
    i, j = np.triu_indices(len(data), 1)
    if metric is None:
        d = pairwise_distances(data.vectors, data.vectors)[i, j]
    else:
        d = np.concatenate(
            [
                np.asarray(metric(data.vectors[i[s : s + _PAIR_CHUNK]], data.vectors[j[s : s + _PAIR_CHUNK]]))
                for s in range(0, i.size, _PAIR_CHUNK)
            ]
            or [np.empty(0)]
        ).astype(np.float64)
    same = codes[i] == codes[j]
    if not same.any() or same.all():
        raise DatasetError(
            f"too few identities to calibrate: {int(same.sum())} genuine and {int((~same).sum())} impostor pairs "
            f"({len(data.identities)} identities; needs two, one of them with >= {MIN_IMAGES} images)"
        )
    return PairScores(
        genuine=d[same],
        genuine_identity=codes[i[same]],
        impostor=d[~same],
        impostor_identities=np.c_[codes[i[~same]], codes[j[~same]]],
        n_identities=len(data.identities),
    )


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    level: float
    resamples: int  # resamples that could be calibrated (some may lack a genuine or an impostor pair)


@dataclass(frozen=True)
class RuleCalibration:
    """One rule at one target: the operating point on the whole data (``point.dir`` is TAR for the distance rule
    on pairs, DIR for the open-set rules) and bootstrap intervals of the threshold and of that rate."""

    basis: Literal["pairs", "open-set"]
    point: OperatingPoint
    threshold_interval: Interval | None
    rate_interval: Interval | None

    @property
    def rule(self) -> DecisionRule:
        return self.point.rule

    def to_dict(self) -> dict[str, Any]:
        def iv(x: Interval | None) -> dict[str, float] | None:
            return None if x is None else {"low": x.low, "high": x.high, "level": x.level, "resamples": x.resamples}

        return {
            "basis": self.basis,
            **self.point.to_dict(),
            "threshold_interval": iv(self.threshold_interval),
            "rate_interval": iv(self.rate_interval),
        }


def _interval(values: Sequence[float], level: float, resamples: int) -> Interval | None:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    return Interval(float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)), level, resamples)


def _identity_weights(rng: np.random.Generator, n: int) -> NDArray[np.int64]:
    return rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.int64)


def calibrate_pairs(
    scores: PairScores,
    target_far: float,
    settings: CalibrationSettings = CalibrationSettings(),
) -> RuleCalibration:
    """The distance rule's threshold at ``target_far`` on the impostor pairs, TAR on the genuine ones, with
    identity-bootstrap intervals."""
    target = check_target("target FAR", target_far)
    base = DecisionRule.distance()
    point = calibrate(base, scores.impostor, target, mates=scores.genuine)
    if not point.resolvable:
        log.warning(
            "calibrate: FAR %g is finer than 1 / %d impostor pairs: the threshold sits below the closest impostor",
            target,
            point.n_strangers,
        )
    rng = np.random.default_rng(settings.seed)
    thresholds: list[float] = []
    rates: list[float] = []
    for _ in range(settings.n_bootstrap):
        w = _identity_weights(rng, scores.n_identities)
        wi = w[scores.impostor_identities[:, 0]] * w[scores.impostor_identities[:, 1]]
        wg = w[scores.genuine_identity]
        if not wi.any() or not wg.any():
            continue
        p = calibrate(base, np.repeat(scores.impostor, wi), target, mates=np.repeat(scores.genuine, wg))
        thresholds.append(p.rule.threshold)
        rates.append(float("nan") if p.dir is None else p.dir)
    n = len(thresholds)
    return RuleCalibration(
        "pairs", point, _interval(thresholds, settings.level, n), _interval(rates, settings.level, n)
    )


def open_set_neighbours(data: LabelledEmbeddings) -> tuple[Neighbours, NDArray[np.object_], Neighbours]:
    """(mates, their true identities, strangers) over a gallery of all the dataset's images; see the module doc."""
    labels = np.array(data.labels, dtype=object)
    d = pairwise_distances(data.vectors, data.vectors)
    np.fill_diagonal(d, np.inf)  # a probe is never its own template
    per_identity, identities = template_to_identity_distances(d, labels)
    column = {name: k for k, name in enumerate(identities)}
    own = np.array([column[x] for x in labels])
    counts = data.counts()
    mate_rows = np.array([k for k, x in enumerate(labels) if counts[x] >= MIN_IMAGES], dtype=np.int64)
    mates = Neighbours.from_identity_distances(per_identity[mate_rows], identities)
    hidden = per_identity.copy()
    hidden[np.arange(len(labels)), own] = np.inf  # leave the probe's own identity out of the gallery
    strangers = Neighbours.from_identity_distances(hidden, identities)
    return mates, labels[mate_rows], strangers


def calibrate_open_set(
    data: LabelledEmbeddings,
    rule: DecisionRule,
    target_fpir: float,
    settings: CalibrationSettings = CalibrationSettings(),
) -> RuleCalibration:
    """``rule``'s threshold at ``target_fpir`` on leave-one-identity-out strangers, DIR on the mates, with
    intervals from resampling the probes' identities."""
    target = check_target("target FPIR", target_fpir)
    if len(data.identities) < 2:
        raise DatasetError(f"too few identities to calibrate an open-set rule: {len(data.identities)}, needs 2")
    mates, truth, strangers = open_set_neighbours(data)
    point = calibrate(rule, strangers, target, mates=mates if len(mates) else None, mate_labels=truth)
    codes = data.label_codes()
    counts = data.counts()
    mate_codes = codes[[k for k, x in enumerate(data.labels) if counts[x] >= MIN_IMAGES]]
    rng = np.random.default_rng(settings.seed)
    thresholds: list[float] = []
    rates: list[float] = []
    for _ in range(settings.n_bootstrap):
        w = _identity_weights(rng, len(data.identities))
        ws, wm = w[codes], w[mate_codes]
        if not ws.any():
            continue
        s_rows = np.repeat(np.arange(len(strangers)), ws)
        m_rows = np.repeat(np.arange(len(mates)), wm)
        p = calibrate(
            rule,
            strangers.take(s_rows),
            target,
            mates=mates.take(m_rows) if m_rows.size else None,
            mate_labels=truth[m_rows],
        )
        thresholds.append(p.rule.threshold)
        rates.append(float("nan") if p.dir is None else p.dir)
    n = len(thresholds)
    return RuleCalibration(
        "open-set", point, _interval(thresholds, settings.level, n), _interval(rates, settings.level, n)
    )


def _describe(c: RuleCalibration) -> list[str]:
    p = c.point
    if c.basis == "pairs":
        head = (
            f"{p.rule.rule} rule: target FAR {p.target_fpir:g} on {p.n_strangers} impostor pairs -> FAR {p.fpir:.4g} "
            f"({p.n_strangers_accepted} accepted), TAR {p.dir:.3f} on {p.n_mates} genuine pairs"
        )
    else:
        rate = "-" if p.dir is None else f"{p.dir:.3f}"
        head = (
            f"{p.rule.rule} rule: target FPIR {p.target_fpir:g} on {p.n_strangers} leave-one-identity-out strangers "
            f"-> FPIR {p.fpir:.4g} ({p.n_strangers_accepted} accepted), DIR {rate} on {p.n_mates} mates"
        )
    lines = [head]
    if not p.resolvable:
        lines.append("  NOT RESOLVABLE: the target is finer than 1 / sample size; the threshold is an optimistic bound")
    t, r = c.threshold_interval, c.rate_interval
    if t is not None:
        rate_name = "TAR" if c.basis == "pairs" else "DIR"
        extra = f", {rate_name} [{r.low:.3f}, {r.high:.3f}]" if r is not None else ""
        lines.append(
            f"  {t.level:.0%} bootstrap interval ({t.resamples} identity resamples): "
            f"threshold [{t.low:.4f}, {t.high:.4f}]{extra}"
        )
    return lines


def _yaml_number(x: float) -> str:
    # repr round-trips exactly: a rounded threshold could sit above the last rejected impostor
    return ".inf" if math.isinf(x) else repr(float(x))


def _rule_yaml(rule: DecisionRule) -> dict[str, str]:
    out = {"rule": rule.rule, "threshold": _yaml_number(rule.threshold)}
    if rule.max_distance is not None:
        out["max_distance"] = _yaml_number(rule.max_distance)
    return out


def decision_fragment(
    calibrations: Sequence[RuleCalibration],
    active: str,
    *,
    fingerprint: str,
    source: str,
) -> str:
    """YAML text: comments with the figures and intervals, then the ``decision`` section with the ``active``
    rule's calibration (the others as commented alternatives). Checked by parsing it back before it is returned."""
    chosen = [c for c in calibrations if c.rule.rule == active]
    if len(chosen) != 1:
        raise ConfigError(f"calibrate: no single calibration of the {active!r} rule to write")
    lines = [
        f"# faceattend decision rule, calibrated by {source}",
        f"# valid only for encoder fingerprint {fingerprint}: recalibrate after any encoder, alignment or adapter",
        "# change. Figures on the calibration data:",
    ]
    lines += [f"#   {x}" for c in calibrations for x in _describe(c)]
    for c in calibrations:
        if c is not chosen[0]:
            inline = ", ".join(f"{k}: {v}" for k, v in _rule_yaml(c.rule).items())
            lines.append(f"# alternative: {DECISION_SECTION}: {{{inline}}}")
    lines.append(f"{DECISION_SECTION}:")
    lines += [f"  {k}: {v}" for k, v in _rule_yaml(chosen[0].rule).items()]
    text = "\n".join(lines) + "\n"
    if parse_decision_fragment(text) != chosen[0].rule:
        raise ConfigError("calibrate: the fragment written does not read back as the calibrated rule")
    return text


def parse_decision_fragment(text: str) -> DecisionRule:
    """The ``decision`` section of a YAML text (a fragment or a whole config), read by the strict loader."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"decision fragment: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or DECISION_SECTION not in data:
        raise ConfigError(f"decision fragment: no {DECISION_SECTION!r} section")
    return DecisionRule.from_dict(data[DECISION_SECTION])


def load_decision_fragment(path: str | Path) -> DecisionRule:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the decision fragment ({exc})") from exc
    return parse_decision_fragment(text)


def read_decision(value: str) -> DecisionRule:
    """A rule from the command line: a YAML file with a ``decision`` section (a config, ``calibrate``'s fragment), or
    inline YAML, either that section or the mapping itself (``{rule: ratio, threshold: 0.82, max_distance: 0.5}``)."""
    import yaml

    path = Path(value)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        return load_decision_fragment(path)
    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"decision {value!r}: neither a file nor valid YAML ({exc})") from exc
    if isinstance(data, dict) and DECISION_SECTION in data:
        data = data[DECISION_SECTION]
    if not isinstance(data, dict):
        raise ConfigError(
            f"decision {value!r}: expected a file or a mapping such as "
            "'{rule: ratio, threshold: 0.82, max_distance: 0.5}'"
        )
    return DecisionRule.from_dict(data)
