"""Helpers shared by the tests."""
from __future__ import annotations

import torch
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_bn(model: nn.Module, mean: float = 0.5, var: tuple[float, float] = (0.5, 2.0),
                 weight: tuple[float, float] = (0.5, 1.5), bias: tuple[float, float] = (-0.5, 0.5)) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm of the model, so that
    folding and conversion are tested on something other than the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCHNORMS):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-mean, mean)
                    m.running_var.uniform_(*var)
                if m.affine:
                    m.weight.uniform_(*weight)
                    m.bias.uniform_(*bias)
    return model


def qann_levels(qann: nn.Module, x: torch.Tensor, names) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The QANN's output for x and the quantized level of each named quantizer on the way."""
    levels = {}
    hooks = [qann.get_submodule(name).register_forward_hook(
        lambda quantizer, inputs, _, name=name: levels.__setitem__(name, quantizer.quantized_level(inputs[0])))
        for name in names]
    try:
        return qann(x), levels
    finally:
        for hook in hooks:
            hook.remove()
