"""ShuffleNetV2 (Ma et al., 2018) for 32x32 CIFAR inputs, in torchvision's module layout adapted as the
public chenyaofo/pytorch-cifar-models implementation does (stride-1 stem, no max pooling), so that its
checkpoints (e.g. ``../shared/models/shufflenetv2_x0_5-cifar10-chenyaofo.pt``) load strictly as they are.

The forward keeps the original's data movement, which the compiler has to handle as it is: a stride-1
unit splits its channels with ``x.chunk(2, dim=1)``, every unit shuffles channels by view / transpose /
contiguous / view, and the head averages with ``x.mean([2, 3])``.
Trained with mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010) (`PREPROCESSING`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ann2snn.zoo.cifar_resnet_b import PREPROCESSING

__all__ = ["PREPROCESSING", "ShuffleNetV2Cifar", "ShuffleUnit", "channel_shuffle", "shufflenet_v2_x0_5_cifar",
           "shufflenet_v2_x1_0_cifar"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, channels, height, width)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, bias=False, groups=channels)


def _pointwise_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class ShuffleUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride == 1 and in_channels != out_channels:
            raise ValueError(f"a stride-1 unit keeps its width, got {in_channels} -> {out_channels} channels")
        self.stride = stride
        branch_channels = out_channels // 2
        self.branch1 = nn.Sequential()
        if stride > 1:
            self.branch1 = nn.Sequential(_depthwise(in_channels, stride), nn.BatchNorm2d(in_channels),
                                         *_pointwise_bn_relu(in_channels, branch_channels))
        self.branch2 = nn.Sequential(
            *_pointwise_bn_relu(in_channels if stride > 1 else branch_channels, branch_channels),
            _depthwise(branch_channels, stride), nn.BatchNorm2d(branch_channels),
            *_pointwise_bn_relu(branch_channels, branch_channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            kept, transformed = x.chunk(2, dim=1)
            out = torch.cat((kept, self.branch2(transformed)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Cifar(nn.Module):
    def __init__(self, stage_repeats: Sequence[int], stage_channels: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        stem_channels, *unit_channels, head_channels = stage_channels
        self.conv1 = nn.Sequential(nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels),
                                   nn.ReLU(inplace=True))
        in_channels = stem_channels
        for index, (repeats, channels) in enumerate(zip(stage_repeats, unit_channels)):
            units = [ShuffleUnit(in_channels, channels, 2)] + [ShuffleUnit(channels, channels, 1)
                                                                for _ in range(repeats - 1)]
            self.add_module(f"stage{index + 2}", nn.Sequential(*units))
            in_channels = channels
        self.conv5 = nn.Sequential(*_pointwise_bn_relu(in_channels, head_channels))
        self.fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


def shufflenet_v2_x0_5_cifar(num_classes: int = 10) -> ShuffleNetV2Cifar:
    return ShuffleNetV2Cifar([4, 8, 4], [24, 48, 96, 192, 1024], num_classes)


def shufflenet_v2_x1_0_cifar(num_classes: int = 10) -> ShuffleNetV2Cifar:
    return ShuffleNetV2Cifar([4, 8, 4], [24, 116, 232, 464, 1024], num_classes)
