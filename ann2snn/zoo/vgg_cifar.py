"""VGG-11 and VGG-16 (Simonyan & Zisserman, 2015) with BatchNorm, for 32x32 CIFAR inputs.

Five 2x2 max-pools reduce a 32x32 input to 1x1x512, so the classifier works on
512 features instead of ImageNet's 7x7x512, with 512-wide hidden layers
(the usual CIFAR variant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ann2snn.zoo.initialization import init_fan_out

__all__ = ["VGGCifar", "vgg11_bn_cifar", "vgg16_bn_cifar"]

# Integers are 3x3 convolution widths, "M" a 2x2 max-pool.
_LAYER_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def _make_features(config: Sequence[int | str]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in config:
        if isinstance(entry, int):
            # Not in-place: forward hooks (e.g. activation calibration) must see intact inputs.
            layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), nn.BatchNorm2d(entry), nn.ReLU()]
            in_channels = entry
        else:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGGCifar(nn.Module):
    def __init__(self, config: Sequence[int | str], num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = _make_features(config)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

        init_fan_out(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11_bn_cifar(num_classes: int = 10, dropout: float = 0.5) -> VGGCifar:
    return VGGCifar(_LAYER_CONFIGS["vgg11"], num_classes=num_classes, dropout=dropout)


def vgg16_bn_cifar(num_classes: int = 10, dropout: float = 0.5) -> VGGCifar:
    return VGGCifar(_LAYER_CONFIGS["vgg16"], num_classes=num_classes, dropout=dropout)
