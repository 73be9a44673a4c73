"""Training the feed-forward network for one style with the seed's cost, on content photos.

Content images (folders, plus optionally scikit-image's sample photos) are pre-shrunk, held out in part, and
sampled as heavily augmented square crops (random scale and aspect, flips, colour jitter, grey). The cost is the
optimiser mode's (models/style/cost.py), calibrated once on a batch of training crops. Checkpoints (atomic) carry
the model, the optimiser, the iteration, the calibration, the style's sha256 and the loss history; `resume`
continues one and refuses a checkpoint of another style or architecture.

`heldout_report` is the honesty check: the model's style loss on held-out images next to the optimiser mode's on
the same images, judged by the same cost. A model is reported as undertrained when its style loss is more than
`UNDERTRAINED_STYLE_RATIO` times the optimiser's, or its total cost J more than `UNDERTRAINED_COST_RATIO` times
(a network that paints the palette everywhere but loses the content has a low style loss and a high J), or when
the optimiser reference ran fewer than `MIN_CHECK_ITERATIONS` evaluations (too weak to certify anything).
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cv2
import numpy as np
import torch

from models.cache import atomic_write_bytes
from models.errors import ConfigError, ImageError, StyleError
from models.imageio import list_images, load_image
from models.registry import sha256_bytes
from models.style.cost import CostWeights, StyleCost, calibrate, style_targets
from models.style.images import resize_long_side
from models.style.lossnet import CONTENT_LAYER, STYLE_LAYERS, LossNetwork, load_mobilenet_v2
from models.style.optimize import DEFAULT_STRENGTH, OptimizeConfig, stylize_optimize, to_image, to_tensor
from models.style.runtime import SIZE_MULTIPLE
from models.style.transformer import TransformerConfig, TransformerNet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "faceattend-style-checkpoint-1"
UNDERTRAINED_STYLE_RATIO = 2.0
UNDERTRAINED_COST_RATIO = 1.2
MIN_CHECK_ITERATIONS = 100  # a weaker optimiser reference cannot certify a network as trained
# bundled with scikit-image itself (no download): photos, and textures that help with augmentation
SKIMAGE_SAMPLES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "brick",
    "grass",
    "gravel",
    "moon",
    "clock",
    "colorwheel",
)


@dataclass(frozen=True)
class TrainConfig:
    size: int = 256  # side of the square training crops
    batch_size: int = 4
    iterations: int = 2000
    lr: float = 1e-3
    strength: float = DEFAULT_STRENGTH
    tv: float = 0.0
    style_size: int = 512  # long side of the style image when its Gram matrices are taken
    holdout: int = 4  # content images kept out of training for the held-out check
    checkpoint_every: int = 100
    threads: int = 1
    seed: int = 0
    device: str = "cpu"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        if self.size < 32 or self.size % SIZE_MULTIPLE or self.size > 1024:
            raise ConfigError(f"training size must be a multiple of {SIZE_MULTIPLE} in 32..1024, got {self.size}")
        if min(self.batch_size, self.iterations, self.threads, self.checkpoint_every) < 1 or self.holdout < 0:
            raise ConfigError("batch size, iterations, threads and checkpoint interval must be >= 1, holdout >= 0")
        if self.lr <= 0 or self.strength <= 0 or self.tv < 0 or self.style_size < 32:
            raise ConfigError("lr and strength must be positive, tv non-negative, style size >= 32")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")


# ---- content images --------------------------------------------------------------------------------------------


def skimage_samples() -> list[tuple[str, np.ndarray]]:
    """A few photos every scikit-image install carries (RGB uint8)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise StyleError("scikit-image is not installed (pip install 'faceattend[demo]')") from exc
    out = []
    for name in SKIMAGE_SAMPLES:
        img = np.asarray(getattr(data, name)())
        img = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[:, :, :3]
        out.append((f"skimage:{name}", np.ascontiguousarray(img, dtype=np.uint8)))
    return out


def load_contents(folders: Sequence[str | Path], *, with_samples: bool, max_side: int) -> list[tuple[str, np.ndarray]]:
    """Every readable image, shrunk to `max_side`; unreadable files are logged and skipped."""
    items: list[tuple[str, np.ndarray]] = []
    for path in list_images(list(folders)):
        try:
            img = load_image(path)
        except ImageError as exc:
            log.warning("skipping content image: %s", exc)
            continue
        items.append((str(path), img))
    if with_samples:
        items.extend(skimage_samples())
    if not items:
        raise StyleError(f"no content images in {', '.join(map(str, folders)) or '(no folder given)'}")
    return [(name, resize_long_side(img, max_side) if max(img.shape[:2]) > max_side else img) for name, img in items]


def split_holdout(items: list, holdout: int, seed: int) -> tuple[list, list]:
    """(training, held-out), held-out chosen at random with the seed; training keeps at least one image."""
    n = min(holdout, len(items) - 1)
    order = np.random.default_rng(seed).permutation(len(items))
    held = set(order[:n].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def augment(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (10-100 % of the area, aspect 3:4..4:3) resized to size, flipped, colour-jittered."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.1, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
        if 8 <= ch <= h and 8 <= cw <= w:
            break
    else:
        ch = cw = min(h, w)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = cv2.resize(image[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = crop.astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2)  # contrast, brightness
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * (0.0 if rng.random() < 0.1 else rng.uniform(0.7, 1.3))  # saturation / grey
    return np.clip(out, 0, 255).astype(np.uint8)


def _batch(items: list[tuple[str, np.ndarray]], size: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    crops = [augment(items[rng.integers(len(items))][1], size, rng) for _ in range(n)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255).contiguous()


# ---- training --------------------------------------------------------------------------------------------------


def style_sha256(style: np.ndarray) -> str:
    """Identity of a style: sha256 over its pixels and shape (so a re-encoded copy of the same image matches)."""
    return sha256_bytes(np.ascontiguousarray(style).tobytes() + str(style.shape).encode())


@dataclass
class TrainState:
    """What a checkpoint holds besides the model and optimiser states; mutable: the training loop advances it."""

    iteration: int
    weights: CostWeights
    style_label: str
    style_sha256: str
    history: list[tuple[int, float, float, float]]  # iteration, J, alpha*J_content, J_style


@dataclass(frozen=True)
class TrainResult:
    model: TransformerNet
    state: TrainState
    seconds: float
    iterations_run: int


def _save_checkpoint(
    path: Path, model: TransformerNet, opt: torch.optim.Optimizer, st: TrainState, cfg: TrainConfig
) -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "iteration": st.iteration,
            "weights": st.weights.to_json(),
            "transformer": model.config.to_json(),
            "style": {"label": st.style_label, "sha256": st.style_sha256},
            "train": {k: v for k, v in asdict(cfg).items() if k != "transformer"},
            "history": [list(h) for h in st.history],
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())
    log.info("checkpoint %s (iteration %d)", path, st.iteration)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dictionary (tensors on the CPU); StyleError when it is not one of ours."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise StyleError(f"{path}: no such checkpoint") from exc
    except Exception as exc:  # pickle, zip and torch's own errors
        raise StyleError(f"{path}: not a readable style checkpoint ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise StyleError(f"{path}: not a faceattend style checkpoint (format {CHECKPOINT_FORMAT})")
    return data


def model_from_checkpoint(data: dict) -> TransformerNet:
    model = TransformerNet(TransformerConfig.from_json(data["transformer"]))
    try:
        model.load_state_dict(data["model"], strict=True)
    except RuntimeError as exc:
        raise StyleError(f"checkpoint weights do not fit the transformer: {exc}") from exc
    return model.eval()


def train_style(
    config: TrainConfig,
    style: np.ndarray,
    style_label: str,
    train_items: list[tuple[str, np.ndarray]],
    checkpoint: Path,
    *,
    resume: bool = False,
    progress: bool = False,
) -> TrainResult:
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    net = LossNetwork(load_mobilenet_v2(), (*STYLE_LAYERS, CONTENT_LAYER)).to(device)
    model = TransformerNet(config.transformer).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    digest = style_sha256(style)
    with torch.no_grad():
        s = to_tensor(resize_long_side(style, config.style_size)).to(device)
        targets = style_targets({k: v for k, v in net(s).items() if k in STYLE_LAYERS})

    if resume and checkpoint.is_file():
        data = load_checkpoint(checkpoint)
        if data["style"]["sha256"] != digest:
            raise StyleError(f"{checkpoint}: trained for style {data['style']['label']!r}, not {style_label!r}")
        if TransformerConfig.from_json(data["transformer"]) != config.transformer:
            raise StyleError(f"{checkpoint}: architecture {data['transformer']} differs from {config.transformer}")
        model.load_state_dict(data["model"], strict=True)
        opt.load_state_dict(data["optimizer"])
        state = TrainState(
            int(data["iteration"]),
            CostWeights.from_json(data["weights"]),
            style_label,
            digest,
            [(int(h[0]), *map(float, h[1:])) for h in data["history"]],
        )
        log.info("resuming %s at iteration %d", checkpoint, state.iteration)
    else:
        with torch.no_grad():
            ref = _batch(train_items, config.size, 16, np.random.default_rng(config.seed + 1)).to(device)
            weights = calibrate(targets, net(ref), CONTENT_LAYER, strength=config.strength, tv=config.tv)
        state = TrainState(0, weights, style_label, digest, [])
    cost = StyleCost(targets, CONTENT_LAYER, state.weights)

    rng = np.random.default_rng(config.seed + state.iteration)  # a resumed run does not replay the same crops
    started, first = time.perf_counter(), state.iteration
    model.train()
    with tqdm(
        total=config.iterations, initial=first, desc="train-style", unit="it", file=sys.stderr, disable=not progress
    ) as bar:
        while state.iteration < config.iterations:
            x = _batch(train_items, config.size, config.batch_size, rng).to(device)
            with torch.no_grad():
                content_act = net(x)[CONTENT_LAYER]
            y = model(x)
            terms = cost(net(y), content_act, y)
            opt.zero_grad()
            terms.total.backward()
            opt.step()
            state.iteration += 1
            f = terms.floats()
            if not np.isfinite(f["total"]):
                raise StyleError(f"training diverged at iteration {state.iteration} (J = {f['total']}); lower --lr")
            state.history.append((state.iteration, f["total"], f["content"], f["style"]))
            bar.update(1)
            bar.set_postfix(J=f"{f['total']:.3f}", style=f"{f['style']:.3f}", refresh=False)
            if state.iteration % config.checkpoint_every == 0 or state.iteration == config.iterations:
                _save_checkpoint(checkpoint, model, opt, state, config)
    model.eval()
    return TrainResult(model.cpu(), state, time.perf_counter() - started, state.iteration - first)


# ---- the honesty check -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldoutReport:
    images: int
    size: int
    model_cost: float  # J of the network's outputs (means over the images)
    model_style: float  # calibrated J_style (1.0 = the content's own distance to the style)
    model_content: float  # alpha * J_content
    optimizer_cost: float  # the same for the optimiser mode's results on the same images
    optimizer_style: float
    optimizer_content: float
    optimizer_iterations: int
    palette_progress: float  # how far the outputs' mean colour moved from the contents' toward the style's (0..1)
    examples: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = field(default=(), repr=False, compare=False)
    # (content, network's result, optimiser's result) per held-out image, RGB uint8

    @property
    def style_ratio(self) -> float:
        return float(self.model_style / max(self.optimizer_style, 1e-12))

    @property
    def cost_ratio(self) -> float:
        return float(self.model_cost / max(self.optimizer_cost, 1e-12))

    @property
    def certifiable(self) -> bool:
        return self.optimizer_iterations >= MIN_CHECK_ITERATIONS

    @property
    def undertrained(self) -> bool:
        behind = self.style_ratio > UNDERTRAINED_STYLE_RATIO or self.cost_ratio > UNDERTRAINED_COST_RATIO
        return behind or not self.certifiable

    def verdict(self) -> str:
        head = (
            f"on {self.images} held-out images the network's style loss is {self.model_style:.4f} vs the optimiser "
            f"mode's {self.optimizer_style:.4f} ({self.style_ratio:.2f}x), content {self.model_content:.3f} vs "
            f"{self.optimizer_content:.3f}, J {self.model_cost:.3f} vs {self.optimizer_cost:.3f} "
            f"({self.cost_ratio:.2f}x); palette moved {self.palette_progress:.0%} of the way to the style's"
        )
        if not self.certifiable:
            weak = f"the optimiser reference ran {self.optimizer_iterations} < {MIN_CHECK_ITERATIONS} evaluations"
            return f"UNDERTRAINED (not certified: {weak}): {head}"
        if self.undertrained:
            limits = f"limits {UNDERTRAINED_STYLE_RATIO:g}x style, {UNDERTRAINED_COST_RATIO:g}x J"
            return f"UNDERTRAINED: {head} ({limits}); train longer, on a GPU"
        return f"trained: {head}"

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "examples"}
        extra = {"style_ratio": self.style_ratio, "cost_ratio": self.cost_ratio, "undertrained": self.undertrained}
        return data | extra


def _crop_multiple(image: np.ndarray) -> np.ndarray:
    h, w = (d - d % SIZE_MULTIPLE for d in image.shape[:2])
    return image[:h, :w]


def heldout_report(
    model: TransformerNet,
    style: np.ndarray,
    weights: CostWeights,
    heldout: list[tuple[str, np.ndarray]],
    *,
    size: int,
    style_size: int,
    optimizer_iterations: int = 150,
    threads: int = 1,
    progress: bool = False,
) -> HeldoutReport:
    """The network and the optimiser mode on the same held-out images, judged by the training cost."""
    if not heldout:
        raise StyleError("no held-out images to judge the model on (holdout 0, or a single content image)")
    torch.set_num_threads(threads)
    net = LossNetwork(load_mobilenet_v2(), (*STYLE_LAYERS, CONTENT_LAYER))
    with torch.no_grad():
        targets = style_targets(
            {k: v for k, v in net(to_tensor(resize_long_side(style, style_size))).items() if k in STYLE_LAYERS}
        )
    judge = StyleCost(targets, CONTENT_LAYER, weights)
    # the optimiser minimises the very cost the network was trained on: same weights, same style image scale
    opt_cfg = OptimizeConfig(size=size, iterations=optimizer_iterations, threads=threads, style_scale=style_size / size)
    style_mean = style.reshape(-1, 3).mean(0)
    sums = np.zeros(6)
    progress_sum = 0.0
    examples = []
    model = model.cpu().eval()
    for _, image in heldout:
        content = _crop_multiple(resize_long_side(image, size))
        c = to_tensor(content)
        with torch.no_grad():
            c_act = net(c)[CONTENT_LAYER]
            y = model(c)
            ours = judge(net(y), c_act, y)
        optimised = stylize_optimize(content, style, opt_cfg, progress=progress, lossnet=net, weights=weights)
        opt_image = _crop_multiple(optimised.image)
        g = to_tensor(opt_image)
        with torch.no_grad():
            theirs = judge(net(g), c_act, g)
        sums += [float(t) for terms in (ours, theirs) for t in (terms.total, terms.style, terms.content)]
        examples.append((content, to_image(y), opt_image))
        out_mean = examples[-1][1].reshape(-1, 3).mean(0)
        start = np.linalg.norm(content.reshape(-1, 3).mean(0) - style_mean)
        progress_sum += 1 - np.linalg.norm(out_mean - style_mean) / max(start, 1e-6)
    n = len(heldout)
    m = sums / n
    return HeldoutReport(
        n, size, *(float(v) for v in m), optimizer_iterations, float(progress_sum / n), tuple(examples)
    )
