"""The siamese verifier from a site's labelled faces, compared with the plain distance threshold on held-out people.

Both forms of the notes (|difference| and chi-square) are fitted on the training people and evaluated on the
held-out ones with the DESIGN.md protocol (``models.evaluation.scoring.evaluate`` with the verifier as the pair metric),
next to the Euclidean distance on the very same pairs, gallery and probes. The verifier's own threshold for the
matcher is calibrated on every pair of the held-out people at the target FAR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from models.decision.rules import DecisionRule
from models.evaluation.scoring import EvaluationReport, evaluate
from models.training.calibration import CalibrationSettings, RuleCalibration, calibrate_pairs, check_target, pair_scores
from models.training.dataset import LabelledEmbeddings, PersonSplit, held_out_protocol, require_identities, split_people
from models.training.verifier import (
    FORMS,
    SCHEMA,
    SCHEMA_VERSION,
    SiameseVerifier,
    VerifierFit,
    VerifierManifest,
    fit_verifier,
)

log = logging.getLogger(__name__)

DISTANCE_ONLY = (DecisionRule.distance(),)  # the ratio / margin caps are Euclidean; a verifier gets the plain rule


@dataclass(frozen=True, eq=False)
class VerifierCandidate:
    fit: VerifierFit
    onnx: bytes
    manifest: VerifierManifest
    report: EvaluationReport
    calibration: RuleCalibration  # its threshold on all held-out pairs at the target FAR


@dataclass(frozen=True, eq=False)
class VerifierComparison:
    split: PersonSplit
    baseline: EvaluationReport  # the Euclidean distance threshold
    baseline_calibration: RuleCalibration  # the distance threshold on all held-out pairs at the target FAR
    candidates: dict[str, VerifierCandidate]  # by form


def compare_verifiers(
    data: LabelledEmbeddings,
    root: str | Path,
    *,
    target_far: float = 1e-3,
    test_fraction: float = 0.5,
    l2: float = 1e-1,
    pairs: int = 300,
    seed: int = 0,
    backend: str = "onnxruntime",
) -> VerifierComparison:
    from models.registry import sha256_bytes
    from models.training.export import verifier_onnx

    target = check_target("target FAR", target_far)
    counts = data.counts()
    split = split_people(counts, test_fraction=test_fraction, val_fraction=0.0, seed=seed)
    require_identities({n: counts[n] for n in split.train}, 2, "the training split")
    require_identities({n: counts[n] for n in split.test}, 2, "the held-out test split")
    train, test = data.subset(split.train), data.subset(split.test)
    protocol = held_out_protocol(root, split.test, pairs)
    mapping = test.as_mapping()
    baseline = evaluate(protocol, mapping, system="distance threshold", rules=DISTANCE_ONLY)
    settings = CalibrationSettings(seed=seed)
    baseline_calibration = calibrate_pairs(pair_scores(test), target, settings)
    candidates: dict[str, VerifierCandidate] = {}
    for form in FORMS:
        fit = fit_verifier(train, form, l2=l2, seed=seed)
        onnx = verifier_onnx(fit.weights)
        verifier = SiameseVerifier.from_onnx(onnx, fit.weights.dim, backend=backend)
        try:
            report = evaluate(
                protocol, mapping, system=f"siamese verifier ({form})", rules=DISTANCE_ONLY, metric=verifier
            )
            calibration = calibrate_pairs(pair_scores(test, verifier), target, settings)
        finally:
            verifier.close()
        manifest = VerifierManifest(
            schema=SCHEMA,
            schema_version=SCHEMA_VERSION,
            form=form,
            dim=fit.weights.dim,
            onnx_sha256=sha256_bytes(onnx),
            base_fingerprint=data.fingerprint,
            target_far=target,
            threshold=calibration.rule.threshold,
        )
        candidates[form] = VerifierCandidate(fit, onnx, manifest, report, calibration)
        log.info("verifier %s: %d Newton steps, converged %s", form, fit.iterations, fit.converged)
    return VerifierComparison(split, baseline, baseline_calibration, candidates)
