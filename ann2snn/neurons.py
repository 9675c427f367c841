"""Spiking neurons. Multi-step: the input is [steps * batch, ...] with time folded into the batch
dimension (SpikingJelly's step mode 'm'); only the membrane recurrence loops over time.

Names follow SpikingJelly where they fit (`v_threshold`, `reset()`); reset is by subtraction."""
from __future__ import annotations

import torch

from .layers import TemporalModule


class SpikingNeuron(TemporalModule):
    """Membrane state plus spike bookkeeping; subclasses define one step of the dynamics (`fire`).

    Spikes are integers (multiples of one spike, signed for signed neurons) in the membrane's dtype;
    the value a spike stands for is a `Scale` after the neuron, folded downstream by balancing."""

    def __init__(self, v_threshold: torch.Tensor, max_spikes_per_step: int = 1, initial_membrane: float = 0.5):
        super().__init__()
        if max_spikes_per_step < 1:
            raise ValueError(f"max_spikes_per_step must be >= 1, got {max_spikes_per_step}")
        self.register_buffer("v_threshold", v_threshold.detach().clone())
        self.max_spikes_per_step = max_spikes_per_step
        self.initial_membrane = initial_membrane
        self.v: torch.Tensor | None = None
        self.spike_count: torch.Tensor | None = None
        self.activity: torch.Tensor | None = None

    def reset(self) -> None:
        self.v = None
        self.spike_count = None
        self.activity = None

    def init_state(self, like: torch.Tensor) -> None:
        self.v = (self.v_threshold * self.initial_membrane).expand_as(like).clone()

    def fire(self, current: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        currents = self.unfold_time(x)
        if self.v is None:
            self.init_state(currents[0])
        spikes = torch.empty_like(currents)
        for t in range(self.steps):
            spikes[t] = self.fire(currents[t])
        per_step = spikes.abs().flatten(2).sum(2)
        self.activity = per_step
        total = per_step.sum(0)
        self.spike_count = total if self.spike_count is None else self.spike_count + total
        return spikes.flatten(0, 1)

    def extra_repr(self) -> str:
        shape = "scalar" if self.v_threshold.dim() == 0 else f"per-channel {tuple(self.v_threshold.shape)}"
        return f"v_threshold={shape}, max_spikes_per_step={self.max_spikes_per_step}"


class IFNeuron(SpikingNeuron):
    """Integrate-and-fire, reset by subtraction, membrane starting at half threshold (the QCFS shift):
    with a constant input current z its firing rate approaches clamp(z / v_threshold, 0, 1)."""

    def fire(self, current: torch.Tensor) -> torch.Tensor:
        v = self.v.add_(current)
        if self.max_spikes_per_step == 1:
            spikes = (v >= self.v_threshold).to(v.dtype)
        else:
            spikes = torch.floor(v / self.v_threshold).clamp_(0, self.max_spikes_per_step)
        v.sub_(spikes * self.v_threshold)
        return spikes


class SignedNeuron(SpikingNeuron):
    """The equivalence neuron (cf. SpikeZIP-TF's ST-BIF): membrane plus a spike counter kept in [0, L].

    It fires +1 at threshold while its count is below L and -1 (taking back an early spike) when the
    membrane is below zero and its count above 0. Fed currents that sum to z, it settles with
    count = clamp(floor(z / v_threshold + 1/2), 0, L): the QCFS level, exactly. With accumulate coding
    inputs and biases are injected once and the network's output is the sum over time.

    With rate coding (`levels=None`, threshold theta) it is a signed IF neuron in the manner of Wang et
    al. 2022's signed neuron with memory: it takes back spikes fired too early when its input turns
    out lower than the first steps suggested, which removes most of the IF network's unevenness error."""

    def __init__(self, v_threshold: torch.Tensor, levels: int | None, max_spikes_per_step: int = 1,
                 initial_membrane: float = 0.5):
        super().__init__(v_threshold, max_spikes_per_step, initial_membrane)
        self.levels = float("inf") if levels is None else levels
        self.count: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.count = None

    def init_state(self, like: torch.Tensor) -> None:
        super().init_state(like)
        self.count = torch.zeros_like(self.v)

    def fire(self, current: torch.Tensor) -> torch.Tensor:
        v, count = self.v.add_(current), self.count
        if self.max_spikes_per_step == 1:
            up = v >= self.v_threshold
            if self.levels != float("inf"):
                up &= count < self.levels
            spikes = up.to(v.dtype).sub_(((v < 0) & (count > 0)).to(v.dtype))
        else:
            k = self.max_spikes_per_step
            up = torch.minimum(torch.floor(v / self.v_threshold).clamp_(0, k), self.levels - count)
            down = torch.minimum(torch.ceil(-v / self.v_threshold).clamp_(0, k), count)
            spikes = up - down
        v.sub_(spikes * self.v_threshold)
        count.add_(spikes)
        return spikes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}"


class LIFNeuron(IFNeuron):
    """Leaky integrate-and-fire: v <- decay * v + x before firing, reset by subtraction.

    A leak pulls the membrane towards 0 and so lowers the firing rate below z / v_threshold. With
    `compensate_leak` the neuron also receives the constant current (1 - decay) * v_threshold / 2,
    which makes the half-threshold starting point a fixed point: the leak then acts on the deviation
    from mid-threshold, whose time average is zero while the neuron fires regularly, so the rate
    matches the IF neuron's to first order. Without it, a converted network loses accuracy fast."""

    def __init__(self, v_threshold: torch.Tensor, decay: float = 0.95, compensate_leak: bool = True,
                 max_spikes_per_step: int = 1, initial_membrane: float = 0.5):
        super().__init__(v_threshold, max_spikes_per_step, initial_membrane)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.compensate_leak = compensate_leak
        self.register_buffer("leak_current", v_threshold * ((1.0 - decay) * initial_membrane if compensate_leak else 0.0))

    def fire(self, current: torch.Tensor) -> torch.Tensor:
        self.v.mul_(self.decay).add_(self.leak_current)
        return super().fire(current)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, decay={self.decay}, compensate_leak={self.compensate_leak}"
