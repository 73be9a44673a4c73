"""Detect -> align -> encode, with chips of several images encoded together in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.face.alignment import Aligner
from models.face.detector import DetectorConfig, RetinaFaceDetector
from models.face.encoder import MAX_BATCH, FaceEncoder
from models.face.encoders import DEFAULT_ENCODER, check_choice, log_licence
from models.types import Detection, FaceEmbedding


@dataclass(frozen=True)
class PipelineConfig:
    """The face models a deployment runs: the edge's `models` section (strict: checked when built)."""

    backend: str = "onnxruntime"
    threads: int | None = None
    max_batch: int = MAX_BATCH
    encoder: str = DEFAULT_ENCODER  # models/face/encoders.py: dlib-resnet-v1 or mobilefacenet-192
    # the acknowledgement an encoder whose weights may not be used commercially needs (see its licence)
    accept_licence: str = ""
    alignment: str = ""  # "": the encoder's own method; filled in when the config is built
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        _, method = check_choice(self.encoder, self.alignment, self.accept_licence, lambda f: f"models.{f}")
        object.__setattr__(self, "alignment", method)


class FacePipeline:
    def __init__(self, detector: RetinaFaceDetector, encoder: FaceEncoder, aligner: Aligner | None = None) -> None:
        self.detector = detector
        self.encoder = encoder
        self.aligner = aligner or Aligner(encoder.spec.alignments[0])

    @property
    def fingerprint(self) -> str:
        from models.face.fingerprint import encoder_fingerprint

        return encoder_fingerprint(self.encoder.spec, alignment=self.aligner.method).value

    @classmethod
    def create(cls, config: PipelineConfig | None = None) -> FacePipeline:
        cfg = config or PipelineConfig()
        spec, method = check_choice(cfg.encoder, cfg.alignment, cfg.accept_licence, lambda f: f"models.{f}")
        log_licence(spec)
        encoder = FaceEncoder.create(spec, cfg.backend, threads=cfg.threads, max_batch=cfg.max_batch)
        try:
            detector = RetinaFaceDetector.create(cfg.detector, backend=cfg.backend, threads=cfg.threads)
        except BaseException:
            encoder.close()
            raise
        return cls(detector, encoder, Aligner(method))

    def detect(self, image: np.ndarray) -> list[Detection]:
        return self.detector.detect(image)

    def embed(self, image: np.ndarray) -> list[FaceEmbedding]:
        return self.embed_many([image])[0]

    def embed_many(self, images: Sequence[np.ndarray]) -> list[list[FaceEmbedding]]:
        """Every face of every image; the chips of all images go through the encoder together."""
        detections = [self.detector.detect(image) for image in images]
        return self.encode_detections(images, detections)

    def encode_detections(
        self, images: Sequence[np.ndarray], detections: Sequence[Sequence[Detection]]
    ) -> list[list[FaceEmbedding]]:
        chips = [self.aligner.align(img, dets) for img, dets in zip(images, detections, strict=True)]
        nonempty = [c for c in chips if len(c)]
        if not nonempty:
            return [[] for _ in images]
        embeddings = self.encoder.encode(np.concatenate(nonempty))
        out: list[list[FaceEmbedding]] = []
        start = 0
        for dets in detections:
            out.append([FaceEmbedding(d, embeddings[start + i]) for i, d in enumerate(dets)])
            start += len(dets)
        return out

    def close(self) -> None:
        self.detector.close()
        self.encoder.close()
