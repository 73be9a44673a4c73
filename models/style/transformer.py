"""The feed-forward image-transformation network (Johnson et al. 2016 layout), small enough for one CPU core.

9x9 conv -> two stride-2 3x3 convs (downsampling) -> residual blocks -> two nearest-neighbour x2 upsamplings each
followed by a 3x3 conv (instead of transposed convolutions, which leave checkerboard artefacts) -> 9x9 conv ->
sigmoid (RGB in 0..1). Reflection padding, instance normalisation (affine) after every conv but the last.
Width and depth are configurable; the defaults (width 16, 5 residual blocks, 0.42 M parameters) were sized for
<= 400 ms per 512x512 image on one CPU core with ONNX Runtime (measured ~315 ms; width 24: ~625 ms, 32: ~860 ms).
H and W must be multiples of 4 (runtime.SIZE_MULTIPLE; the runtime pads).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from models.errors import ConfigError, StyleError


@dataclass(frozen=True)
class TransformerConfig:
    width: int = 16  # channels after the first conv; 2x and 4x after the downsamplings
    residual_blocks: int = 5

    def __post_init__(self) -> None:
        if not 4 <= self.width <= 128 or not 0 <= self.residual_blocks <= 16:
            raise ConfigError(f"transformer width must be 4..128 and residual blocks 0..16, got {self}")

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> TransformerConfig:
        try:
            return cls(width=int(data["width"]), residual_blocks=int(data["residual_blocks"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StyleError(f"malformed transformer config {data!r}: {exc}") from exc


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    # an explicit pad module exports as one ONNX Pad with constant pads (Conv's padding_mode does not)
    return nn.Sequential(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(cin, cout, kernel, stride))


class _ConvIN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [_conv(cin, cout, kernel, stride), nn.InstanceNorm2d(cout, affine=True)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_ConvIN(channels, channels, 3), _ConvIN(channels, channels, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Upsample(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), _ConvIN(cin, cout, 3))


class TransformerNet(nn.Module):
    """RGB 0..1 NCHW in, RGB 0..1 NCHW out, same size (H, W multiples of 4)."""

    def __init__(self, config: TransformerConfig = TransformerConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.down = nn.Sequential(_ConvIN(3, w, 9), _ConvIN(w, 2 * w, 3, 2), _ConvIN(2 * w, 4 * w, 3, 2))
        self.res = nn.Sequential(*(_Residual(4 * w) for _ in range(config.residual_blocks)))
        self.up = nn.Sequential(_Upsample(4 * w, 2 * w), _Upsample(2 * w, w), _conv(w, 3, 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(self.res(self.down(x))))
