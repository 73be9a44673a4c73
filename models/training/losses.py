"""The triplet loss of the lecture notes, per triplet and over a mined batch.

L(A, P, N) = max(||f(A) - f(P)||^2 - ||f(A) - f(N)||^2 + alpha, 0), with squared Euclidean distances; the seed's
cost J is the sum over triplets. The margin alpha is what rules out the trivial solution the notes warn about:
with f = 0 everywhere, ||f(A) - f(P)||^2 - ||f(A) - f(N)||^2 <= 0 holds for every triplet, but the loss is alpha,
not 0 (and its gradient there is zero, so a collapsed network stays collapsed: initialise away from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from models.errors import TrainingError
from models.training.mining import MiningName, mine, squared_distances

Reduction = Literal["sum", "mean", "none"]


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    alpha: float = 0.2,
    reduction: Reduction = "sum",
) -> torch.Tensor:
    """(t, d) encodings of anchors, positives, negatives -> the loss; ``sum`` is the seed's J, ``none`` per row."""
    d_ap = ((anchor - positive) ** 2).sum(dim=-1)
    d_an = ((anchor - negative) ** 2).sum(dim=-1)
    per = torch.clamp(d_ap - d_an + alpha, min=0.0)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


@dataclass(frozen=True, eq=False)
class MinedLoss:
    """The mean loss over the batch's mined triplets, how many there were and how many still violate the margin."""

    loss: torch.Tensor
    triplets: int
    active: int


def mined_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float, mining: MiningName) -> MinedLoss:
    """Mine triplets in the batch (``models.training.mining``) and average their loss (mean, so the learning rate
    does not depend on the batch size)."""
    triplets = mine(squared_distances(embeddings.detach()), labels, mining)
    if len(triplets) == 0:
        raise TrainingError("a batch without a single triplet: it needs two identities, one of them with two images")
    per = triplet_loss(
        embeddings[triplets.anchor], embeddings[triplets.positive], embeddings[triplets.negative], alpha, "none"
    )
    return MinedLoss(per.mean(), len(triplets), int((per > 0).sum()))
