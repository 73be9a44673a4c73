"""P x K sampling and the training loop on synthetic clustered data: it learns, generalises, is deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from training_data import clusters

from models.errors import ConfigError, DatasetError
from models.training.heads import LinearHead, ResidualMLPHead, build_head
from models.training.sampler import PKSampler
from models.training.trainer import TrainConfig, train_embedding, validation_figures


def test_pk_batches() -> None:
    labels = np.repeat(np.arange(7), [5, 5, 4, 3, 2, 1, 6])  # identity 5 has a single image
    sampler = PKSampler(labels, p=3, k=4, rng=np.random.default_rng(0))
    batches = list(sampler.epoch())
    assert len(batches) == len(sampler) == 2  # 6 usable identities in groups of 3
    seen = set()
    for rows in batches:
        ids, counts = np.unique(labels[rows], return_counts=True)
        assert len(ids) == 3 and counts.max() <= 4 and counts.min() >= 2
        assert len(set(rows.tolist())) == rows.size  # no image twice in a batch
        seen |= set(ids.tolist())
    assert seen == {0, 1, 2, 3, 4, 6}  # every usable identity once per epoch; the singleton never
    again = list(PKSampler(labels, p=3, k=4, rng=np.random.default_rng(0)).epoch())
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_pk_last_lonely_identity_joins_the_previous_batch() -> None:
    labels = np.repeat(np.arange(5), 2)
    sampler = PKSampler(labels, p=2, k=2, rng=np.random.default_rng(1))
    batches = list(sampler.epoch())
    assert len(batches) == len(sampler) == 2
    assert sorted(len(np.unique(labels[b])) for b in batches) == [2, 3]


def test_pk_refuses_what_cannot_give_triplets() -> None:
    with pytest.raises(ConfigError):
        PKSampler(np.array([0, 0, 1, 1]), p=1, k=2, rng=np.random.default_rng(0))
    with pytest.raises(DatasetError, match="too few identities"):
        PKSampler(np.array([0, 0, 1, 2]), p=2, k=2, rng=np.random.default_rng(0))


def test_heads_start_as_identity() -> None:
    x = torch.randn(6, 8)
    torch.manual_seed(0)
    for head in (build_head("linear", 8), build_head("mlp", 8, hidden=16)):
        assert torch.equal(head(x), x) or torch.allclose(head(x), x, atol=1e-6)
        assert head.identity_penalty().item() == 0.0
    with pytest.raises(ConfigError):
        build_head("conv", 8)


FAST = TrainConfig(epochs=60, lr=1e-2, p=6, k=4, regularisation=1e-3, patience=60, seed=3)


def _ratio(model: torch.nn.Module, data) -> float:
    x = torch.as_tensor(data.vectors)
    return validation_figures(model, x, torch.as_tensor(data.label_codes()), FAST)[1]


@pytest.mark.parametrize("mining", ["batch-hard", "semi-hard"])
def test_training_reduces_the_loss_and_separates_unseen_people(mining: str) -> None:
    train = clusters(18, 6, seed=1)
    unseen = clusters(12, 6, seed=2, prefix="new")
    config = dataclasses.replace(FAST, mining=mining)
    head = LinearHead(train.dim)
    x, y = torch.as_tensor(train.vectors), torch.as_tensor(train.label_codes())
    loss_before = validation_figures(head, x, y, config)[0]
    unseen_before = _ratio(head, unseen)
    result = train_embedding(head, train.vectors, train.label_codes(), config, progress=False)
    loss_after = validation_figures(head, x, y, config)[0]
    assert result.best_epoch == config.epochs and not result.stopped_early  # no validation split: the last epoch
    assert loss_after < 0.5 * loss_before
    # the nuisance components dominate the hardest pairs at first; the learned map shrinks them, on new people too
    assert _ratio(head, unseen) < 0.6 * unseen_before
    w = head.linear.weight.detach().numpy()
    assert np.abs(np.diag(w)[4:]).mean() < np.abs(np.diag(w)[:4]).mean()


def test_training_is_deterministic_and_checkpoints(tmp_path) -> None:
    train, val = clusters(12, 5, seed=4), clusters(6, 5, seed=5, prefix="val")
    runs = []
    for k in range(2):
        torch.manual_seed(0)
        head = ResidualMLPHead(train.dim, 16)
        result = train_embedding(
            head,
            train.vectors,
            train.label_codes(),
            dataclasses.replace(FAST, epochs=25, patience=5),
            val=(val.vectors, val.label_codes()),
            checkpoint_dir=tmp_path / f"run{k}",
            progress=False,
        )
        runs.append((head, result))
    (h1, r1), (h2, r2) = runs
    assert all(torch.equal(a, b) for a, b in zip(h1.state_dict().values(), h2.state_dict().values(), strict=True))
    assert r1.history == r2.history
    assert r1.history[0].val_ratio is not None and r1.kept.val_ratio <= r1.history[0].val_ratio
    # the kept weights are the best validation epoch's, saved as best.pt
    assert r1.best_epoch == min(range(len(r1.history)), key=lambda e: (r1.history[e].val_ratio, e))
    if r1.best_epoch > 0:
        saved = torch.load(r1.checkpoint, weights_only=True)
        assert saved["epoch"] == r1.best_epoch
        assert all(torch.equal(saved["model"][k], v) for k, v in h1.state_dict().items())
    assert (tmp_path / "run0" / "last.pt").is_file()
    if r1.stopped_early:
        assert r1.history[-1].epoch == r1.best_epoch + 5


def test_bad_training_config_is_named() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        TrainConfig(alpha=0.0)
    with pytest.raises(ConfigError, match="mining"):
        TrainConfig(mining="random")  # type: ignore[arg-type]
