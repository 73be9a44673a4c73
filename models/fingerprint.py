"""The encoder fingerprint: embeddings are comparable only when produced under the same one.

It hashes everything that changes the embedding space: the weights (sha256), the input preprocessing, the
alignment template and chip size, the embedding dimension, its normalisation and the distance metric. The
inference backend is deliberately not part of it: TensorRT and ONNX Runtime produce the same space.
A gallery carries the fingerprint of the encoder that built it; an edge refuses a gallery whose fingerprint
differs from its own encoder's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from models.alignment import CHIP_SIZE, TEMPLATE
from models.encoder import EMBEDDING_DIM
from models.registry import ENCODER, ModelManifest


@dataclass(frozen=True)
class EncoderFingerprint:
    value: str  # "<model name>-<first 16 hex of the sha256 of the canonical fields>"
    fields: dict

    def __str__(self) -> str:
        return self.value


def encoder_fingerprint(
    manifest: ModelManifest = ENCODER,
    *,
    template: tuple[tuple[float, float], ...] | None = None,
    dim: int = EMBEDDING_DIM,
    normalisation: str = "none",
    metric: str = "euclidean",
) -> EncoderFingerprint:
    tpl = template if template is not None else tuple(map(tuple, TEMPLATE.tolist()))
    fields = {
        "model": manifest.name,
        "weights_sha256": manifest.sha256,
        "preprocessing": manifest.preprocessing,
        "alignment": {"chip_size": CHIP_SIZE, "template": [[round(x, 2), round(y, 2)] for x, y in tpl]},
        "dim": dim,
        "normalisation": normalisation,
        "metric": metric,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return EncoderFingerprint(f"{manifest.name}-{hashlib.sha256(canonical).hexdigest()[:16]}", fields)
