"""MobileNetV2 (Sandler et al., 2018) adapted to 32x32 CIFAR inputs.

The ImageNet network divides the resolution by 32, which would leave a 1x1 map
on CIFAR. `mobilenet_v2_cifar` gives the stem convolution and the first two
stride-2 stages (24 and 32 channels) stride 1 instead, so the last stages run
at 8x8 (297 M MACs per image). `mobilenet_v2_cifar_s2` keeps the stride-2 stem
and gives only the 24-channel stage stride 1 (the last stages run at 2x2,
22 M MACs: about 13x cheaper to train and simulate on a CPU). Everything else
follows the paper: inverted residual blocks with depthwise 3x3 convolutions,
ReLU6, linear (activation-free) bottlenecks, and residual connections where
input and output shapes agree.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ann2snn.zoo.initialization import init_fan_out

__all__ = ["InvertedResidual", "MobileNetV2Cifar", "mobilenet_v2_cifar", "mobilenet_v2_cifar_s2"]

# (expansion factor t, output channels c, repeats n) of each stage
_INVERTED_RESIDUAL_STAGES: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1),
)
# stride of each stage's first block; ImageNet's are (1, 2, 2, 2, 1, 2, 1) after a stride-2 stem
_STRIDE_1_STEM_STAGE_STRIDES = (1, 1, 1, 2, 1, 2, 1)
_STRIDE_2_STEM_STAGE_STRIDES = (1, 1, 2, 2, 1, 2, 1)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of `divisor`, as the reference code does."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    # Never round down by more than 10 %, which would cost too much capacity.
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            # Not in-place: forward hooks (e.g. activation calibration) must see intact inputs.
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_channels = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden_channels, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_channels, hidden_channels, stride=stride, groups=hidden_channels),
            # Linear bottleneck: no activation after the projection.
            nn.Conv2d(hidden_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Cifar(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2, stem_stride: int = 1,
                 stage_strides: tuple[int, ...] = _STRIDE_1_STEM_STAGE_STRIDES) -> None:
        super().__init__()
        if len(stage_strides) != len(_INVERTED_RESIDUAL_STAGES):
            raise ValueError(f"stage_strides needs {len(_INVERTED_RESIDUAL_STAGES)} strides, got {stage_strides}")
        in_channels = _make_divisible(32 * width_mult)
        # The last layer is never made narrower, as in the paper.
        last_channels = _make_divisible(1280 * max(1.0, width_mult))

        layers: list[nn.Module] = [ConvBNReLU6(3, in_channels, stride=stem_stride)]
        for (expand_ratio, channels, repeats), first_stride in zip(_INVERTED_RESIDUAL_STAGES, stage_strides):
            out_channels = _make_divisible(channels * width_mult)
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio))
                in_channels = out_channels
        layers.append(ConvBNReLU6(in_channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*layers)

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

        init_fan_out(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(num_classes=num_classes, width_mult=width_mult, dropout=dropout)


def mobilenet_v2_cifar_s2(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(num_classes=num_classes, width_mult=width_mult, dropout=dropout, stem_stride=2,
                            stage_strides=_STRIDE_2_STEM_STAGE_STRIDES)
