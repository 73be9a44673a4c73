"""A deterministic triplet-loss training loop: P x K batches, online mining, checkpoints, early stopping.

Generic over the network: any ``torch.nn.Module`` mapping a batch of inputs to embeddings (the site adapter on
frozen encoder outputs is one; a network on images would be another). Determinism: ``torch.manual_seed`` and a
numpy ``Generator`` from ``config.seed``, one intra-op thread by default (also kind to a shared 2-core machine).
The weights of the best validation epoch are restored at the end; epoch 0 is the untrained network, so a run
that never beats it returns the network unchanged.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models.cache import atomic_write_bytes
from models.errors import ConfigError
from models.training.losses import mined_triplet_loss
from models.training.mining import MINING, MiningName, batch_hard, squared_distances
from models.training.sampler import PKSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    mining: MiningName = "batch-hard"
    alpha: float = 0.2  # margin, in squared-distance units (dlib's same-person bound 0.6 is 0.36 squared)
    p: int = 8  # identities per batch
    k: int = 4  # images per identity
    epochs: int = 300
    lr: float = 1e-3
    # weight of the network's ``identity_penalty()`` (distance from the untrained map) in the loss, if it has one
    regularisation: float = 1e-2
    patience: int = 30  # epochs without a validation improvement of min_delta before stopping
    min_delta: float = 1e-4
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.mining not in MINING:
            raise ConfigError(f"mining must be one of {', '.join(MINING)}, got {self.mining!r}")
        checks = (
            ("alpha", self.alpha > 0 and math.isfinite(self.alpha)),
            ("lr", self.lr > 0 and math.isfinite(self.lr)),
            ("regularisation", self.regularisation >= 0 and math.isfinite(self.regularisation)),
            ("min_delta", self.min_delta >= 0),
            ("epochs", self.epochs >= 1),
            ("patience", self.patience >= 1),
            ("p", self.p >= 2),
            ("k", self.k >= 2),
            ("threads", self.threads >= 1),
        )
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ConfigError(f"training: invalid {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}")


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 0 = before training
    train_loss: float | None  # mean over the epoch's batches (None at epoch 0)
    active: float | None  # fraction of the epoch's mined triplets still inside the margin
    val_loss: float | None  # the mined loss over the whole validation split (None without one)
    val_ratio: float | None  # the selection criterion, see ``validation_figures``


@dataclass(frozen=True)
class TrainResult:
    history: tuple[EpochRecord, ...]
    best_epoch: int  # the epoch whose weights were kept (the last one without a validation split)
    stopped_early: bool
    checkpoint: Path | None  # best.pt, when a checkpoint folder was given and an epoch beat epoch 0

    @property
    def kept(self) -> EpochRecord:
        return self.history[self.best_epoch]

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "epochs_run": self.history[-1].epoch,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "history": [asdict(h) for h in self.history],
        }


def _save(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def validation_figures(
    model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: TrainConfig
) -> tuple[float, float]:
    """(mined loss, hardest-pair ratio) over a whole split at once, without gradients.

    The ratio, mean over anchors of d(A, farthest P) / d(A, nearest N) in squared distances, is what selects the
    epoch: the hinge loss is exactly 0 once every validation triplet clears the margin (a well-separated split
    starts there), and it rewards merely inflating the scale; the ratio keeps ranking epochs and ignores scale.
    """
    model.eval()
    with torch.no_grad():
        emb = model(inputs)
        loss = float(mined_triplet_loss(emb, labels, config.alpha, config.mining).loss)
        d2 = squared_distances(emb)
        t = batch_hard(d2, labels)
        ratio = d2[t.anchor, t.positive] / d2[t.anchor, t.negative].clamp_min(1e-12)
        return loss, float(ratio.mean())


def train_embedding(
    model: torch.nn.Module,
    inputs: NDArray[np.floating],
    labels: NDArray[np.integer],
    config: TrainConfig,
    *,
    val: tuple[NDArray[np.floating], NDArray[np.integer]] | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place with the triplet loss; returns the history. See the module docstring."""
    from tqdm import tqdm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        sampler = PKSampler(y.numpy(), config.p, config.k, rng)

        if val is not None:
            xv = torch.as_tensor(np.asarray(val[0]), dtype=torch.float32)
            yv = torch.as_tensor(np.asarray(val[1]), dtype=torch.int64)

        def validate() -> tuple[float | None, float | None]:
            return (None, None) if val is None else validation_figures(model, xv, yv, config)

        penalty = getattr(model, "identity_penalty", None)
        optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
        history = [EpochRecord(0, None, None, *validate())]
        best = history[0].val_ratio if history[0].val_ratio is not None else math.inf
        best_epoch, best_state, stale, stopped = 0, copy.deepcopy(model.state_dict()), 0, False
        best_path = checkpoint_dir / "best.pt" if checkpoint_dir is not None and val is not None else None
        bar = tqdm(range(1, config.epochs + 1), desc="train", unit="epoch", file=sys.stderr, disable=not progress)
        for epoch in bar:
            model.train()
            losses, active, triplets = [], 0, 0
            for rows in sampler.epoch():
                idx = torch.from_numpy(rows)
                mined = mined_triplet_loss(model(x[idx]), y[idx], config.alpha, config.mining)
                total = mined.loss
                if callable(penalty) and config.regularisation > 0:
                    total = total + config.regularisation * penalty()
                optimiser.zero_grad()
                total.backward()
                optimiser.step()
                losses.append(mined.loss.item())
                active += mined.active
                triplets += mined.triplets
            record = EpochRecord(epoch, float(np.mean(losses)), active / max(1, triplets), *validate())
            history.append(record)
            bar.set_postfix(
                loss=f"{record.train_loss:.4f}", val="-" if record.val_ratio is None else f"{record.val_ratio:.4f}"
            )
            if record.val_ratio is None:
                best_epoch, best_state = epoch, model.state_dict()
            elif record.val_ratio < best - config.min_delta:
                best, best_epoch, best_state, stale = record.val_ratio, epoch, copy.deepcopy(model.state_dict()), 0
                if best_path is not None:
                    _save(
                        best_path,
                        {"epoch": epoch, "record": asdict(record), "model": best_state, "config": asdict(config)},
                    )
            else:
                stale += 1
                if stale >= config.patience:
                    stopped = True
                    log.info("early stop at epoch %d: no validation improvement since epoch %d", epoch, best_epoch)
                    break
        bar.close()
        if checkpoint_dir is not None:
            _save(
                checkpoint_dir / "last.pt",
                {"epoch": history[-1].epoch, "model": model.state_dict(), "optimiser": optimiser.state_dict()},
            )
        model.load_state_dict(best_state)
        model.eval()
        log.info("training: kept epoch %d of %d", best_epoch, history[-1].epoch)
        written = best_path if best_path is not None and best_epoch > 0 else None
        return TrainResult(tuple(history), best_epoch, stopped, written)
    finally:
        torch.set_num_threads(previous_threads)
