"""Spiking neurons. Multi-step: the input is [steps * batch, ...] with time folded into the batch
dimension (SpikingJelly's step mode 'm'); only the membrane recurrence loops over time.

Names follow SpikingJelly where they fit (`v_threshold`, `reset()`); reset is by subtraction.

Each model's dynamics are one function of its state tensors (`integrate_and_fire`, `signed_fire`, ...)
returning (output, spikes): what the neuron sends on, and its spike events, which are what spike counts
count (the two differ for the adaptive neuron, whose spikes carry the threshold they crossed). `fire`
applies it to the module's state (the ONNX exporter traces that), and the simulator runs it once per
step. Where torch.compile works (a C++ compiler for CPU tensors, Triton for CUDA) and a layer is large
enough to pay for the call, each step of a layer is one fused kernel compiled from that very
function: the same float operations in the same order (Inductor does not contract them into FMAs), so
the same spikes bit for bit, in one pass over memory instead of one per operation. The IF neuron on CPU
has a hand-written kernel instead (`native`, cheaper to call and one pass where Inductor makes two),
held to the same bit-for-bit standard by the tests.

Neuron state takes the layout of the currents (NCHW or channels-last): kernels see every tensor of a
step flat, in memory order."""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import types
import warnings
from typing import Callable

import torch

from ann2snn.runtime.kernels import native
from ann2snn.runtime.layers import TemporalModule

FUSED_ENV_VAR = "ANN2SNN_FUSED_NEURONS"
# Below this many neurons per step a compiled kernel saves less than its call costs: small layers stay
# eager (the native kernel's call is cheap enough for any layer).
FUSED_MIN_ELEMENTS = 16384
_compiled_steps: dict[tuple, Callable | None] = {}
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
                levels: float, max_spikes_per_step: int) -> Fired:
    """One step of a signed neuron: membrane `v` and spike counter `count`, both updated in place."""
    v.add_(current)
    if max_spikes_per_step == 1:
        up = v >= v_threshold
        if levels != float("inf"):
            up &= count < levels
        spikes = up.to(v.dtype).sub_(((v < 0) & (count > 0)).to(v.dtype))
    else:
        k = max_spikes_per_step
        up = torch.minimum(torch.floor(v / v_threshold).clamp_(0, k), levels - count)
        down = torch.minimum(torch.ceil(-v / v_threshold).clamp_(0, k), count)
        spikes = up - down
    v.sub_(spikes * v_threshold)
    count.add_(spikes)
    return spikes, spikes


def _step_into(dynamics: Callable, output: torch.Tensor, activity: torch.Tensor, state: tuple,
               current: torch.Tensor, constants: tuple) -> None:
    """One step of `dynamics`, its output written into `output` and its spikes per sample into `activity`."""
    sent, spikes = dynamics(*state, current, *constants)
    output.copy_(sent)
    activity.copy_(spikes.abs().flatten(1).sum(1))


# Hand-written kernels, by (dynamics, dtype, device type): they replace the compiled step where they apply.
NATIVE_STEPS: dict[tuple, Callable] = {(integrate_and_fire, torch.float32, "cpu"): native.integrate_and_fire_step}


def _fusion_unavailable(device: torch.device) -> str | None:
    """Why fused kernels cannot be used on `device`, or None."""
    if os.environ.get(FUSED_ENV_VAR, "1") == "0":
        return f"{FUSED_ENV_VAR}=0"
    if device.type == "cpu":
        return None if native.find_compiler(os.environ.get("CXX")) else "no C++ compiler found (set CXX)"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        return None
    return f"no fused kernels for {device.type} tensors"


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """The dimensions of [batch, ...] from outermost to innermost in memory (batch first): (0, 1, 2, 3) for
    NCHW tensors, (0, 2, 3, 1) for channels-last ones."""
    return [0] + sorted(range(1, tensor.dim()), key=lambda dim: -tensor.stride(dim))


def _flat(tensor: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[batch, ...] as [batch, neurons] in memory order (a view): every layer then has the same rank, so
    that one kernel serves them all, whatever the layout."""
    return tensor.permute(order).reshape(tensor.shape[0], -1)


def _flat_constant(value, sample: torch.Tensor, order: list[int]):
    """A constant of the dynamics for flat tensors: per-channel constants spelled out over the neurons of
    one sample, in the order of its memory."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() == 1:
        return value.reshape(())
    return value.expand(sample.shape).permute(order).reshape(1, -1)


def _fusion_key(dynamics: Callable, state: tuple, current: torch.Tensor, constants: tuple,
                order: list[int]) -> tuple | None:
    """What selects the fused kernel of one step (None where fusion does not apply: the state and the
    current must be dense, in one layout; `order` is the current's `_memory_order`)."""
    if (torch.is_grad_enabled() and current.requires_grad) or torch.compiler.is_compiling() \
            or not current.permute(order).is_contiguous() \
            or not all(tensor.stride() == current.stride() for tensor in state) \
            or _fusion_unavailable(current.device) is not None:
        return None
    # Tensor constants by whether they are scalars, Python ones (levels, spikes per step, decay) by value:
    # compiled code specialises on those, and a process that meets many values would otherwise exhaust
    # TorchDynamo's limit on recompilations of one key.
    constant_kinds = tuple(c.numel() == 1 if isinstance(c, torch.Tensor) else c for c in constants)
    return dynamics, current.dtype, current.device.type, constant_kinds


def _fused_step(key: tuple, neurons: int) -> Callable | None:
    """The fused `_step_into` for calls of this key on `neurons` neurons per step: the native kernel where
    there is one, else the compiled step for layers large enough to pay for its call."""
    native_step = NATIVE_STEPS.get(key[:3])
    if native_step is not None and native.library() is not None:
        return native_step
    return _compiled_step(key) if neurons >= FUSED_MIN_ELEMENTS else None


def _compiled_step(key: tuple) -> Callable | None:
    """The compiled `_step_into` for calls of this key; None after its compilation failed."""
    if key not in _compiled_steps:
        _import_quietly("torch.utils.cpp_extension")
        # TorchDynamo keeps compiled graphs, and its limit on recompilations, per code object: each key
        # gets a copy of the code of its own. Dynamic shapes: one compilation serves every layer and
        # batch size.
        code_copy = types.FunctionType(_step_into.__code__.replace(), _step_into.__globals__, _step_into.__name__)
        _compiled_steps[key] = torch.compile(code_copy, dynamic=True, fullgraph=True)
    return _compiled_steps[key]


def _import_quietly(module: str) -> None:
    """Import `module` with its logger's warnings off: Inductor's C++ backend imports cpp_extension,
    whose import warns on every machine without CUDA that it found no CUDA runtime."""
    logger = logging.getLogger(module)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module(module)
    finally:
        logger.setLevel(level)


def _run_steps(dynamics: Callable, outputs: torch.Tensor, activity: torch.Tensor, state: tuple,
               currents: torch.Tensor, constants: tuple) -> None:
    """All steps of a chunk: `currents`, `outputs` [steps, batch, ...], `activity` [steps, batch]."""
    step, start, view = _step_into, 0, (lambda tensor: tensor)
    order = _memory_order(currents[0])
    key = _fusion_key(dynamics, state, currents[0], constants, order)
    fused = _fused_step(key, currents[0].numel()) if key is not None else None
    if fused is not None:
        sample = currents[0, :1]
        flat_state = tuple(_flat(tensor, order) for tensor in state)
        flat_constants = tuple(_flat_constant(value, sample, order) for value in constants)
        try:
            fused(dynamics, _flat(outputs[0], order), activity[0], flat_state, _flat(currents[0], order), flat_constants)
            step, start, state, constants = fused, 1, flat_state, flat_constants
            view = lambda tensor: _flat(tensor, order)
        except Exception as error:  # a compilation that failed never ran: the state is untouched
            _compiled_steps[key] = None
            warnings.warn(f"fused neuron kernel unavailable, running eager torch ops instead: it "
                          f"failed ({type(error).__name__}: {str(error).strip()[:300]})", RuntimeWarning, stacklevel=4)
    for t in range(start, currents.shape[0]):
        step(dynamics, view(outputs[t]), activity[t], state, view(currents[t]), constants)


class SpikingNeuron(TemporalModule):
    """Membrane state plus spike bookkeeping; subclasses give their dynamics (`dynamics` applied to
    `state_tensors()`, the current and `constants()`).

    Spikes are integers (multiples of one spike, signed for signed neurons) in the membrane's dtype;
    the value a spike stands for is a `Scale` after the neuron, folded downstream by balancing.
    `spike_count` and `activity` count spike events, whatever value the output gives them."""

    dynamics: Callable[..., Fired]

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

    # Buffers measured in membrane units: they scale with the input (see `scale_input`).
    membrane_unit_buffers: tuple[str, ...] = ("v_threshold",)
    # State tensors besides the membrane `v`, each starting at zero (e.g. a spike counter).
    zero_state: tuple[str, ...] = ()

    def reset(self) -> None:
        self.v = None
        self.spike_count = None
        self.activity = None
        for name in self.zero_state:
            setattr(self, name, None)

    def scale_input(self, factor: torch.Tensor) -> None:
        """Fire the same spikes on inputs multiplied by `factor` (positive, scalar or per channel): every
        quantity in membrane units (threshold, and through it the initial membrane) scales with it."""
        for name in self.membrane_unit_buffers:
            setattr(self, name, getattr(self, name) * factor)

    def init_state(self, like: torch.Tensor) -> None:
        # (a sum with zeros takes like's layout, NCHW or channels-last, and exports to ONNX as one Add)
        self.v = torch.zeros_like(like) + self.v_threshold * self.initial_membrane
        for name in self.zero_state:
            setattr(self, name, torch.zeros_like(self.v))

    def state_names(self) -> tuple[str, ...]:
        return ("v", *self.zero_state)

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.state_names())

    def constants(self) -> tuple:
        return (self.v_threshold, self.max_spikes_per_step)

    def fire(self, current: torch.Tensor) -> Fired:
        """One time step on this neuron's state; returns (output, spikes)."""
        return type(self).dynamics(*self.state_tensors(), current, *self.constants())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        currents = self.unfold_time(x)
        if self.v is None:
            self.init_state(currents[0])
        outputs = torch.empty_like(currents)
        per_step = currents.new_empty(currents.shape[:2])
        _run_steps(type(self).dynamics, outputs, per_step, self.state_tensors(), currents, self.constants())
        self.activity = per_step
        total = per_step.sum(0)
        self.spike_count = total if self.spike_count is None else self.spike_count + total
        return outputs.flatten(0, 1)

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
    inputs and biases are injected once and the network's output is the sum over time.

    With rate coding (`levels=None`, threshold theta) it is a signed IF neuron in the manner of Wang et
    al. 2022's signed neuron with memory: it takes back spikes fired too early when its input turns
    out lower than the first steps suggested, which removes most of the IF network's unevenness error."""

    dynamics = staticmethod(signed_fire)
    zero_state = ("count",)

    def __init__(self, v_threshold: torch.Tensor, levels: int | None, max_spikes_per_step: int = 1,
                 initial_membrane: float = 0.5):
        super().__init__(v_threshold, max_spikes_per_step, initial_membrane)
        self.levels = float("inf") if levels is None else levels
        self.count: torch.Tensor | None = None

    def constants(self) -> tuple:
        return (self.v_threshold, self.levels, self.max_spikes_per_step)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}"


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
        self.register_buffer("leak_current", v_threshold * ((1.0 - decay) * initial_membrane if compensate_leak else 0.0))

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
    zero_state = ("adaptation",)

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
