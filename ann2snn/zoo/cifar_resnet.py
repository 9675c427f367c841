"""CIFAR ResNet-20/32/44/56 (He et al., 2016, section 4.2) with "option A" shortcuts.

The module layout, parameter names and forward computation follow the public
akamaster/pytorch_resnet_cifar10 implementation, so its pretrained checkpoints
(e.g. ``../shared/models/resnet20-cifar10.th``) load strictly once their
DataParallel ``module.`` prefix is stripped. The forward deliberately keeps that
repository's style (functional ``F.relu``, in-place shortcut addition, a
parameter-free padding shortcut, ``F.avg_pool2d`` over the whole map): it is a
"foreign" model the compiler has to handle as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "LambdaLayer", "resnet20", "resnet32", "resnet44", "resnet56"]


class LambdaLayer(nn.Module):
    """Wraps a parameter-free tensor function as a module (the option-A shortcut)."""

    def __init__(self, function: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return self.function(x)


def _subsample_and_pad_channels(x: Tensor, pad_channels: int) -> Tensor:
    # Option A: halve the spatial size by taking every other pixel and zero-pad
    # the channel dimension on both sides, so the shortcut stays parameter-free.
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad_channels, pad_channels), "constant", 0)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            # A partial of a module-level function rather than the original
            # lambda: same computation and trace, but the model stays picklable.
            self.shortcut = LambdaLayer(partial(_subsample_and_pad_channels, pad_channels=planes // 4))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


def _kaiming_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(module.weight)


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16

        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)

        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        blocks = []
        for block_stride in strides:
            blocks.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([3, 3, 3], num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([5, 5, 5], num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([7, 7, 7], num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet([9, 9, 9], num_classes)
