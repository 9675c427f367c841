"""Spiking neurons. Multi-step: the input is [steps * batch, ...] with time folded into the batch
dimension (SpikingJelly's step mode 'm'); only the membrane recurrence loops over time.

Names follow SpikingJelly where they fit (`v_threshold`, `reset()`, `single_step_forward`); reset is by
subtraction.

Each model's dynamics are one function of its state tensors (`integrate_and_fire`, `signed_fire`, ...)
returning (output, spikes): what the neuron sends on, and its spike events, which are what spike counts
count (the two differ for the adaptive neuron, whose spikes carry the threshold they crossed). That
function is the neuron's declared step (`single_step_forward`, see `TemporalModule`), which the ONNX
exporter traces; the multi-step update runs it once per step, or a fused kernel built from it or held to
it bit for bit (`ann2snn.runtime.kernels`, chosen by the `kernels` setting the network passes on)."""
from __future__ import annotations

from typing import Callable

import torch

from ann2snn.runtime import kernels as step_kernels
from ann2snn.runtime.coding import Step
from ann2snn.runtime.kernels import native
from ann2snn.runtime.layers import TemporalModule

# Chosen on models/resnet20.pt (4 bits, T=32): 8 % fewer spikes than IF at the same accuracy (500 test
# images); on 200, increases of 0.1 and more cost 1.5 to 3 points for 1 to 8 % fewer spikes, larger
# increases pass saturated inputs further above the clip (see AdaptiveNeuron).
DEFAULT_ADAPT_INCREASE = 0.05
DEFAULT_ADAPT_DECAY = 0.9


Fired = tuple[torch.Tensor, torch.Tensor]


def _threshold_crossings(v: torch.Tensor, threshold: torch.Tensor, max_spikes_per_step: int) -> torch.Tensor:
    if max_spikes_per_step == 1:
        return (v >= threshold).to(v.dtype)
    return torch.floor(v / threshold).clamp_(0, max_spikes_per_step)


def integrate_and_fire(v: torch.Tensor, current: torch.Tensor, v_threshold: torch.Tensor,
                       max_spikes_per_step: int) -> Fired:
    """One step of an integrate-and-fire membrane `v` (updated in place), reset by subtraction."""
    v.add_(current)
    spikes = _threshold_crossings(v, v_threshold, max_spikes_per_step)
    v.sub_(spikes * v_threshold)
    return spikes, spikes


def leaky_integrate_and_fire(v: torch.Tensor, current: torch.Tensor, v_threshold: torch.Tensor,
                             max_spikes_per_step: int, decay: float, leak_current: torch.Tensor) -> Fired:
    v.mul_(decay).add_(leak_current)
    return integrate_and_fire(v, current, v_threshold, max_spikes_per_step)


def adaptive_integrate_and_fire(v: torch.Tensor, adaptation: torch.Tensor, current: torch.Tensor,
                                v_threshold: torch.Tensor, max_spikes_per_step: int, adapt_increase: float,
                                adapt_decay: float) -> Fired:
    """One step of an adaptive-threshold neuron: threshold v_threshold * (1 + adaptation). A spike removes
    the threshold it crossed from `v` and carries it (output 1 + adaptation in units of v_threshold), so
    the charge sent on equals the charge removed and the rate code holds with fewer, heavier spikes."""
    v.add_(current)
    weight = adaptation + 1
    threshold = v_threshold * weight
    spikes = _threshold_crossings(v, threshold, max_spikes_per_step)
    v.sub_(spikes * threshold)
    adaptation.mul_(adapt_decay).add_(spikes * adapt_increase)
    return spikes * weight, spikes


def signed_fire(v: torch.Tensor, count: torch.Tensor, current: torch.Tensor, v_threshold: torch.Tensor,
                levels: float, max_spikes_per_step: int, lowest: float = 0.0) -> Fired:
    """One step of a signed neuron: membrane `v` and spike counter `count` (kept in [lowest, levels]), both
    updated in place."""
    v.add_(current)
    if max_spikes_per_step == 1:
        up = v >= v_threshold
        if levels != float("inf"):
            up &= count < levels
        spikes = up.to(v.dtype).sub_(((v < 0) & (count > lowest)).to(v.dtype))
    else:
        k = max_spikes_per_step
        up = torch.minimum(torch.floor(v / v_threshold).clamp_(0, k), levels - count)
        down = torch.minimum(torch.ceil(-v / v_threshold).clamp_(0, k), count - lowest)
        spikes = up - down
    v.sub_(spikes * v_threshold)
    count.add_(spikes)
    return spikes, spikes


def step_into(dynamics: Callable, output: torch.Tensor, activity: torch.Tensor, state: tuple,
              current: torch.Tensor, constants: tuple) -> None:
    """One step of `dynamics`, its output written into `output` and its spikes per sample into `activity`:
    the eager step of the multi-step update, which the fused kernels replace."""
    sent, spikes = dynamics(*state, current, *constants)
    output.copy_(sent)
    activity.copy_(spikes.abs().flatten(1).sum(1))


# Hand-written kernels, by (dynamics, dtype, device type): they replace the compiled step where they apply.
NATIVE_STEPS: dict[tuple, Callable] = {(integrate_and_fire, torch.float32, "cpu"): native.integrate_and_fire_step}


class SpikingNeuron(TemporalModule):
    """Membrane state plus spike bookkeeping; subclasses give their dynamics (`dynamics` applied to the
    state tensors `state_names[:-1]`, the current and `constants()`).

    Spikes are integers (multiples of one spike, signed for signed neurons) in the membrane's dtype;
    the value a spike stands for is a `Scale` after the neuron, folded downstream by balancing.
    `spike_count` (per sample, summed since the reset) and `activity` (per step and sample, of the last
    multi-step call) count spike events, whatever value the output gives them. `kernels` selects how the
    multi-step update runs (see `ann2snn.runtime.kernels`); the network sets it before simulating."""

    dynamics: Callable[..., Fired]
    # The membrane `v`, the dynamics' other state tensors (each starting at zero), and the spike count.
    state_names = ("v", "spike_count")
    # Buffers measured in membrane units: they scale with the input (see `scale_input`).
    membrane_unit_buffers: tuple[str, ...] = ("v_threshold",)
    kernels: str = step_kernels.DEFAULT_KERNELS

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
        super().reset()
        self.activity = None

    def scale_input(self, factor: torch.Tensor) -> None:
        """Fire the same spikes on inputs multiplied by `factor` (positive, scalar or per channel): every
        quantity in membrane units (threshold, and through it the initial membrane) scales with it."""
        for name in self.membrane_unit_buffers:
            setattr(self, name, getattr(self, name) * factor)

    def initial_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # (a sum with zeros takes x's layout, NCHW or channels-last, and exports to ONNX as one Add)
        v = torch.zeros_like(x) + self.v_threshold * self.initial_membrane
        return {"v": v, **{name: torch.zeros_like(v) for name in self.state_names[1:-1]},
                "spike_count": x.new_zeros(x.shape[0])}

    def dynamics_state(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.state_names[:-1])

    def constants(self) -> tuple:
        return (self.v_threshold, self.max_spikes_per_step)

    def single_step_forward(self, x: torch.Tensor, t: Step) -> torch.Tensor:
        output, spikes = type(self).dynamics(*self.dynamics_state(), x, *self.constants())
        self.spike_count = self.spike_count + spikes.abs().flatten(1).sum(1)
        return output

    def multi_step_forward(self, x_seq: torch.Tensor, t0: int) -> torch.Tensor:
        # The declared step at every step of the window, as `step_into` or a kernel held to it bit for bit.
        outputs = torch.empty_like(x_seq)
        per_step = x_seq.new_empty(x_seq.shape[:2])
        dynamics = type(self).dynamics
        native_step = NATIVE_STEPS.get((dynamics, x_seq.dtype, x_seq.device.type))
        step_kernels.run_steps(self.kernels, step_into, native_step, dynamics, outputs, per_step,
                               self.dynamics_state(), x_seq, self.constants())
        self.activity = per_step
        self.spike_count = self.spike_count + per_step.sum(0)
        return outputs

    def extra_repr(self) -> str:
        shape = "scalar" if self.v_threshold.dim() == 0 else f"per-channel {tuple(self.v_threshold.shape)}"
        return f"v_threshold={shape}, max_spikes_per_step={self.max_spikes_per_step}"


class IFNeuron(SpikingNeuron):
    """Integrate-and-fire, reset by subtraction, membrane starting at half threshold (the QCFS shift):
    with a constant input current z its firing rate approaches clamp(z / v_threshold, 0, 1)."""

    dynamics = staticmethod(integrate_and_fire)


class SignedNeuron(SpikingNeuron):
    """The equivalence neuron (cf. SpikeZIP-TF's ST-BIF): membrane plus a spike counter kept in [0, L].

    It fires +1 at threshold while its count is below L and -1 (taking back an early spike) when the
    membrane is below zero and its count above 0. Fed currents that sum to z, it settles with
    count = clamp(floor(z / v_threshold + 1/2), 0, L): the QCFS level, exactly. With accumulate coding
    inputs and biases are injected once and the network's output is the sum over time. With `symmetric`
    the count runs from -L (from -inf when rate-coded): it stands for a signed quantizer, and -1 spikes below
    zero are the negative levels.

    With rate coding (`levels=None`, threshold theta) it is a signed IF neuron in the manner of Wang et
    al. 2022's signed neuron with memory: it takes back spikes fired too early when its input turns
    out lower than the first steps suggested, which removes most of the IF network's unevenness error."""

    dynamics = staticmethod(signed_fire)
    state_names = ("v", "count", "spike_count")

    # a neuron saved before symmetric ones existed counts from 0
    lowest = 0.0

    def __init__(self, v_threshold: torch.Tensor, levels: int | None, max_spikes_per_step: int = 1,
                 initial_membrane: float = 0.5, symmetric: bool = False):
        super().__init__(v_threshold, max_spikes_per_step, initial_membrane)
        self.levels = float("inf") if levels is None else levels
        self.lowest = -self.levels if symmetric else 0.0
        self.count: torch.Tensor | None = None

    def constants(self) -> tuple:
        return (self.v_threshold, self.levels, self.max_spikes_per_step, self.lowest)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}" + (", symmetric" if self.lowest else "")


class LIFNeuron(IFNeuron):
    """Leaky integrate-and-fire: v <- decay * v + x before firing, reset by subtraction.

    A leak pulls the membrane towards 0 and so lowers the firing rate below z / v_threshold. With
    `compensate_leak` the neuron also receives the constant current (1 - decay) * v_threshold / 2,
    which makes the half-threshold starting point a fixed point: the leak then acts on the deviation
    from mid-threshold, whose time average is zero while the neuron fires regularly, so the rate
    matches the IF neuron's to first order. Without it, a converted network loses accuracy fast."""

    dynamics = staticmethod(leaky_integrate_and_fire)
    membrane_unit_buffers = ("v_threshold", "leak_current")

    def __init__(self, v_threshold: torch.Tensor, decay: float = 0.95, compensate_leak: bool = True,
                 max_spikes_per_step: int = 1, initial_membrane: float = 0.5):
        super().__init__(v_threshold, max_spikes_per_step, initial_membrane)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.compensate_leak = compensate_leak
        leak = (1.0 - decay) * initial_membrane if compensate_leak else 0.0
        self.register_buffer("leak_current", v_threshold * leak)

    def constants(self) -> tuple:
        return (*super().constants(), self.decay, self.leak_current)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, decay={self.decay}, compensate_leak={self.compensate_leak}"


class AdaptiveNeuron(SpikingNeuron):
    """Integrate-and-fire with an adaptive threshold v_threshold * (1 + a): each spike raises a by
    `adapt_increase`, and a decays by `adapt_decay` per step. A spike removes the threshold it crossed
    and carries it (see `adaptive_integrate_and_fire`): a neuron driven hard fires fewer, heavier
    spikes, the charge it sends on staying the IF neuron's. With adapt_increase=0 it is the IF neuron.

    Unlike the IF neuron it does not clip at one threshold per step: firing at every step, it sends up to
    1 + adapt_increase / (1 - adapt_decay) thresholds, so inputs above the threshold pass partly
    unclipped. That is what limits the increase before accuracy suffers."""

    dynamics = staticmethod(adaptive_integrate_and_fire)
    state_names = ("v", "adaptation", "spike_count")

    def __init__(self, v_threshold: torch.Tensor, max_spikes_per_step: int = 1, initial_membrane: float = 0.5,
                 adapt_increase: float = DEFAULT_ADAPT_INCREASE, adapt_decay: float = DEFAULT_ADAPT_DECAY):
        super().__init__(v_threshold, max_spikes_per_step, initial_membrane)
        if not adapt_increase >= 0:
            raise ValueError(f"adapt_increase must be >= 0, got {adapt_increase!r}")
        if not 0 <= adapt_decay < 1:
            raise ValueError(f"adapt_decay must be in [0, 1), got {adapt_decay!r}")
        self.adapt_increase = float(adapt_increase)
        self.adapt_decay = float(adapt_decay)
        self.adaptation: torch.Tensor | None = None

    def constants(self) -> tuple:
        return (*super().constants(), self.adapt_increase, self.adapt_decay)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapt_increase={self.adapt_increase}, adapt_decay={self.adapt_decay}"
