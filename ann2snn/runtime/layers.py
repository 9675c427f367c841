"""The synaptic modules of a spiking network besides its neurons: channel-wise affine maps, spike values
(`Scale`), and the temporal modules (bias injection, exact max pooling) with the window protocol they share."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F



def channel_shaped(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-channel values [C] shaped to broadcast along dim 1 of an ndim-dimensional activation."""
    return values.reshape((1, -1) + (1,) * (ndim - 2))


class ChannelAffine(nn.Module):
    """x * weight + bias along dim 1: a BatchNorm that could not be folded, in eval form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().flatten())
        self.register_buffer("bias", bias.detach().clone().flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * channel_shaped(self.weight, x.ndim) + channel_shaped(self.bias, x.ndim)


class Scale(nn.Module):
    """Multiplies by a positive constant (scalar or per channel): the value one spike stands for.

    Threshold balancing folds these into the following weights; the ones left are 1-to-1 weighted
    synapses (e.g. on a residual shortcut)."""

    def __init__(self, factor: torch.Tensor):
        super().__init__()
        self.register_buffer("factor", factor.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class TemporalModule(nn.Module):
    """A module of the spiking network whose output depends on the time step.

    The network tells it, before each call, which window of global time steps the folded input
    [steps * batch, ...] covers (`set_window`), and clears its state with `reset()`."""

    def __init__(self):
        super().__init__()
        self.t0 = 0
        self.steps = 1

    def set_window(self, t0: int, steps: int) -> None:
        self.t0, self.steps = t0, steps

    def reset(self) -> None:
        pass

    def unfold_time(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((self.steps, x.shape[0] // self.steps) + tuple(x.shape[1:]))


class AddBias(TemporalModule):
    """Bias injection. With rate coding the bias is a constant current added at every step; with
    accumulate coding (signed neurons) it is injected once, at step 0, so that the currents a neuron
    accumulates sum to the QANN pre-activation."""

    def __init__(self, bias: torch.Tensor, once: bool, channel_dim: int = 1):
        super().__init__()
        self.register_buffer("bias", bias.detach().clone().flatten())
        self.once = once
        self.channel_dim = channel_dim

    def shaped_bias(self, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return self.bias.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.shaped_bias(x.ndim)
        if not self.once:
            return x + bias
        if self.t0 > 0:
            return x
        per_step = x.shape[0] // self.steps
        return torch.cat([x[:per_step] + bias, x[per_step:]]) if self.steps > 1 else x + bias

    def extra_repr(self) -> str:
        return f"channels={self.bias.numel()}, once={self.once}, channel_dim={self.channel_dim}"


class SpikingMaxPool(TemporalModule):
    """Exact max pooling of spike trains.

    It pools the running sum of its input and emits the change of the pooled maximum, so the summed
    output over any prefix of time equals max-pooling of the summed input: the QANN's max-pooled
    activation for accumulate coding, and T times its rate for rate coding. Outputs are signed
    integers (in spike units) rather than a max over binary spikes, which would overcount."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool
        self.running_sum: torch.Tensor | None = None
        self.running_max: torch.Tensor | None = None

    def reset(self) -> None:
        self.running_sum = None
        self.running_max = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.unfold_time(x)
        cumulative = seq.cumsum(0)
        if self.running_sum is not None:
            cumulative = cumulative + self.running_sum
        pooled = self.pool(cumulative.flatten(0, 1))
        pooled = pooled.reshape((self.steps, seq.shape[1]) + tuple(pooled.shape[1:]))
        previous = torch.zeros_like(pooled[:1]) if self.running_max is None else self.running_max.unsqueeze(0)
        out = pooled - torch.cat([previous, pooled[:-1]])
        self.running_sum, self.running_max = cumulative[-1], pooled[-1]
        return out.flatten(0, 1)
