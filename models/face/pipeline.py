"""Detect -> align -> encode, with chips of several images encoded together in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.face.alignment import DEFAULT_METHOD, Aligner
from models.face.detector import DetectorConfig, RetinaFaceDetector
from models.face.encoder import MAX_BATCH, FaceEncoder
from models.types import Detection, FaceEmbedding


@dataclass(frozen=True)
class PipelineConfig:
    backend: str = "onnxruntime"
    threads: int | None = None
    max_batch: int = MAX_BATCH
    alignment: str = DEFAULT_METHOD
    detector: DetectorConfig = field(default_factory=DetectorConfig)


class FacePipeline:
    def __init__(self, detector: RetinaFaceDetector, encoder: FaceEncoder, aligner: Aligner | None = None) -> None:
        self.detector = detector
        self.encoder = encoder
        self.aligner = aligner or Aligner()

    @property
    def fingerprint(self) -> str:
        from models.face.fingerprint import encoder_fingerprint

        return encoder_fingerprint(alignment=self.aligner.method).value

    @classmethod
    def create(cls, config: PipelineConfig | None = None) -> FacePipeline:
        cfg = config or PipelineConfig()
        detector = RetinaFaceDetector.create(cfg.detector, backend=cfg.backend, threads=cfg.threads)
        encoder = FaceEncoder.create(cfg.backend, threads=cfg.threads, max_batch=cfg.max_batch)
        return cls(detector, encoder, Aligner(cfg.alignment))

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
