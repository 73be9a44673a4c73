"""The encoder fingerprint: embeddings are comparable only when produced under the same one.

It hashes everything that changes the embedding space: the weights (sha256), the input preprocessing, the
alignment (method and its parameters: template, or shape-predictor weights and rect model, chip size and
padding), test-time flip averaging, the embedding dimension, its normalisation and the distance metric. The
inference backend is deliberately not part of it: TensorRT and ONNX Runtime produce the same space.
A gallery carries the fingerprint of the encoder that built it; an edge refuses a gallery whose fingerprint
differs from its own encoder's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from models.errors import ConfigError
from models.face.alignment import ARCFACE_112, CHIP_PADDING, CHIP_SIZES, METHODS, TEMPLATE
from models.face.encoders import DLIB_RESNET, EncoderSpec
from models.registry import SHAPE_PREDICTOR


@dataclass(frozen=True)
class EncoderFingerprint:
    value: str  # "<model name>-<first 16 hex of the sha256 of the canonical fields>"
    fields: dict

    def __str__(self) -> str:
        return self.value


def _alignment_fields(method: str, template: tuple[tuple[float, float], ...] | None) -> dict:
    if method not in METHODS:
        raise ConfigError(f"alignment method {method!r} is not one of {', '.join(METHODS)}")
    fields: dict = {"method": method, "chip_size": CHIP_SIZES[method]}
    if method == "template":
        tpl = template if template is not None else tuple(map(tuple, TEMPLATE.tolist()))
        fields["template"] = [[round(x, 2), round(y, 2)] for x, y in tpl]
    elif method == "arcface112":
        tpl = template if template is not None else tuple(map(tuple, ARCFACE_112.tolist()))
        fields["template"] = [[round(x, 4), round(y, 4)] for x, y in tpl]
    else:
        from models.face.dlib_shape import RECT_MODEL

        fields["padding"] = CHIP_PADDING
        fields["shape_predictor_sha256"] = SHAPE_PREDICTOR.sha256
        rect = asdict(RECT_MODEL)
        rect.pop("faces", None)
        fields["rect_model"] = rect
    return fields


def encoder_fingerprint(
    spec: EncoderSpec = DLIB_RESNET, *, alignment: str = "", template: tuple[tuple[float, float], ...] | None = None
) -> EncoderFingerprint:
    """The fingerprint of `spec`'s embeddings under `alignment` (its default method when "")."""
    method = alignment or spec.alignments[0]
    if method not in spec.alignments:
        raise ConfigError(f"encoder {spec.name} takes alignment {', '.join(spec.alignments)}, not {method!r}")
    fields = {
        "model": spec.manifest.name,
        "weights_sha256": spec.manifest.sha256,
        "preprocessing": spec.manifest.preprocessing,
        "alignment": _alignment_fields(method, template),
        "dim": spec.dim,
        "normalisation": spec.normalisation,
        "metric": spec.metric,
    }
    if spec.flip_average:  # absent otherwise, so that the fingerprints of encoders without it stay as they were
        fields["test_time"] = "hflip-mean"
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return EncoderFingerprint(f"{spec.manifest.name}-{hashlib.sha256(canonical).hexdigest()[:16]}", fields)
