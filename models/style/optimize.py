"""Optimiser mode (Gatys et al.): the pixels of G minimise the seed's J(G), starting from the content image.

L-BFGS with a strong-Wolfe line search (restarted, i.e. its curvature history dropped, when a step no longer
lowers J), or Adam. No clamping inside the optimiser: G is clamped to 0..1 only when it is turned into an image.
Sizes above `coarse_to_fine_from` are first solved at half size, then refined at full size from the upsampled
result. Style images are scaled with the content (`style_scale` x the content's long side) so brush strokes keep
their size relative to the picture.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import ConfigError, ImageError, StyleError
from models.style.cost import CostTerms, CostWeights, StyleCost, calibrate, style_targets
from models.style.images import resize_long_side
from models.style.lossnet import CONTENT_LAYER, STYLE_LAYERS, LossNetwork, load_mobilenet_v2

log = logging.getLogger(__name__)

MAX_SIZE = 2048
DEFAULT_STRENGTH = 10.0


@dataclass(frozen=True)
class OptimizeConfig:
    size: int = 256  # long side of the result
    strength: float = DEFAULT_STRENGTH  # beta after calibration (see models/style/cost.py)
    method: Literal["lbfgs", "adam"] = "lbfgs"
    iterations: int = 300  # cost evaluations at the final scale (the coarse scale gets as many again)
    tv: float = 0.0
    style_scale: float = 1.0
    coarse_to_fine_from: int = 384
    adam_lr: float = 0.02
    threads: int = 1
    style_layers: tuple[str, ...] = STYLE_LAYERS
    content_layer: str = CONTENT_LAYER

    def __post_init__(self) -> None:
        if not 32 <= self.size <= MAX_SIZE:
            raise ConfigError(f"size must be 32..{MAX_SIZE} pixels, got {self.size}")
        if self.method not in ("lbfgs", "adam"):
            raise ConfigError(f"method must be lbfgs or adam, got {self.method!r}")
        if self.iterations < 1 or self.threads < 1:
            raise ConfigError("iterations and threads must be at least 1")
        if self.strength <= 0 or self.tv < 0 or self.style_scale <= 0 or self.adam_lr <= 0:
            raise ConfigError("strength, style_scale and adam_lr must be positive, tv non-negative")

    def scales(self) -> tuple[int, ...]:
        return (self.size // 2, self.size) if self.size > self.coarse_to_fine_from else (self.size,)


@dataclass(frozen=True)
class OptimizeResult:
    image: np.ndarray  # RGB uint8, the content's aspect ratio, long side = size
    start: dict[str, float]  # cost terms at the first evaluation of the final scale (G = upsampled / content)
    end: dict[str, float]  # cost terms of the returned image (the best evaluation)
    evaluations: int
    restarts: int
    seconds: float
    scales: tuple[int, ...]
    history: tuple[float, ...] = field(repr=False)  # J per evaluation at the final scale


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 RGB uint8 -> 1 x 3 x H x W float in 0..1."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected an H x W x 3 uint8 RGB image, got {image.shape} {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255).contiguous()


def to_image(x: torch.Tensor) -> np.ndarray:
    """1 x 3 x H x W (any range) -> H x W x 3 RGB uint8, clamped."""
    return (x.detach()[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


class _Run:
    """One scale's optimisation: counts evaluations, keeps the best G, feeds the progress bar."""

    def __init__(self, net: LossNetwork, cost: StyleCost, content_act: torch.Tensor, bar) -> None:
        self.net, self.cost, self.content_act, self.bar = net, cost, content_act, bar
        self.history: list[float] = []
        self.first: CostTerms | None = None
        self.best: tuple[float, torch.Tensor, CostTerms] | None = None

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        terms = self.cost(self.net(x), self.content_act, x)
        value = float(terms.total.detach())
        self.history.append(value)
        self.first = self.first or terms
        if np.isfinite(value) and (self.best is None or value < self.best[0]):
            self.best = (value, x.detach().clone(), terms)
        self.bar.update(1)
        self.bar.set_postfix(J=f"{value:.4g}", refresh=False)
        return terms.total

    def outcome(self) -> tuple[torch.Tensor, CostTerms, CostTerms]:
        """(the best G, its cost terms, the first evaluation's terms)."""
        if self.best is None or self.first is None:
            raise StyleError("the optimisation produced no finite cost (diverged)")
        return self.best[1], self.best[2], self.first


def _lbfgs(run: _Run, x: torch.Tensor, budget: int) -> int:
    """L-BFGS in chunks of at most 20 iterations; a chunk that does not lower J restarts it. Returns restarts."""
    restarts, stalls = 0, 0

    def new_optimizer() -> torch.optim.LBFGS:
        return torch.optim.LBFGS(
            [x], lr=1, max_iter=20, history_size=50, line_search_fn="strong_wolfe", tolerance_grad=0, tolerance_change=0
        )

    opt = new_optimizer()
    while len(run.history) < budget:
        before = run.best[0] if run.best else float("inf")
        opt.param_groups[0]["max_eval"] = max(1, budget - len(run.history))

        def closure(opt: torch.optim.LBFGS = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = run.evaluate(x)
            loss.backward()
            return loss

        opt.step(closure)
        after = run.best[0] if run.best else float("inf")
        if after < before * (1 - 1e-6):
            stalls = 0
            continue
        stalls += 1
        if stalls > 2 or run.best is None:
            log.info("L-BFGS stopped: %d restarts in a row did not lower J", stalls - 1)
            break
        restarts += 1
        log.debug("L-BFGS line search stalled at J=%.6g; restarting from the best G", after)
        with torch.no_grad():
            x.copy_(run.best[1])
        opt = new_optimizer()
    return restarts


def _adam(run: _Run, x: torch.Tensor, budget: int, lr: float) -> None:
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(budget):
        opt.zero_grad()
        run.evaluate(x).backward()
        opt.step()


def stylize_optimize(
    content: np.ndarray,
    style: np.ndarray,
    config: OptimizeConfig = OptimizeConfig(),
    *,
    progress: bool = False,
    lossnet: LossNetwork | None = None,
    weights: CostWeights | None = None,
) -> OptimizeResult:
    """G for RGB uint8 content and style images. `lossnet` may be shared between calls (it is read-only).

    `weights` replaces the per-image calibration (config.strength and config.tv are then unused): the held-out
    check of a trained network makes the optimiser minimise exactly the network's training cost.
    """
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    net = lossnet or LossNetwork(load_mobilenet_v2(), (*config.style_layers, config.content_layer))
    missing = set(config.style_layers) | {config.content_layer}
    if not missing <= set(net.layers):
        raise StyleError(f"the loss network does not tap {', '.join(sorted(missing - set(net.layers)))}")
    scales = config.scales()
    total = config.iterations * len(scales)
    x: torch.Tensor | None = None
    restarts = 0
    with tqdm(total=total, desc="stylize", unit="eval", file=sys.stderr, disable=not progress, leave=False) as bar:
        for size in scales:
            c = to_tensor(resize_long_side(content, size))
            s = to_tensor(resize_long_side(style, max(16, round(size * config.style_scale))))
            with torch.no_grad():
                targets = style_targets({k: v for k, v in net(s).items() if k in config.style_layers})
                c_acts = net(c)
            if weights is None:
                scale_weights = calibrate(targets, c_acts, config.content_layer, strength=config.strength, tv=config.tv)
            else:
                scale_weights = weights
            cost = StyleCost(targets, config.content_layer, scale_weights)
            init = c if x is None else F.interpolate(x, size=c.shape[2:], mode="bilinear", align_corners=False)
            x = init.detach().clone().requires_grad_(True)
            run = _Run(net, cost, c_acts[config.content_layer], bar)
            bar.set_description(f"stylize {size}px {config.method}")
            if config.method == "lbfgs":
                restarts += _lbfgs(run, x, config.iterations)
            else:
                _adam(run, x, config.iterations, config.adam_lr)
            x, end, start = run.outcome()
            log.info(
                "%d px: J %.5g -> %.5g in %d evaluations", size, run.history[0], end.floats()["total"], len(run.history)
            )
    return OptimizeResult(
        image=to_image(x),
        start=start.floats(),
        end=end.floats(),
        evaluations=len(run.history),
        restarts=restarts,
        seconds=time.perf_counter() - started,
        scales=scales,
        history=tuple(run.history),
    )
