"""A site's adapter from its own labelled faces: split by person, train, export, evaluate before / after, judge.

The evaluation is the DESIGN.md protocol (``models.evaluation.scoring``) on people the adapter never saw, with the
adapter applied through its exported ONNX graph, i.e. exactly what an edge would run. Whether it ships is
``models.training.adapter.ship_adapter``'s decision on ``judge_adapter``'s verdict.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models.errors import ConfigError, TrainingError
from models.evaluation.scoring import EvaluationReport, evaluate
from models.training.adapter import (
    HEAD_KINDS,
    AdapterManifest,
    AdapterVerdict,
    AdapterWeights,
    EmbeddingAdapter,
    judge_adapter,
)
from models.training.dataset import LabelledEmbeddings, PersonSplit, held_out_protocol, require_identities, split_people
from models.training.trainer import TrainConfig, TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterConfig:
    """``model-tool train-adapter --config FILE``: YAML with these keys (strict), the training ones under ``train``."""

    head: Literal["linear", "mlp"] = "linear"
    hidden: int = 128  # the mlp head's hidden width
    test_fraction: float = 0.5  # of the identities, held out for the before / after evaluation
    val_fraction: float = 0.25  # of the remaining identities, for early stopping
    tolerance: float = 0.0  # a held-out figure dropping by more than this refuses the adapter
    pairs: int = 300  # protocol pairs (each kind) on the held-out people, at most
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"adapter: head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")
        if self.hidden < 1 or self.pairs < 1:
            raise ConfigError(f"adapter: hidden and pairs must be >= 1, got {self.hidden}, {self.pairs}")


@dataclass(frozen=True, eq=False)
class AdapterOutcome:
    split: PersonSplit
    training: TrainResult
    weights: AdapterWeights
    onnx: bytes
    manifest: AdapterManifest
    test_before: LabelledEmbeddings  # the held-out people's embeddings without and with the adapter
    test_after: LabelledEmbeddings
    before: EvaluationReport
    after: EvaluationReport
    verdict: AdapterVerdict


def train_site_adapter(
    data: LabelledEmbeddings,
    root: str | Path,
    config: AdapterConfig = AdapterConfig(),
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    backend: str = "onnxruntime",
) -> AdapterOutcome:
    """Train an adapter on ``data`` (embeddings of the dataset at ``root``) and judge it on held-out people.

    Nothing is shipped here: pass the outcome to ``ship_adapter``, which refuses a harmful adapter.
    """
    import torch

    from models.training.export import adapter_onnx
    from models.training.heads import build_head
    from models.training.trainer import train_embedding

    counts = data.counts()
    split = split_people(
        counts, test_fraction=config.test_fraction, val_fraction=config.val_fraction, seed=config.train.seed
    )
    require_identities({n: counts[n] for n in split.train}, 2, "the training split")
    require_identities({n: counts[n] for n in split.test}, 2, "the held-out test split")
    if config.val_fraction > 0:
        require_identities({n: counts[n] for n in split.val}, 2, "the validation split (or set val_fraction 0)")
    log.info("split: %d train, %d validation, %d test identities", len(split.train), len(split.val), len(split.test))
    train, val, test = data.subset(split.train), data.subset(split.val), data.subset(split.test)

    torch.manual_seed(config.train.seed)  # the mlp head's first layer starts random
    head = build_head(config.head, data.dim, config.hidden)
    result = train_embedding(
        head,
        train.vectors,
        train.label_codes(),
        config.train,
        val=(val.vectors, val.label_codes()) if len(val) else None,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
    weights = head.export_weights()
    onnx = adapter_onnx(weights)
    manifest = AdapterManifest.for_onnx(onnx, config.head, data.dim, data.fingerprint)
    with EmbeddingAdapter.from_onnx(onnx, manifest, backend=backend) as adapter:
        vectors = adapter.apply(test.vectors)
    if not np.isfinite(vectors).all():
        raise TrainingError("adapter: training diverged (non-finite outputs); lower the learning rate")
    adapted = test.with_vectors(vectors, manifest.fingerprint)
    protocol = held_out_protocol(root, split.test, config.pairs)
    before = evaluate(protocol, test.as_mapping(), system="encoder")
    after = evaluate(protocol, adapted.as_mapping(), system="encoder + adapter")
    verdict = judge_adapter(before, after, config.tolerance)
    return AdapterOutcome(split, result, weights, onnx, manifest, test, adapted, before, after, verdict)
