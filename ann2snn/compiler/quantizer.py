"""The modules of the quantized ANN: the one normalised activation form every ReLU variant becomes, and the
QCFS clip-floor-shift quantizer that replaces it."""
from __future__ import annotations

import torch
import torch.nn as nn

from ann2snn.compiler.observers import HistogramObserver
from ann2snn.runtime.layers import channel_shaped


class ClippedReLU(nn.Module):
    """The one activation form every ReLU variant is normalised to: clamp(x, 0, upper)."""

    def __init__(self, upper: float | None = None):
        super().__init__()
        self.upper = upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0.0, max=self.upper)

    def extra_repr(self) -> str:
        return f"upper={self.upper}"


class QCFSQuantizer(nn.Module):
    """Clip-floor-shift activation: theta/L * clamp(floor(x * L/theta + 1/2), 0, L).

    `theta` is a scalar (per layer) or shaped [1, C, 1, ...] (per channel). While an observer is
    attached (see `ann2snn.compiler.passes.calibrate_thresholds.observing`) the layer behaves as the float
    activation and records the statistics its threshold is chosen from.
    """

    def __init__(self, levels: int, upper: float | None = None, per_channel: bool = False):
        super().__init__()
        if not 1 <= levels <= 255:
            raise ValueError(f"levels must be in 1..255, got {levels}")
        self.levels = levels
        self.upper = upper
        self.per_channel = per_channel
        self.register_buffer("theta", torch.tensor(float("nan")))
        self.observer: HistogramObserver | None = None

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.theta).any())

    @property
    def step(self) -> torch.Tensor:
        return self.theta / self.levels

    def set_threshold(self, theta: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> None:
        """Set theta in `dtype`, the network's: a float64 network's thresholds rounded to float32 would make
        its spike thresholds and balanced weights differ from the QANN's steps by float32 rounding, and
        pre-activations that close to a level boundary (one in ~10**7) land one level apart."""
        theta = theta.detach().to(dtype).clamp_min(torch.finfo(dtype).tiny)
        self.theta = theta.reshape(()) if theta.numel() == 1 and not self.per_channel else channel_shaped(theta, ndim)

    def quantized_level(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.floor(x / self.step + 0.5), 0, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            y = torch.clamp(x, min=0.0, max=self.upper)
            self.observer.update(y)
            return y
        if self.training and torch.is_grad_enabled():
            return self.step * self._level_with_straight_through_gradient(x)
        return self.step * self.quantized_level(x)

    def _level_with_straight_through_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized level whose gradient treats floor as the identity (QCFS fine-tuning), so that
        both the input and a learnable theta receive gradients. Only for training: adding and removing
        the rounding residual is not bit-exact, and the SNN must match the eval form exactly."""
        scaled = x / self.step + 0.5
        return torch.clamp(scaled + (torch.floor(scaled) - scaled).detach(), 0, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, upper={self.upper}, per_channel={self.per_channel}"
