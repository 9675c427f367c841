"""Weight initialisation shared by the CNNs trained from scratch."""
from __future__ import annotations

from torch import nn


def init_fan_out(model: nn.Module) -> None:
    """Kaiming (fan-out) convolutions, unit BatchNorm, small-normal linear layers, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
