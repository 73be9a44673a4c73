"""The triplet loss against hand-computed values, and online mining picking the hardest triplets."""

from __future__ import annotations

import pytest
import torch

from models.errors import TrainingError
from models.training.losses import mined_triplet_loss, triplet_loss
from models.training.mining import batch_hard, semi_hard, squared_distances


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_triplet_loss_hand_computed() -> None:
    # triplet 1: ||A-P||^2 = 1, ||A-N||^2 = 4: 1 - 4 + 0.2 < 0 -> 0 (already separated by more than alpha)
    # triplet 2: ||A-P||^2 = 4, ||A-N||^2 = 1: 4 - 1 + 0.2 = 3.2
    # triplet 3: ||A-P||^2 = 1, ||A-N||^2 = 1.1: 1 - 1.1 + 0.2 = 0.1 (inside the margin: still a loss)
    a = t([[0, 0], [0, 0], [0, 0]])
    p = t([[1, 0], [2, 0], [0, 1]])
    n = t([[0, 2], [1, 0], [1.1**0.5, 0]])
    per = triplet_loss(a, p, n, alpha=0.2, reduction="none")
    assert per.tolist() == pytest.approx([0.0, 3.2, 0.1])
    assert float(triplet_loss(a, p, n, alpha=0.2)) == pytest.approx(3.3)  # the seed's J: the sum
    assert float(triplet_loss(a, p, n, alpha=0.2, reduction="mean")) == pytest.approx(1.1)


def test_all_zero_embeddings_are_not_a_free_solution() -> None:
    # The notes' warning: with f = 0 everywhere, d(A,P) - d(A,N) <= 0 holds for every triplet. Without a margin that
    # trivial network scores a perfect 0; the margin makes it cost alpha per triplet.
    z = torch.zeros(5, 128, dtype=torch.float64, requires_grad=True)
    assert triplet_loss(z, z, z, alpha=0.0).item() == 0.0
    loss = triplet_loss(z, z, z, alpha=0.2)
    assert loss.item() == pytest.approx(5 * 0.2)
    loss.backward()
    assert z.grad is not None and float(z.grad.abs().max()) == 0.0  # ... and collapsed, it stays collapsed


def test_squared_distances_are_exact_differences() -> None:
    x = t([[0, 0], [3, 4], [1, 1]])
    assert squared_distances(x).flatten().tolist() == pytest.approx([0, 25, 2, 25, 0, 13, 2, 13, 0])


# A 1-D batch: identity 0 at 0.0, 1.0, 3.0; identity 1 at 2.5, 10.0; identity 2 at -4.0
X = t([[0.0], [1.0], [3.0], [2.5], [10.0], [-4.0]])
Y = torch.tensor([0, 0, 0, 1, 1, 2])


def test_batch_hard_picks_the_farthest_positive_and_nearest_negative() -> None:
    tr = batch_hard(squared_distances(X), Y)
    got = {int(a): (int(p), int(n)) for a, p, n in zip(tr.anchor, tr.positive, tr.negative, strict=True)}
    # row 5 (identity 2) has no positive: not an anchor
    assert got == {0: (2, 3), 1: (2, 3), 2: (0, 3), 3: (4, 2), 4: (3, 2)}


def test_semi_hard_takes_the_nearest_negative_beyond_the_positive_else_the_farthest() -> None:
    tr = semi_hard(squared_distances(X), Y)
    got = {(int(a), int(p)): int(n) for a, p, n in zip(tr.anchor, tr.positive, tr.negative, strict=True)}
    assert len(got) == 3 * 2 + 2  # every ordered positive pair
    # anchor 0, positive 1 (d=1): negatives at d^2 6.25 (2.5), 100 (10), 16 (-4): nearest farther = 2.5 (row 3)
    assert got[(0, 1)] == 3
    # anchor 0, positive 2 (d^2=9): farther negatives 16 (row 5) and 100 (row 4): nearest of them = row 5
    assert got[(0, 2)] == 5
    # anchor 2 (3.0), positive 0 (d^2 9): negatives 0.25 (row 3), 49 (row 4), 49 (row 5): nearest farther = row 4
    assert got[(2, 0)] == 4
    # anchor 3 (2.5), positive 4 (d^2 56.25): every negative is nearer (0, 1, 3 at <= 0.25..6.25; -4 at 42.25):
    # the farthest, -4.0 (row 5), the least hard
    assert got[(3, 4)] == 5


def test_mined_loss_needs_two_identities() -> None:
    x = t([[0.0], [1.0]])
    with pytest.raises(TrainingError, match="without a single triplet"):
        mined_triplet_loss(x, torch.tensor([0, 0]), 0.2, "batch-hard")
    m = mined_triplet_loss(X, Y, 0.2, "batch-hard")
    # hand-computed per anchor, max(d_ap - d_an + 0.2, 0):
    # 9 - 6.25 + .2, 4 - 2.25 + .2, 9 - .25 + .2, 56.25 - .25 + .2, 56.25 - 49 + .2
    assert float(m.loss) == pytest.approx((2.95 + 1.95 + 8.95 + 56.2 + 7.45) / 5)
    assert m.triplets == 5 and m.active == 5
