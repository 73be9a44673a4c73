"""Adapter networks on the frozen encoder's 128-d embedding, both initialised to the identity map.

Starting at identity means the untrained adapter reproduces the encoder's space exactly: training moves away from
a known-good point, early stopping can return it untouched, and ``identity_penalty`` (weighted by the training
config's ``regularisation``) keeps a head near it when a site has few faces to learn from.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.errors import ConfigError
from models.training.adapter import HEAD_KINDS, AdapterWeights


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


class LinearHead(nn.Module):
    """y = W x + b, W = I and b = 0 at the start."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def identity_penalty(self) -> torch.Tensor:
        eye = torch.eye(self.linear.weight.shape[0], dtype=self.linear.weight.dtype)
        return ((self.linear.weight - eye) ** 2).sum() + (self.linear.bias**2).sum()

    def export_weights(self) -> AdapterWeights:
        return AdapterWeights("linear", ((_array(self.linear.weight), _array(self.linear.bias)),))


class ResidualMLPHead(nn.Module):
    """y = x + W2 relu(W1 x + b1) + b2: two layers on a skip connection, W2 = 0 and b2 = 0 at the start."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))

    def identity_penalty(self) -> torch.Tensor:
        # the residual branch's output layer is what moves the map away from identity
        return (self.fc2.weight**2).sum() + (self.fc2.bias**2).sum()

    def export_weights(self) -> AdapterWeights:
        return AdapterWeights(
            "mlp",
            (
                (_array(self.fc1.weight), _array(self.fc1.bias)),
                (_array(self.fc2.weight), _array(self.fc2.bias)),
            ),
        )


def build_head(kind: str, dim: int, hidden: int = 128) -> LinearHead | ResidualMLPHead:
    if kind == "linear":
        return LinearHead(dim)
    if kind == "mlp":
        if hidden < 1:
            raise ConfigError(f"adapter: hidden must be >= 1, got {hidden}")
        return ResidualMLPHead(dim, hidden)
    raise ConfigError(f"adapter: unknown head {kind!r} (known: {', '.join(HEAD_KINDS)})")
