"""Open-set identification at a chosen gallery size: the door's question asked of single photos, for every rule.

Per seed (`draw_split`, everything drawn from the seed alone, so every system is scored on the same images):

- **Enrolled**: `gallery_size` people drawn from those with at least `photos_per_person + 1` photos, each enrolled
  from `photos_per_person` of them (one template each) and probed with one other photo (a *mate*).
- **Strangers**: people not enrolled (people with one photo, and people with several who were not drawn into a
  gallery), one photo each; `strangers` of them (default: all).
- **Calibration on a disjoint split.** The strangers are split by identity into a calibration share and a test
  share. Each rule's threshold is chosen on the calibration strangers for each target FPIR
  (`models.decision.rules.calibrate`: at most floor(target x n) of them accepted); DIR and FPIR are then measured
  on the mates and on the test strangers, who played no part in choosing it, so the FPIR reached on them is a
  measurement, not the target restated. The calibration gallery is the gallery under test (`same`: a site
  calibrating on its own people and its own unknown faces) or, with `calibration_gallery="disjoint"`, as many other
  people enrolled the same way (a default shipped to sites whose people it never saw; needs twice the people).
- Also reported: the *in-sample* figure (the threshold chosen on the test strangers themselves, the optimistic
  figure a calibration on the tested data reads), and the figure at each rule's *configured* threshold (what a
  default gives, with no calibration at all), including the shipped default (the encoder's `default_decision`,
  models/face/encoders.py).

Rules: distance, and ratio and margin each uncapped and under every cap in use (dlib's 0.6, the shipped default's,
and those of the configured rules given). A missing face stays in every denominator: a mate without a face is
never identified, a stranger without one never accepted, a gallery photo without one gives no template.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from models.decision.rules import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_THRESHOLDS,
    DecisionRule,
    Neighbours,
    calibrate,
    dir_fpir_curve,
)
from models.errors import EvaluationError

log = logging.getLogger(__name__)

CalibrationGallery = Literal["same", "disjoint"]
FPIRS: Final[tuple[float, ...]] = (1e-2, 1e-3)
Embeddings = Mapping[str, "np.ndarray | None"]


# --- the split --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenSetSpec:
    gallery_size: int
    photos_per_person: int = 1
    strangers: int | None = None  # None: everyone not enrolled
    seeds: tuple[int, ...] = (0,)
    calibration_share: float = 0.5
    calibration_gallery: CalibrationGallery = "same"
    fpirs: tuple[float, ...] = FPIRS

    def __post_init__(self) -> None:
        if self.gallery_size < 2:
            raise EvaluationError(f"--gallery-size: need at least 2 people, got {self.gallery_size}")
        if self.photos_per_person < 1:
            raise EvaluationError(f"--photos-per-person: need at least 1, got {self.photos_per_person}")
        if self.strangers is not None and self.strangers < 2:
            raise EvaluationError(
                f"--strangers: need at least 2 (one to calibrate on, one to test), got {self.strangers}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvaluationError(f"seeds: need one or more distinct seeds, got {self.seeds}")
        if not 0.0 < self.calibration_share < 1.0:
            raise EvaluationError(f"--calibration-share: need a fraction in (0, 1), got {self.calibration_share}")
        if self.calibration_gallery not in ("same", "disjoint"):
            raise EvaluationError(f"--calibration-gallery: same or disjoint, got {self.calibration_gallery!r}")
        if not self.fpirs or not all(0.0 < f < 1.0 for f in self.fpirs):
            raise EvaluationError(f"FPIR targets must be in (0, 1), got {self.fpirs}")


@dataclass(frozen=True)
class Split:
    """One seed's draw. Galleries: (person, enrollment images); mates: (image, person); strangers: images."""

    seed: int
    gallery: tuple[tuple[str, tuple[str, ...]], ...]
    mates: tuple[tuple[str, str], ...]
    calibration_gallery: tuple[tuple[str, tuple[str, ...]], ...]  # == gallery with calibration_gallery="same"
    calibration_strangers: tuple[str, ...]
    test_strangers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "gallery_people": len(self.gallery),
            "templates": sum(len(photos) for _, photos in self.gallery),
            "mates": len(self.mates),
            "calibration_gallery": "same" if self.calibration_gallery == self.gallery else "disjoint",
            "calibration_strangers": len(self.calibration_strangers),
            "test_strangers": len(self.test_strangers),
        }


def draw_split(identities: Mapping[str, Sequence[str]], spec: OpenSetSpec, seed: int) -> Split:
    """The enrolled people, their templates and mates, and the calibration / test strangers for one seed."""
    k = spec.photos_per_person
    rng = np.random.default_rng(seed)
    eligible = sorted(p for p, photos in identities.items() if len(photos) >= k + 1)
    galleries = 2 if spec.calibration_gallery == "disjoint" else 1
    if spec.gallery_size * galleries > len(eligible):
        what = " with a disjoint calibration gallery" if galleries == 2 else ""
        raise EvaluationError(
            f"--gallery-size {spec.gallery_size}{what}: {spec.gallery_size * galleries} people with at least {k + 1} "
            f"photos are needed ({k} to enroll, one to probe), the dataset has {len(eligible)}"
        )
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    test_people = sorted(order[: spec.gallery_size])
    cal_people = sorted(order[spec.gallery_size : 2 * spec.gallery_size]) if galleries == 2 else []

    def enroll(person: str) -> tuple[tuple[str, ...], str]:
        photos = sorted(identities[person])
        pick = rng.permutation(len(photos))
        return tuple(sorted(photos[i] for i in pick[:k])), photos[pick[k]]

    gallery, mates = [], []
    for person in test_people:
        templates, probe = enroll(person)
        gallery.append((person, templates))
        mates.append((probe, person))
    cal_gallery = tuple((person, enroll(person)[0]) for person in cal_people) if cal_people else tuple(gallery)
    enrolled = set(test_people) | set(cal_people)
    pool = sorted(p for p in identities if p not in enrolled and identities[p])
    pool = [pool[i] for i in rng.permutation(len(pool))]
    if spec.strangers is not None:
        if spec.strangers > len(pool):
            raise EvaluationError(f"--strangers {spec.strangers}: only {len(pool)} people are not enrolled")
        pool = pool[: spec.strangers]
    images = [sorted(identities[p])[int(rng.integers(len(identities[p])))] for p in pool]
    n_cal = round(spec.calibration_share * len(images))
    if n_cal < 1 or n_cal >= len(images):
        raise EvaluationError(
            f"{len(images)} stranger(s) cannot be split into a calibration and a test share of {spec.calibration_share}"
        )
    return Split(
        seed=seed,
        gallery=tuple(gallery),
        mates=tuple(mates),
        calibration_gallery=cal_gallery,
        calibration_strangers=tuple(images[:n_cal]),
        test_strangers=tuple(images[n_cal:]),
    )


# --- the rules --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleVariant:
    """A rule kind under one cap, at its configured threshold (replaced when calibrated)."""

    name: str
    rule: DecisionRule


def _cap_name(cap: float | None) -> str:
    return "" if cap is None or math.isinf(cap) else f"<={cap:g}"


def rule_variants(configured: Sequence[DecisionRule] = ()) -> tuple[RuleVariant, ...]:
    """distance; ratio and margin uncapped and under each cap in use (see the module docstring)."""
    caps = {math.inf, DEFAULT_MAX_DISTANCE}
    caps |= {r.max_distance for r in configured if r.max_distance is not None}
    out = [RuleVariant("distance", DecisionRule.distance())]
    for kind in ("ratio", "margin"):
        for cap in sorted(caps, reverse=True):
            out.append(RuleVariant(f"{kind}{_cap_name(cap)}", DecisionRule(kind, DEFAULT_THRESHOLDS[kind], cap)))  # type: ignore[arg-type]
    return tuple(out)


def describe_rule(rule: DecisionRule) -> str:
    cap = "" if rule.max_distance is None else f", cap {rule.max_distance:g}"
    return f"{rule.rule} {rule.threshold:g}{cap}"


def configured_rules(
    shipped: DecisionRule, extra: Sequence[tuple[str, DecisionRule]] = ()
) -> tuple[tuple[str, DecisionRule], ...]:
    """(label, rule) at a configured threshold: each kind at rules.py's default threshold (ratio and margin capped at
    dlib's 0.6), `shipped` (the encoder's default decision: the edge's, identify's and eval's), and `extra` (e.g.
    --decision)."""
    labels = {"distance": "distance default", "ratio": "ratio default", "margin": "margin default"}
    out = [(label, DecisionRule(k, DEFAULT_THRESHOLDS[k])) for k, label in labels.items()]  # type: ignore[arg-type]
    out.append(("shipped default", shipped))
    out.extend(extra)
    return tuple(out)


# --- figures ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibratedPoint:
    variant: str
    target_fpir: float
    threshold: float  # chosen on the calibration strangers
    calibration_fpir: float
    resolvable: bool  # calibration strangers x target >= 1
    dir: float  # on the mates at that threshold
    fpir: float  # on the test strangers at that threshold (a measurement)
    strangers_accepted: int
    in_sample_dir: float  # the threshold chosen on the test strangers themselves
    in_sample_threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {k: _safe(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ConfiguredPoint:
    label: str
    rule: DecisionRule
    dir: float
    fpir: float
    strangers_accepted: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "rule": self.rule.to_dict(),
            "dir": self.dir,
            "fpir": self.fpir,
            "strangers_accepted": self.strangers_accepted,
        }


@dataclass(frozen=True, eq=False)
class SeedResult:
    system: str
    seed: int
    rank1: float
    n_mates: int
    n_test_strangers: int
    n_calibration_strangers: int
    no_face: Mapping[str, int]  # gallery photos / mates / strangers without an embedding
    calibrated: tuple[CalibratedPoint, ...]
    configured: tuple[ConfiguredPoint, ...]
    curves: Mapping[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = field(repr=False)  # variant -> fpir, dir

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "system": self.system,
            "seed": self.seed,
            "rank1": self.rank1,
            "mates": self.n_mates,
            "test_strangers": self.n_test_strangers,
            "calibration_strangers": self.n_calibration_strangers,
            "no_face": dict(self.no_face),
            "calibrated": [p.to_dict() for p in self.calibrated],
            "configured": [p.to_dict() for p in self.configured],
        }
        if curves:
            out["curves"] = {
                name: {"fpir": fpir.tolist(), "dir": dir_.tolist()} for name, (fpir, dir_) in self.curves.items()
            }
        return out


def _safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _rows(embeddings: Embeddings, images: Sequence[str], dim: int) -> NDArray[np.float64]:
    out = np.full((len(images), dim), np.nan)
    for i, img in enumerate(images):
        v = embeddings.get(img)
        if v is not None:
            out[i] = np.asarray(v, dtype=np.float64).ravel()
    return out


def _gallery(
    embeddings: Embeddings, gallery: Sequence[tuple[str, Sequence[str]]], dim: int
) -> tuple[NDArray[np.float64], NDArray[np.object_], int]:
    """Templates and their labels; photos without a face give no template (counted)."""
    vectors, labels, missing = [], [], 0
    for person, photos in gallery:
        for img in photos:
            v = embeddings.get(img)
            if v is None:
                missing += 1
            else:
                vectors.append(np.asarray(v, dtype=np.float64).ravel())
                labels.append(person)
    matrix = np.stack(vectors) if vectors else np.empty((0, dim))
    return matrix, np.array(labels, dtype=object), missing


def _neighbours(probes: NDArray[np.float64], templates: NDArray[np.float64], labels: np.ndarray) -> Neighbours:
    if templates.shape[0] == 0:
        n = probes.shape[0]
        return Neighbours(
            np.full(n, None, dtype=object), np.full(n, np.inf), np.full(n, None, dtype=object), np.full(n, np.inf)
        )
    return Neighbours.from_embeddings(probes, templates, labels)


def evaluate_split(
    split: Split,
    embeddings: Embeddings,
    *,
    system: str,
    variants: Sequence[RuleVariant],
    configured: Sequence[tuple[str, DecisionRule]],
    fpirs: Sequence[float] = FPIRS,
) -> SeedResult:
    """Every figure of the module docstring for one system on one seed's split."""
    present = [np.asarray(v).ravel() for v in embeddings.values() if v is not None]
    if not present:
        raise EvaluationError(f"{system}: no embedding at all")
    dim = present[0].shape[0]
    templates, labels, gallery_missing = _gallery(embeddings, split.gallery, dim)
    mate_rows = _rows(embeddings, [img for img, _ in split.mates], dim)
    truth = np.array([p for _, p in split.mates], dtype=object)
    test_rows = _rows(embeddings, split.test_strangers, dim)
    cal_rows = _rows(embeddings, split.calibration_strangers, dim)
    mates = _neighbours(mate_rows, templates, labels)
    test = _neighbours(test_rows, templates, labels)
    if split.calibration_gallery == split.gallery:
        cal = _neighbours(cal_rows, templates, labels)
    else:
        cal_templates, cal_labels, _ = _gallery(embeddings, split.calibration_gallery, dim)
        cal = _neighbours(cal_rows, cal_templates, cal_labels)
    correct = mates.found & (mates.label1 == truth)

    def measure(rule: DecisionRule) -> tuple[float, float, int]:
        hit = rule.accepts(mates) & correct
        accepted = int(np.count_nonzero(rule.accepts(test)))
        return float(hit.mean()), accepted / len(test), accepted

    calibrated: list[CalibratedPoint] = []
    curves: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}
    for variant in variants:
        for target in fpirs:
            point = calibrate(variant.rule, cal, target)
            dir_, fpir, accepted = measure(point.rule)
            inside = calibrate(variant.rule, test, target, mates=mates, mate_labels=truth)
            calibrated.append(
                CalibratedPoint(
                    variant=variant.name,
                    target_fpir=target,
                    threshold=point.rule.threshold,
                    calibration_fpir=point.fpir,
                    resolvable=point.resolvable,
                    dir=dir_,
                    fpir=fpir,
                    strangers_accepted=accepted,
                    in_sample_dir=float(inside.dir or 0.0),
                    in_sample_threshold=inside.rule.threshold,
                )
            )
        fpir_c, dir_c, _ = dir_fpir_curve(variant.rule, mates, truth, test)
        curves[variant.name] = (fpir_c, dir_c)
    points = tuple(ConfiguredPoint(label, rule, *measure(rule)) for label, rule in configured)
    no_face = {
        "gallery_photos": gallery_missing,
        "mates": int(np.isnan(mate_rows).any(axis=1).sum()),
        "test_strangers": int(np.isnan(test_rows).any(axis=1).sum()),
        "calibration_strangers": int(np.isnan(cal_rows).any(axis=1).sum()),
    }
    return SeedResult(
        system=system,
        seed=split.seed,
        rank1=float(correct.mean()),
        n_mates=len(mates),
        n_test_strangers=len(test),
        n_calibration_strangers=len(cal),
        no_face=no_face,
        calibrated=tuple(calibrated),
        configured=points,
        curves=curves,
    )


# --- the report -------------------------------------------------------------------------------------------------
def _spread(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


@dataclass(frozen=True, eq=False)
class OpenSetReport:
    spec: OpenSetSpec
    dataset: str
    splits: tuple[Split, ...]
    results: tuple[SeedResult, ...]  # every system on every seed
    variants: tuple[RuleVariant, ...]

    @property
    def systems(self) -> list[str]:
        return list(dict.fromkeys(r.system for r in self.results))

    def of(self, system: str) -> list[SeedResult]:
        return [r for r in self.results if r.system == system]

    def summary(self, system: str) -> dict[str, Any]:
        """Mean / std / min / max over the seeds of every figure."""
        rs = self.of(system)
        out: dict[str, Any] = {"rank1": _spread([r.rank1 for r in rs]), "calibrated": [], "configured": []}
        for i, p in enumerate(rs[0].calibrated):
            out["calibrated"].append(
                {
                    "variant": p.variant,
                    "target_fpir": p.target_fpir,
                    "resolvable": all(r.calibrated[i].resolvable for r in rs),
                    "dir": _spread([r.calibrated[i].dir for r in rs]),
                    "fpir": _spread([r.calibrated[i].fpir for r in rs]),
                    "threshold": _spread([r.calibrated[i].threshold for r in rs]),
                    "in_sample_dir": _spread([r.calibrated[i].in_sample_dir for r in rs]),
                }
            )
        for i, p in enumerate(rs[0].configured):
            out["configured"].append(
                {
                    "label": p.label,
                    "rule": p.rule.to_dict(),
                    "dir": _spread([r.configured[i].dir for r in rs]),
                    "fpir": _spread([r.configured[i].fpir for r in rs]),
                }
            )
        return out

    def calibration_note(self) -> str:
        s = self.splits[0]
        where = (
            "against the gallery under test (a site calibrating on its own people)"
            if self.spec.calibration_gallery == "same"
            else f"against a disjoint gallery of {len(s.calibration_gallery)} other people"
        )
        return (
            f"thresholds calibrated on a disjoint split: {len(s.calibration_strangers)} calibration strangers "
            f"{where}; DIR and FPIR measured on {len(s.mates)} mates and {len(s.test_strangers)} other strangers "
            "(different people)"
        )

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        return _safe_tree(
            {
                "dataset": self.dataset,
                "protocol": {
                    "gallery_size": self.spec.gallery_size,
                    "photos_per_person": self.spec.photos_per_person,
                    "strangers": self.spec.strangers,
                    "seeds": list(self.spec.seeds),
                    "calibration_share": self.spec.calibration_share,
                    "calibration_gallery": self.spec.calibration_gallery,
                    "fpirs": list(self.spec.fpirs),
                    "calibration": self.calibration_note(),
                },
                "variants": [{"name": v.name, **v.rule.to_dict()} for v in self.variants],
                "splits": [s.to_dict() for s in self.splits],
                "summary": {system: self.summary(system) for system in self.systems},
                "per_seed": [r.to_dict(curves=curves) for r in self.results],
            }
        )

    def format(self) -> str:
        systems = self.systems
        spec = self.spec
        s0 = self.splits[0]
        several = len(spec.seeds) > 1

        def cell(spread: Mapping[str, float], pct: bool = False) -> str:
            scale, digits, unit = (100.0, 2, "%") if pct else (1.0, 3, "")
            text = f"{spread['mean'] * scale:.{digits}f}{unit}"
            return text + (f"±{spread['std'] * scale:.{digits}f}" if several else "")

        summaries = {s: self.summary(s) for s in systems}
        col = 15 if several else 9
        group = 3 * (col + 1) + 2
        lines = [
            f"open-set identification on {self.dataset}: {spec.gallery_size} people enrolled from "
            f"{spec.photos_per_person} photo(s) each, one mate each, {len(s0.test_strangers)} test strangers; "
            f"seeds {', '.join(map(str, spec.seeds))}" + (" (mean±std over the seeds)" if several else ""),
            self.calibration_note(),
            "",
            "rank-1: " + "; ".join(f"{s} {cell(summaries[s]['rank1'])}" for s in systems),
        ]
        width = max(len(v.name) for v in self.variants) + 2
        for target in spec.fpirs:
            lines += ["", f"DIR at FPIR {target:g}, the threshold calibrated on the calibration strangers"]
            lines.append(f"{'':<{width}}" + "".join(f"{s:^{group}}" for s in systems))
            sub = f"{'DIR':>{col}} {'FPIR reached':>{col}} {'in-sample':>{col}}  "
            lines.append(f"{'rule':<{width}}" + sub * len(systems))
            for v in self.variants:
                row = f"{v.name:<{width}}"
                for s in systems:
                    p = next(
                        c for c in summaries[s]["calibrated"] if c["variant"] == v.name and c["target_fpir"] == target
                    )
                    flag = "" if p["resolvable"] else "*"
                    row += (
                        f"{cell(p['dir']) + flag:>{col}} {cell(p['fpir'], pct=True):>{col}} "
                        f"{cell(p['in_sample_dir']):>{col}}  "
                    )
                lines.append(row.rstrip())
        labels = [
            f"{c['label']}: {describe_rule(DecisionRule.from_dict(c['rule']))}"
            for c in summaries[systems[0]]["configured"]
        ]
        lwidth = max(len(x) for x in labels) + 2
        lines += ["", "at a configured threshold (no calibration)"]
        lines.append(f"{'':<{lwidth}}" + "".join(f"{s:^{2 * (col + 1) + 2}}" for s in systems))
        lines.append(f"{'rule':<{lwidth}}" + f"{'DIR':>{col}} {'FPIR':>{col}}  " * len(systems))
        for i, label in enumerate(labels):
            row = f"{label:<{lwidth}}"
            for s in systems:
                c = summaries[s]["configured"][i]
                row += f"{cell(c['dir']):>{col}} {cell(c['fpir'], pct=True):>{col}}  "
            lines.append(row.rstrip())
        lines += [
            "",
            "in-sample: the threshold chosen on the test strangers themselves (optimistic). * = target finer than "
            "1 / calibration strangers. ratio<=c / margin<=c also require d1 <= c.",
        ]
        for r in self.results:
            if any(r.no_face.values()):
                lines.append(f"{r.system}, seed {r.seed}: no face found in {dict(r.no_face)}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """One DIR-vs-FPIR panel per rule variant on the test strangers, every seed, every system; markers at the
        calibrated thresholds (o: FPIR 1e-2 target, s: 1e-3) and at the variant's configured threshold (*)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        variants = list(self.variants)
        cols = 4
        rows = math.ceil(len(variants) / cols)
        fig = Figure(figsize=(4.2 * cols, 3.8 * rows), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        colours = dict(zip(self.systems, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
        n_test = min(r.n_test_strangers for r in self.results)
        floor = 0.5 / max(1, n_test)
        markers = dict(zip(self.spec.fpirs, ("o", "s", "^", "v"), strict=False))
        for ax, variant in zip(axes, variants, strict=False):
            for system in self.systems:
                for i, r in enumerate(self.of(system)):
                    fpir, dir_ = r.curves[variant.name]
                    keep = fpir > 0
                    label = system if i == 0 else None
                    ax.step(fpir[keep], dir_[keep], where="post", color=colours[system], alpha=0.6, lw=1, label=label)
                    for p in r.calibrated:
                        if p.variant == variant.name:
                            ax.plot(max(p.fpir, floor), p.dir, markers.get(p.target_fpir, "o"), color=colours[system])
                for point in _configured_points(self, system, variant):
                    ax.plot(max(point.fpir, floor), point.dir, "*", ms=11, color=colours[system], mec="black")
            ax.set(
                xscale="log",
                xlim=(floor, 1.0),
                ylim=(0.0, 1.02),
                title=variant.name,
                xlabel=f"FPIR ({n_test} test strangers)",
                ylabel="DIR",
            )
            for target in self.spec.fpirs:
                ax.axvline(target, color="grey", lw=0.5, ls="--")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="lower right", fontsize="small")
        for ax in axes[len(variants) :]:
            ax.axis("off")
        if len(variants) < len(axes):
            text = ["markers, at the FPIR reached on the test strangers", "(at the left edge: none accepted):"]
            text += [f"  {m}  calibrated for FPIR {t:g}" for t, m in markers.items()]
            text.append("  *  configured threshold:")
            text += [f"     {p.label}: {describe_rule(p.rule)}" for p in self.results[0].configured]
            axes[len(variants)].text(0.0, 1.0, "\n".join(text), va="top", fontsize="small", family="monospace")
        fig.suptitle(
            f"DIR vs FPIR on the test strangers: {self.spec.gallery_size} enrolled x {self.spec.photos_per_person} "
            f"photo(s), seeds {', '.join(map(str, self.spec.seeds))}; thresholds of the markers calibrated on other "
            "strangers",
            fontsize="medium",
        )
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
        return out


def _configured_points(report: OpenSetReport, system: str, variant: RuleVariant) -> list[ConfiguredPoint]:
    """The configured-threshold points (every seed) of the rules that are this variant (same kind and cap)."""
    return [
        p
        for r in report.of(system)
        for p in r.configured
        if p.rule.rule == variant.rule.rule and p.rule.max_distance == variant.rule.max_distance
    ]


def _safe_tree(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _safe_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe_tree(v) for v in value]
    return value


def run_openset(
    identities: Mapping[str, Sequence[str]],
    systems: Mapping[str, Embeddings],
    spec: OpenSetSpec,
    *,
    dataset: str,
    shipped: DecisionRule,
    configured: Sequence[tuple[str, DecisionRule]] = (),
    progress: Callable[[str], None] | None = None,
) -> OpenSetReport:
    """Every seed's split, every system's figures on it (see the module docstring)."""
    variants = rule_variants([shipped, *(rule for _, rule in configured)])
    rules_at_threshold = configured_rules(shipped, configured)
    splits, results = [], []
    for seed in spec.seeds:
        split = draw_split(identities, spec, seed)
        splits.append(split)
        for system, embeddings in systems.items():
            if progress is not None:
                progress(f"seed {seed}: {system}")
            results.append(
                evaluate_split(
                    split,
                    embeddings,
                    system=system,
                    variants=variants,
                    configured=rules_at_threshold,
                    fpirs=spec.fpirs,
                )
            )
    return OpenSetReport(spec, dataset, tuple(splits), tuple(results), variants)
