"""Synthetic labelled embeddings for the training tests: identities as clusters, with nuisance directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.training.dataset import LabelledEmbeddings

FINGERPRINT = "synthetic-0000000000000000"


def clusters(
    n_ids: int,
    per_id: int,
    *,
    dim: int = 8,
    informative: int = 4,
    spread: float = 0.05,
    nuisance: float = 0.5,
    seed: int = 0,
    prefix: str = "id",
) -> LabelledEmbeddings:
    """``n_ids`` identities of ``per_id`` images: centres differ on the first ``informative`` components only;
    within an identity those vary by ``spread`` and the other components by ``nuisance`` (pose, light: noise that a
    learned linear map can shrink)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_ids, dim))
    centres[:, :informative] = rng.normal(0.0, 0.4, size=(n_ids, informative))
    scale = np.r_[np.full(informative, spread), np.full(dim - informative, nuisance)]
    rows, images, labels = [], [], []
    for i in range(n_ids):
        for j in range(per_id):
            rows.append(centres[i] + rng.normal(0.0, 1.0, dim) * scale)
            images.append(f"{prefix}{i:03d}/{j:02d}.jpg")
            labels.append(f"{prefix}{i:03d}")
    return LabelledEmbeddings(tuple(images), tuple(labels), np.asarray(rows, dtype=np.float32), FINGERPRINT)


def image_folder(root: Path, data: LabelledEmbeddings) -> Path:
    """Empty files named like ``data``'s images: the evaluation protocol only reads the names."""
    for rel in [*data.images, *data.missing]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return root
