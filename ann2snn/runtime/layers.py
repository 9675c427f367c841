"""The synaptic modules of a spiking network besides its neurons: channel-wise affine maps, spike values
(`Scale`), and the one step protocol of temporal modules (`TemporalModule`) with two of them: bias injection
and exact max pooling."""
from __future__ import annotations

import torch
import torch.nn as nn

from ann2snn.runtime.coding import ACCUMULATE, RATE, Coding, Step
from ann2snn.runtime.coding import coding as coding_named


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
    """A module of the spiking network whose output depends on the time step: the one step protocol.

    Each temporal module declares once, in the spirit of SpikingJelly's `MemoryModule`:
    - its state: `state_names`, and `initial_state(x)`, each state tensor's value before the first step
      (given that step's input x); `reset()` clears it;
    - its one-step update `single_step_forward(x, t)`: the output at global step t (a Python int, or an
      int64 0-d tensor when traced) for the input x [batch, ...], updating the state.

    The simulator calls it on time folded into the batch ([steps * batch, ...], SpikingJelly's step mode
    'm'), after `set_window` told it which global steps the call covers; `forward` then runs
    `multi_step_forward` over the unfolded steps, which by default is the declared step at each step.
    Modules override it where a whole window at once is faster (the neurons' fused kernels, max pooling's
    cumulative sum), and tests/runtime/test_step_protocol.py holds every override to the declared step.
    The ONNX exporter traces `single_step_forward`, and the SpikingJelly bridge wraps it."""

    state_names: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.t0 = 0
        self.steps = 1

    def set_window(self, t0: int, steps: int) -> None:
        self.t0, self.steps = t0, steps

    def initial_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def state(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name, None) for name in self.state_names}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def reset(self) -> None:
        for name in self.state_names:
            setattr(self, name, None)

    def single_step_forward(self, x: torch.Tensor, t: Step) -> torch.Tensor:
        raise NotImplementedError

    def multi_step_forward(self, x_seq: torch.Tensor, t0: int) -> torch.Tensor:
        """[steps, batch, ...] inputs of global steps t0, t0 + 1, ... -> [steps, batch, ...] outputs."""
        return torch.stack([self.single_step_forward(x, t0 + i) for i, x in enumerate(x_seq)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = self.unfold_time(x)
        if any(value is None for value in self.state().values()):
            self.load_state(self.initial_state(x_seq[0]))
        return self.multi_step_forward(x_seq, self.t0).flatten(0, 1)

    def unfold_time(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((self.steps, x.shape[0] // self.steps) + tuple(x.shape[1:]))


def declares_step(module: TemporalModule) -> bool:
    """Whether the module declares its one-step update (what ONNX export and SpikingJelly need)."""
    return type(module).single_step_forward is not TemporalModule.single_step_forward


class AddBias(TemporalModule):
    """Bias injection: the bias is a static input of the network's coding (`Coding.frame`). With rate
    coding it is a constant current added at every step; with accumulate coding (signed neurons) it is
    injected once, at step 0, so that the currents a neuron accumulates sum to the QANN pre-activation."""

    def __init__(self, bias: torch.Tensor, coding: Coding | str, channel_dim: int = 1):
        super().__init__()
        self.register_buffer("bias", bias.detach().clone().flatten())
        self.coding = coding_named(coding)
        self.channel_dim = channel_dim

    def __setstate__(self, state: dict) -> None:
        # networks saved before codings were objects hold `once`
        if "once" in state:
            state["coding"] = ACCUMULATE if state.pop("once") else RATE
        super().__setstate__(state)

    @property
    def once(self) -> bool:
        return self.coding.inject_once

    def shaped_bias(self, ndim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return self.bias.reshape(shape)

    def single_step_forward(self, x: torch.Tensor, t: Step) -> torch.Tensor:
        return x + self.coding.frame(self.shaped_bias(x.ndim), t)

    def multi_step_forward(self, x_seq: torch.Tensor, t0: int) -> torch.Tensor:
        # The declared step for a whole window: the steps given the bias are leading ones, so one add over
        # their rows; the others pass unchanged. (Rows are added folded, as [rows, ...], so that they keep
        # the layout of the input, channels-last or not.)
        injected = self.coding.injected_steps(t0, x_seq.shape[0])
        bias = self.shaped_bias(x_seq.ndim - 1)
        if injected == x_seq.shape[0]:
            return x_seq + bias
        if injected == 0:
            return x_seq
        rows = torch.cat([x_seq[:injected].flatten(0, 1) + bias, x_seq[injected:].flatten(0, 1)])
        return rows.unflatten(0, x_seq.shape[:2])

    def extra_repr(self) -> str:
        return f"channels={self.bias.numel()}, coding={self.coding}, channel_dim={self.channel_dim}"


class SpikingMaxPool(TemporalModule):
    """Exact max pooling of spike trains.

    It pools the running sum of its input and emits the change of the pooled maximum, so the summed
    output over any prefix of time equals max-pooling of the summed input: the QANN's max-pooled
    activation for accumulate coding, and T times its rate for rate coding. Outputs are signed
    integers (in spike units) rather than a max over binary spikes, which would overcount."""

    state_names = ("running_sum", "running_max")

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool
        self.running_sum: torch.Tensor | None = None
        self.running_max: torch.Tensor | None = None

    def initial_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # zeros that broadcast: the sums and maxima take their shapes at the first step
        zero = x.new_zeros(())
        return {"running_sum": zero, "running_max": zero}

    def single_step_forward(self, x: torch.Tensor, t: Step) -> torch.Tensor:
        self.running_sum = self.running_sum + x
        pooled = self.pool(self.running_sum)
        out = pooled - self.running_max
        self.running_max = pooled
        return out

    def multi_step_forward(self, x_seq: torch.Tensor, t0: int) -> torch.Tensor:
        # The declared step for a whole window: the running sums of all its steps at once, one pooling call.
        cumulative = x_seq.cumsum(0) + self.running_sum
        pooled = self.pool(cumulative.flatten(0, 1)).unflatten(0, x_seq.shape[:2])
        out = pooled - torch.cat([self.running_max.expand_as(pooled[:1]), pooled[:-1]])
        self.running_sum, self.running_max = cumulative[-1], pooled[-1]
        return out
