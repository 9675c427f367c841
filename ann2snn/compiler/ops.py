"""Module classes by the role they play in a graph."""
from __future__ import annotations

import torch.nn as nn

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED = CONVS + (nn.Linear,)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
