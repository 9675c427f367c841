"""Counting synaptic operations, the basis of the energy estimate.

A synaptic layer (convolution, linear layer, or a 1-to-1 weighted synapse: `Scale`, `ChannelAffine`)
connects every input entry to the outputs it has a non-zero weight towards: its *fan-out*. The fan-out
map of a layer is computed once per input shape as the gradient of the summed output of the layer with
its weights replaced by the (weight != 0) mask, i.e. the transposed convolution of a ones tensor with
that mask: exact at the borders (padding connects to nothing) and blind to pruned synapses.

Two ways of counting, per sample and time step:

* dense (an ANN, or the SNN's static prefix on the analog input): every input entry is multiplied
  into every synapse it feeds, spike or not, so MACs = the sum of the fan-out map;
* event-driven (the SNN's body): an input row of integers is a set of spike events, each spike of
  magnitude k costing k × fan-out accumulates (ACs = sum |spike| × fan-out); a row that is not all
  integers carries values that must be multiplied into the weights: graded spikes (the adaptive
  neuron's, which carry the threshold they crossed), or analog values (a linear layer fed by another
  linear layer, as in MobileNetV2's linear bottleneck, or one fed through average pooling). Each of its
  non-zero entries costs fan-out MACs (MACs = sum over non-zero entries of the fan-out): for graded
  spikes one multiply-accumulate per synapse an event reaches, for an analog row (non-zero almost
  everywhere) the dense count.

Energy constants: 45 nm CMOS, 32-bit floating point (Horowitz, "Computing's energy problem", ISSCC
2014), the values the SNN conversion literature uses. This is the operation-only estimate; the memory traffic
counted alongside it per layer (the input entries read, the weights fetched) is priced by
`ann2snn.evaluation.energy`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.nn as nn
from torch.func import functional_call

from ann2snn.compiler.ops import WEIGHTED
from ann2snn.runtime.layers import ChannelAffine, Scale

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
ENERGY_REFERENCE = "45 nm CMOS, 32-bit float: E_MAC = 4.6 pJ, E_AC = 0.9 pJ (Horowitz, ISSCC 2014)"
PICOJOULES_PER_MICROJOULE = 1e6


def operation_energy_pj(multiply_accumulates: float, accumulates: float = 0.0) -> float:
    """The operation-only estimate: E_MAC per multiply-accumulate plus E_AC per accumulate."""
    return multiply_accumulates * E_MAC_PJ + accumulates * E_AC_PJ

# The tensor of each synaptic layer type whose non-zero entries are its synapses.
_CONNECTION_TENSORS: dict[type, str] = {**{kind: "weight" for kind in WEIGHTED}, ChannelAffine: "weight",
                                         Scale: "factor"}

Window = Callable[[], tuple[int, int]]

# What a counter records per synaptic layer and time step, summed over the samples: the operations, and the
# traffic the memory-aware energy model prices. An input entry is read as a spike event (integer rows, see the
# module docstring) or as a value to multiply; a weight is read once per synaptic event, or once per pass
# (sample and step) where the pass needs more fetches than the layer holds synapses: the hardware then streams
# the layer's weights once instead of fetching them per event.
COUNTS = ("accumulates", "multiply_accumulates", "spike_reads", "value_reads", "weight_reads")
Counts = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LayerSize:
    """A synaptic layer's size: input entries per sample, weight entries stored, and its synapses (non-zero
    weights)."""

    input_entries: int
    stored_weights: int
    synapses: int


def total(counts: Counts, quantity: str, steps: int) -> torch.Tensor:
    """One of `COUNTS` per time step, summed over the layers of a counter's `counts`."""
    row = COUNTS.index(quantity)
    return sum((layer[row] for layer in counts.values()), torch.zeros(steps, dtype=torch.float64))


def connection_tensor_name(layer: nn.Module) -> str | None:
    """The name of the parameter or buffer holding a synaptic layer's weights; None for other modules."""
    for kind, name in _CONNECTION_TENSORS.items():
        if isinstance(layer, kind):
            return name
    return None


class _WithoutHooks(nn.Module):
    """Runs a layer's forward without its hooks, so that probing a layer does not count as using it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.forward(x)


def fan_out(layer: nn.Module, sample_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """For one input sample of `sample_shape`, the number of non-zero synapses leaving each entry."""
    name = connection_tensor_name(layer)
    if name is None:
        raise TypeError(f"{type(layer).__name__} is not a synaptic layer")
    weights = getattr(layer, name)
    connected = (weights != 0).to(weights.dtype)
    probe = torch.zeros((1, *sample_shape), dtype=weights.dtype, device=weights.device, requires_grad=True)
    with torch.enable_grad():
        output = functional_call(_WithoutHooks(layer), {f"layer.{name}": connected}, (probe,))
        (fan,) = torch.autograd.grad(output.sum(), probe)
    return fan[0].detach()


class SynapticOperationCounter:
    """Forward hooks on every synaptic layer of `module`, summing its operations per time step.

    `accumulates[t]` and `multiply_accumulates[t]` are the ACs and MACs of time step t, summed over
    all samples seen. For a module called on time-folded inputs [steps * batch, ...] (the SNN body),
    `window` returns the (first step, steps) of the current call; by default every call is step 0 of a
    plain batch. `event_driven=False` counts every call densely, as an ANN computes. Per layer (by its name
    in `module`), `counts` holds every quantity of `COUNTS` per time step ([len(COUNTS), steps]) and `sizes`
    its `LayerSize`.
    """

    def __init__(self, module: nn.Module, *, event_driven: bool, steps: int = 1, window: Window | None = None):
        self.module = module
        self.event_driven = event_driven
        self.window = window or (lambda: (0, 1))
        self.steps = steps
        self.counts: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, LayerSize] = {}
        self._fan_outs: dict[tuple[int, torch.Size], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def accumulates(self) -> torch.Tensor:
        return total(self.counts, "accumulates", self.steps)

    @property
    def multiply_accumulates(self) -> torch.Tensor:
        return total(self.counts, "multiply_accumulates", self.steps)

    def __enter__(self) -> SynapticOperationCounter:
        for name, layer in self.module.named_modules():
            if connection_tensor_name(layer) is not None:
                self._handles.append(layer.register_forward_hook(
                    lambda layer, inputs, output, name=name: self._count(name, layer, inputs[0])))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _fan_out(self, layer: nn.Module, sample_shape: torch.Size) -> torch.Tensor:
        key = (id(layer), sample_shape)
        if key not in self._fan_outs:
            self._fan_outs[key] = fan_out(layer, sample_shape).flatten()
        return self._fan_outs[key]

    def _count(self, name: str, layer: nn.Module, x: torch.Tensor) -> None:
        first_step, steps = self.window()
        fan = self._fan_out(layer, x.shape[1:])
        if name not in self.sizes:
            weights = getattr(layer, connection_tensor_name(layer))
            self.sizes[name] = LayerSize(fan.numel(), weights.numel(), int((weights != 0).sum()))
            self.counts[name] = torch.zeros(len(COUNTS), self.steps, dtype=torch.float64)
        synapses = self.sizes[name].synapses
        rows = x.detach().reshape(steps, x.shape[0] // steps, -1)
        if self.event_driven:
            is_spike_row = rows.frac().abs_().amax(-1) == 0
            active = (rows != 0).to(rows.dtype)
            # In the input's precision: the partial sums are integers, exact in float32 below 2**24
            # per sample, and a float64 copy of every spike tensor would double the simulation's cost.
            event_acs = (rows.abs() @ fan).double()
            fetches = (active @ fan).double()
            events = active.sum(-1).double()
            acs = torch.where(is_spike_row, event_acs, 0.0).sum(1)
            macs = torch.where(is_spike_row, 0.0, fetches).sum(1)
            spike_reads = torch.where(is_spike_row, events, 0.0).sum(1)
            value_reads = torch.where(is_spike_row, 0.0, events).sum(1)
            weight_reads = fetches.clamp(max=synapses).sum(1)
        else:
            samples = torch.full((steps,), rows.shape[1], dtype=torch.float64, device=x.device)
            acs = spike_reads = torch.zeros_like(samples)
            macs = samples * fan.sum().double()
            value_reads = samples * rows.shape[2]
            weight_reads = samples * min(float(fan.sum()), synapses)
        counted = torch.stack([acs, macs, spike_reads, value_reads, weight_reads])
        self.counts[name][:, first_step:first_step + steps] += counted.cpu()
