"""The seed's neural-style-transfer cost, exactly, plus the per-style calibration of its weights.

For one image and a layer l with activations a (n_H x n_W x n_C; here NCHW tensors):

* J_content(C, G) = 1 / (4 n_H n_W n_C) * sum (a(C) - a(G))^2
* Gram G_kk' = sum_ij a_ijk a_ijk'
* J_style^l(S, G) = 1 / (2 n_H n_W n_C)^2 * sum_kk' (G(S)_kk' - G(G)_kk')^2, J_style = sum_l lambda_l J_style^l
* J(G) = alpha J_content + beta J_style (+ tv * total variation)

Batches give the mean over images. When S and G differ in size, S's Gram is rescaled to G's number of positions
(G(S) * n_H n_W / (n_H(S) n_W(S))), which is the seed's formula itself when the sizes agree.

Calibration (per style): lambda_l are the seed's layer weights (equal by default) divided by each layer's
J_style^l between S and the reference content (the content image, or a batch of training images), so every layer
starts at the same share and J_style starts at 1; alpha is 1 / (the content layer's mean squared activation),
making J_content a relative error. `strength` is then beta: the same number means the same trade-off whatever
the painting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from models.errors import StyleError


def content_cost(a_c: torch.Tensor, a_g: torch.Tensor) -> torch.Tensor:
    _, n_c, n_h, n_w = a_g.shape
    return ((a_c - a_g) ** 2).sum(dim=(1, 2, 3)).mean() / (4 * n_h * n_w * n_c)


def gram(a: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x C x C, G_kk' = sum over positions of a_k a_k'."""
    f = a.flatten(2)
    return f @ f.transpose(1, 2)


@dataclass(frozen=True)
class StyleTarget:
    """One layer's Gram matrix of the style image (C x C) and the number of positions it was summed over."""

    gram: torch.Tensor
    positions: int


def style_targets(acts: Mapping[str, torch.Tensor]) -> dict[str, StyleTarget]:
    """The style image's targets from its activations (a batch of one)."""
    return {name: StyleTarget(gram(a)[0].detach(), a.shape[2] * a.shape[3]) for name, a in acts.items()}


def layer_style_cost(target: StyleTarget, a_g: torch.Tensor) -> torch.Tensor:
    _, n_c, n_h, n_w = a_g.shape
    diff = gram(a_g) - target.gram * (n_h * n_w / target.positions)
    return (diff**2).sum(dim=(1, 2)).mean() / (2 * n_h * n_w * n_c) ** 2


def style_cost(
    targets: Mapping[str, StyleTarget], acts: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> torch.Tensor:
    """sum_l lambda_l J_style^l."""
    return sum((weights[name] * layer_style_cost(targets[name], acts[name]) for name in targets), torch.zeros(()))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertical and horizontal neighbours (per image, then averaged)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2
    return dh.mean() + dw.mean()


@dataclass(frozen=True)
class CostWeights:
    """alpha, beta, tv and the per-layer lambda_l (calibration included); serialisable as plain floats."""

    alpha: float
    beta: float
    tv: float
    layer_weights: tuple[tuple[str, float], ...]

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "tv": self.tv, "layer_weights": dict(self.layer_weights)}

    @classmethod
    def from_json(cls, data: Mapping) -> CostWeights:
        try:
            return cls(
                float(data["alpha"]),
                float(data["beta"]),
                float(data["tv"]),
                tuple((str(k), float(v)) for k, v in data["layer_weights"].items()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StyleError(f"malformed cost weights {data!r}: {exc}") from exc


def calibrate(
    targets: Mapping[str, StyleTarget],
    reference_acts: Mapping[str, torch.Tensor],
    content_layer: str,
    *,
    strength: float,
    tv: float = 0.0,
    lambdas: Sequence[float] | None = None,
) -> CostWeights:
    """Weights that make J_style(S, reference) == 1 (each layer its lambda share) and J_content relative."""
    if strength <= 0:
        raise StyleError(f"style strength must be positive, got {strength}")
    names = list(targets)
    shares = list(lambdas) if lambdas is not None else [1.0 / len(names)] * len(names)
    if len(shares) != len(names) or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise StyleError(f"need {len(names)} non-negative layer weights, got {shares}")
    total = sum(shares)
    layer_weights = []
    with torch.no_grad():
        for name, share in zip(names, shares, strict=True):
            j = float(layer_style_cost(targets[name], reference_acts[name]))
            layer_weights.append((name, share / total / max(j, 1e-12)))
        energy = float((reference_acts[content_layer] ** 2).mean()) / 4
    return CostWeights(alpha=1.0 / max(energy, 1e-12), beta=strength, tv=tv, layer_weights=tuple(layer_weights))


@dataclass(frozen=True)
class CostTerms:
    total: torch.Tensor
    content: torch.Tensor  # alpha * J_content: the error relative to the content layer's energy
    style: torch.Tensor  # calibrated J_style (1.0 = the reference content image's own distance to the style)
    tv: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "content", "style", "tv")}


class StyleCost:
    """J(G) for a fixed style and weights; content activations are passed per call (one image or a batch)."""

    def __init__(self, targets: Mapping[str, StyleTarget], content_layer: str, weights: CostWeights) -> None:
        self.targets = dict(targets)
        self.content_layer = content_layer
        self.weights = weights
        self._lambdas = dict(weights.layer_weights)
        missing = set(self.targets) - set(self._lambdas)
        if missing:
            raise StyleError(f"no layer weight for style layer(s) {', '.join(sorted(missing))}")

    def __call__(self, acts: Mapping[str, torch.Tensor], content_act: torch.Tensor, image: torch.Tensor) -> CostTerms:
        w = self.weights
        j_content = w.alpha * content_cost(content_act, acts[self.content_layer])
        j_style = style_cost(self.targets, acts, self._lambdas)
        tv = total_variation(image) if w.tv else torch.zeros(())
        return CostTerms(j_content + w.beta * j_style + w.tv * tv, j_content, j_style, tv)
