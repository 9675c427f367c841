"""The modules of the quantized ANN: the one normalised activation form every ReLU variant becomes (and the
linear "activation" a quantized stream gets, see `ann2snn.compiler.passes.mark_streams`), and the QCFS
clip-floor-shift quantizer that replaces it."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ann2snn.compiler.observers import HistogramObserver
from ann2snn.runtime.layers import channel_shaped


class ClippedReLU(nn.Module):
    """The one activation form every ReLU variant is normalised to: clamp(x, 0, upper). With `signed` it is
    the identity that marks a linear value to be quantized symmetrically (a MobileNetV2 bottleneck output)."""

    def __init__(self, upper: float | None = None, signed: bool = False):
        super().__init__()
        if signed and upper is not None:
            raise ValueError("a signed (linear) activation has no clip")
        self.upper = upper
        self.signed = signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.signed else torch.clamp(x, min=0.0, max=self.upper)

    def extra_repr(self) -> str:
        return "signed" if self.signed else f"upper={self.upper}"


class QCFSQuantizer(nn.Module):
    """Clip-floor-shift activation: theta/L * clamp(floor(x * L/theta + 1/2), 0, L), or with `signed` (a linear
    value, see `ClippedReLU`) the symmetric theta/L * clamp(floor(x * L/theta + 1/2), -L, L).

    `theta` is a scalar (per layer) or shaped [1, C, 1, ...] (per channel). While an observer is
    attached (see `ann2snn.compiler.passes.calibrate_thresholds.observing`) the layer behaves as the float
    activation and records the statistics its threshold is chosen from.
    """

    # a quantizer saved before signed ones existed is unsigned
    signed = False

    def __init__(self, levels: int, upper: float | None = None, per_channel: bool = False, signed: bool = False):
        super().__init__()
        if not 1 <= levels <= 255:
            raise ValueError(f"levels must be in 1..255, got {levels}")
        self.levels = levels
        self.upper = upper
        self.per_channel = per_channel
        self.signed = signed
        self.register_buffer("theta", torch.tensor(float("nan")))
        self.observer: HistogramObserver | None = None

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.theta).any())

    @property
    def step(self) -> torch.Tensor:
        return self.theta / self.levels

    @property
    def lowest_level(self) -> int:
        return -self.levels if self.signed else 0

    def float_activation(self) -> ClippedReLU:
        """The float activation this quantizer stands for."""
        return ClippedReLU(self.upper, self.signed)

    def set_threshold(self, theta: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> None:
        """Set theta in `dtype`, the network's: a float64 network's thresholds rounded to float32 would make
        its spike thresholds and balanced weights differ from the QANN's steps by float32 rounding, and
        pre-activations that close to a level boundary (one in ~10**7) land one level apart."""
        theta = theta.detach().to(dtype).clamp_min(torch.finfo(dtype).tiny)
        self.theta = theta.reshape(()) if theta.numel() == 1 and not self.per_channel else channel_shaped(theta, ndim)

    def quantized_level(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.floor(x / self.step + 0.5), self.lowest_level, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            y = self.float_activation()(x)
            # a symmetric quantizer's error on -x mirrors its error on x: its threshold is chosen on |x|
            self.observer.update(y.abs() if self.signed else y)
            return y
        if self.training and torch.is_grad_enabled():
            return self.step * self._level_with_straight_through_gradient(x)
        return self.step * self.quantized_level(x)

    def _level_with_straight_through_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized level whose gradient treats floor as the identity (QCFS fine-tuning), so that
        both the input and a learnable theta receive gradients. Only for training: adding and removing
        the rounding residual is not bit-exact, and the SNN must match the eval form exactly."""
        scaled = x / self.step + 0.5
        return torch.clamp(scaled + (torch.floor(scaled) - scaled).detach(), self.lowest_level, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, upper={self.upper}, per_channel={self.per_channel}" + \
            (", signed" if self.signed else "")


def float_network(qann: fx.GraphModule) -> fx.GraphModule:
    """A copy of the QANN with every quantizer back to its float activation: the ANN with BatchNorm folded,
    whose activations carry the quantizers' names."""
    reference = copy.deepcopy(qann)
    for name, module in qann.named_modules():
        if isinstance(module, QCFSQuantizer):
            reference.add_submodule(name, module.float_activation())
    return reference
