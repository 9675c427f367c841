"""CIFAR ResNet-20/32/44/56 with "option B" shortcuts (a 1x1 convolution and BatchNorm where the shape
changes), in the layout of the public chenyaofo/pytorch-cifar-models implementation, so that its
checkpoints (e.g. ``../shared/models/resnet56-cifar10-chenyaofo.pt``) load strictly as they are.

Like the original, each block calls its one ``nn.ReLU(inplace=True)`` module twice (after the first
convolution and after the residual addition): a foreign model the compiler has to handle as it is.
Trained with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010) (`PREPROCESSING`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PREPROCESSING", "BasicBlockB", "CifarResNetB", "resnet20_b", "resnet32_b", "resnet44_b", "resnet56_b"]

PREPROCESSING = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010], "image_size": [3, 32, 32]}


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlockB(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class CifarResNetB(nn.Module):
    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for index, (planes, blocks) in enumerate(zip((16, 32, 64), num_blocks)):
            stride = 1 if index == 0 else 2
            layer = []
            for block in range(blocks):
                layer.append(BasicBlockB(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20_b(num_classes: int = 10) -> CifarResNetB:
    return CifarResNetB([3, 3, 3], num_classes)


def resnet32_b(num_classes: int = 10) -> CifarResNetB:
    return CifarResNetB([5, 5, 5], num_classes)


def resnet44_b(num_classes: int = 10) -> CifarResNetB:
    return CifarResNetB([7, 7, 7], num_classes)


def resnet56_b(num_classes: int = 10) -> CifarResNetB:
    return CifarResNetB([9, 9, 9], num_classes)
