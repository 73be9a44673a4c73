"""Online triplet mining inside a batch of P identities x K images (FaceNet; batch-hard as in Hermans et al.).

The seed's advice: random triplets are mostly easy, d(A,N) already far beyond d(A,P) + alpha, and teach nothing;
choose triplets where d(A,P) is large and d(A,N) small. Two ways of doing so on a batch:

- ``batch_hard``: every image as anchor, with its farthest positive and its nearest negative in the batch;
- ``semi_hard``: every positive pair (A,P), with the nearest negative that is still farther than P (inside the
  margin band when there is one); when every negative is nearer than P, the farthest negative, the least hard.
  As in FaceNet and tf-addons: the hardest negatives early in training can collapse the embedding.

Selection works on detached squared distances; the loss is then computed on the chosen triplets with gradients.
Ties go to the lowest index (torch's argmin / argmax), so mining is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import torch

from models.errors import ConfigError

MiningName = Literal["batch-hard", "semi-hard"]
MINING: Final[tuple[str, ...]] = ("batch-hard", "semi-hard")


@dataclass(frozen=True, eq=False)
class Triplets:
    """Row indices into the batch, one entry per triplet."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    def __len__(self) -> int:
        return int(self.anchor.shape[0])


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, n) squared Euclidean distances, from differences (not the |a|^2 + |b|^2 - 2ab expansion,
    whose rounding reorders near-equal distances and leaves non-zero self-distances). For mining: no gradient."""
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    positives = same & ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return positives, ~same


def batch_hard(d2: torch.Tensor, labels: torch.Tensor) -> Triplets:
    """Each anchor with a positive and a negative in the batch: its farthest positive and nearest negative."""
    positives, negatives = _masks(labels)
    inf = torch.tensor(float("inf"), dtype=d2.dtype)
    hardest_positive = torch.where(positives, d2, -inf).argmax(dim=1)
    hardest_negative = torch.where(negatives, d2, inf).argmin(dim=1)
    anchors = (positives.any(dim=1) & negatives.any(dim=1)).nonzero().squeeze(1)
    return Triplets(anchors, hardest_positive[anchors], hardest_negative[anchors])


def semi_hard(d2: torch.Tensor, labels: torch.Tensor) -> Triplets:
    """Every ordered positive pair with the nearest negative farther than the positive (else the farthest one)."""
    positives, negatives = _masks(labels)
    anchor, positive = positives.nonzero(as_tuple=True)
    d_ap = d2[anchor, positive]
    d_an = d2[anchor]
    neg = negatives[anchor]
    inf = torch.tensor(float("inf"), dtype=d2.dtype)
    farther = neg & (d_an > d_ap[:, None])
    nearest_farther = torch.where(farther, d_an, inf).argmin(dim=1)
    farthest = torch.where(neg, d_an, -inf).argmax(dim=1)
    chosen = torch.where(farther.any(dim=1), nearest_farther, farthest)
    keep = neg.any(dim=1)
    return Triplets(anchor[keep], positive[keep], chosen[keep])


def mine(d2: torch.Tensor, labels: torch.Tensor, mining: MiningName) -> Triplets:
    if mining == "batch-hard":
        return batch_hard(d2, labels)
    if mining == "semi-hard":
        return semi_hard(d2, labels)
    raise ConfigError(f"unknown mining {mining!r} (known: {', '.join(MINING)})")
