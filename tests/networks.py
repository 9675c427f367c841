"""Small networks shared by the tests. A network that exists to exercise one pattern of one test file (an in-place
op, a shared module, a data-dependent branch ...) stays in that file as test data."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import randomize_bn


def cnn(in_channels: int, widths: Sequence[int], features: int, classes: int, *, kernel: int = 3, stride: int = 1,
        padding: int = 1, batchnorm: bool = True, pool: nn.Module | None = None,
        hidden: int | None = None) -> nn.Sequential:
    """The plain convolutional classifier: per width Conv2d [-> BatchNorm2d] -> ReLU, then the pool (if any),
    Flatten, [Linear(features, hidden) -> ReLU ->] Linear(..., classes). A Sequential, so its layers are named by
    their index; the layers are created in that order (the same initialisation as the Sequential written out)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width in widths:
        layers.append(nn.Conv2d(channels, width, kernel, stride=stride, padding=padding))
        if batchnorm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        channels = width
    if pool is not None:
        layers.append(pool)
    layers.append(nn.Flatten())
    if hidden is not None:
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, classes))
    return nn.Sequential(*layers)


class ResidualNet(nn.Module):
    """conv1 [-> bn1] -> ReLU -> conv2 + shortcut -> ReLU [-> 2x2 max pool] -> fc, on 3x8x8 inputs: a residual add
    between two neuron layers (whose balancing rescales the add's neuron)."""

    def __init__(self, batchnorm: bool = True, pool: bool = True, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8) if batchnorm else None
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2) if pool else None
        self.fc = nn.Linear(8 * (4 if pool else 8) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = F.relu(self.bn1(y) if self.bn1 is not None else y)
        y = F.relu(self.conv2(y) + y)
        return self.fc((self.pool(y) if self.pool is not None else y).flatten(1))


class MixNet(nn.Module):
    """Conv/BN, depthwise conv, residual add, max/avg pooling, concatenation, padding and slicing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.pool = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(12, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))           # 6x8x8
        y = F.relu6(self.dw(x) * 2)
        x = torch.relu(self.conv3(y) + x)             # residual add
        a = self.pool(x)                              # 6x4x4
        b = F.avg_pool2d(x, 2)                        # 6x4x4
        c = F.pad(torch.cat([a, b], 1), (1, 1, 1, 1))  # 12x6x6
        x = self.conv4(c).clamp(0, 4)                 # 8x4x4
        x = F.max_pool2d(x, 3, 1, 1)[:, :, ::2, ::2]  # 8x2x2
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class DataMovementNet(nn.Module):
    """The data movement of ShuffleNetV2 and its kin between neurons: chunk, channel shuffle (view, transpose,
    contiguous, view), split, permute, unbind, expand and repeat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))                          # 8x8x8
        kept, transformed = x.chunk(2, dim=1)
        y = torch.cat((kept, F.relu(self.branch(transformed))), dim=1)
        n, c, h, w = y.size()
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, c, h, w)
        first, rest = torch.split(y, [3, 5], dim=1)
        z = F.relu(self.conv2(torch.cat((rest, first.permute(0, 1, 3, 2)), dim=1)))
        top_row = z.unbind(dim=2)[0]                                 # 8x8
        z = z + top_row.unsqueeze(2).expand(-1, -1, h, -1)
        z = F.relu6(z.repeat(1, 1, 1, 2)[..., w // 2:w // 2 + w])
        return self.fc(F.adaptive_avg_pool2d(z, 2).flatten(1))


_randomize_bn_wide = functools.partial(randomize_bn, bias=(-0.3, 0.5))


def calibration(seed: int = 5) -> list[torch.Tensor]:
    """Two calibration batches of 16 3x8x8 images for a MixNet."""
    torch.manual_seed(seed)
    return [torch.randn(16, 3, 8, 8) for _ in range(2)]


def build(seed: int = 0, network: type[nn.Module] = MixNet) -> nn.Module:
    """A MixNet (or another network of 3x8x8 images) with He-initialised weights, so that the output depends
    clearly on the input."""
    torch.manual_seed(seed)
    model = _randomize_bn_wide(network())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()
