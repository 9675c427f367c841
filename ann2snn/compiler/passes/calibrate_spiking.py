"""Pass 11 (SNN calibration): fit a converted rate-coded network to the T steps it runs, on calibration images.

`bias` is the light calibration of Li et al. (ICML 2021, "A free lunch from ANN"): each neuron layer's mean
firing rate times threshold is made to match, per channel, the mean of the ANN activation it stands for
(clipped at the threshold, the most a neuron can send), by a constant current. A rate-coded neuron fed
uneven spike trains fires early spikes it cannot take back, and layers late in the network start late: both
shift its mean rate, and each layer passes the shift on. The layers are corrected in order within one
simulation of T steps: the simulator runs each layer over all T steps before the next (time folded into the
batch), so when a neuron layer receives its input currents every layer before it is corrected already. That
is Li et al.'s layer-by-layer calibration at the cost of one simulation. Rates are measured over the steps the
network's read-out counts (all but the first `readout_delay` x T), so that each layer is fitted where its
output is used.

The current is added to the bias of the convolution or linear layer that feeds the neuron, directly or
through a residual add (in the neuron's membrane units, which threshold balancing gave that layer), and
injected by an `AddBias` before the neuron where no such layer does.

`weights` is the advanced calibration of the same paper, then `bias`: before its bias is corrected, the
convolution or linear layer feeding a neuron alone (as above) has its weights and bias refitted so that, image by
image and neuron by neuron, the neuron's rate over the read-out window matches the clipped ANN activation. The
fit sees the spike rates the layer really receives in the SNN (over the same window, the layers before it fitted
already), not the ANN's activations, so it corrects what the spiking layers before passed on per image, which a
constant current per channel cannot. The neuron is modelled as a rate-coded IF neuron over the window, whose
spike count is the floor of its membrane at the window's start plus the window's current, in thresholds, clipped
to the window, with a straight-through gradient for the floor (Li et al.'s model with the measured membrane);
layers the graph gives no such feeding layer get the bias correction only. Adding a method is one entry in
SPIKING_CALIBRATIONS."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ann2snn.compiler.graph_utils import call_sites, free_name
from ann2snn.compiler.ops import WEIGHTED, Role, role_of
from ann2snn.compiler.passes.calibrate_thresholds import observing
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.errors import ConversionWarning
from ann2snn.runtime.coding import RATE
from ann2snn.runtime.layers import AddBias, channel_shaped
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neurons import SpikingNeuron

NO_CALIBRATION = "none"
# A channel's mean rate is a staircase in its current (each neuron's rate moves in steps of 1/T): a first-order
# step lands beside the target. Measured on tests/networks.py's MixNet at T=16, the largest channel error
# after 1, 2 and 4 steps: 0.015, 0.010, 0.008 spikes per step; each step is one run of the layer's dynamics.
BIAS_ITERATIONS = 3
# After the weight fit the rates are close already: one step measured 79.4 / 82.8 % at T = 16 / 32 on the shared
# ResNet-20 (test-1000) against 79.9 / 82.4 % with three, in 0.7x the conversion time.
BIAS_ITERATIONS_AFTER_WEIGHTS = 1
# The most one activation of the calibration simulation (images x T steps) may take.
CALIBRATION_WORKING_SET = 1 << 30
# Adam on each layer's weights and bias, full batch over the calibration images' window-mean inputs; the rate is
# relative to the layer's mean absolute weight (balancing gives each layer its own scale). On the shared ResNet-20
# (test-1000, each T its own conversion, 1 thread, three bias steps after): 20 steps at 5e-3 give 79.9 / 82.4 % at
# T = 16 / 32 with conversion in 29 / 46 s, 100 at 1e-3 79.1 / 82.1 % in 102 / 118 s, 10 at 1e-2 79.1 / 81.8 % in
# 25 / 39 s.
WEIGHT_ITERATIONS = 20
WEIGHT_LEARNING_RATE = 5e-3


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """Per channel (dim 1), the mean over every other dimension."""
    return x.mean([dim for dim in range(x.dim()) if dim != 1])


def reference_rates(qann: fx.GraphModule, inputs: torch.Tensor, per_neuron: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Per quantizer, the float ANN's activation clipped at the quantizer's threshold, in thresholds: the firing
    rate its neurons should have (1 is a spike at every step); its channel means, unless `per_neuron` (then
    per image and neuron, in the simulation's memory layout)."""
    rates: dict[str, torch.Tensor] = {}

    def record(name: str, quantizer: QCFSQuantizer, output: torch.Tensor) -> None:
        rate = torch.minimum(output, quantizer.theta) / quantizer.theta
        rates[name] = rate if per_neuron else channel_means(rate)

    quantizers = {name: m for name, m in qann.named_modules() if isinstance(m, QCFSQuantizer)}
    hooks = [quantizer.register_forward_hook(lambda module, args, output, name=name: record(name, module, output))
             for name, quantizer in quantizers.items()]
    try:
        with observing(qann), torch.no_grad():
            qann(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return rates


@contextmanager
def fresh(neuron: SpikingNeuron, currents: torch.Tensor) -> Iterator[SpikingNeuron]:
    """`neuron` in its initial state for `currents` [steps, batch, ...], reset again afterwards (the network
    runs it next)."""
    neuron.reset()
    neuron.load_state(neuron.initial_state(currents[0]))
    try:
        yield neuron
    finally:
        neuron.reset()


def fired_rates(neuron: SpikingNeuron, currents: torch.Tensor, counted_from: int = 0) -> torch.Tensor:
    """The channel means of what `neuron`, fresh, sends per step for `currents` [steps, batch, ...], in spikes,
    over the steps from `counted_from` on (the network's read-out window)."""
    with fresh(neuron, currents):
        return channel_means(neuron.multi_step_forward(currents, 0)[counted_from:].mean(0))


def bias_correction(neuron: SpikingNeuron, currents: torch.Tensor, reference: torch.Tensor,
                    counted_from: int = 0, iterations: int = BIAS_ITERATIONS) -> torch.Tensor:
    """The constant current per channel, in membrane units, that moves the neuron's mean rate over the steps
    from `counted_from` on onto the reference rate: `iterations` first-order steps (one spike per step is
    one threshold of current), each from the rates the current so far gives."""
    threshold = neuron.v_threshold.flatten()
    current = torch.zeros_like(reference)
    for _ in range(iterations):
        shifted = currents + channel_shaped(current, currents.dim() - 1)
        current = current + (reference - fired_rates(neuron, shifted, counted_from)) * threshold
    return current


@dataclass
class LayerUnderCalibration:
    """What the simulation gives a method for one neuron layer: the currents reaching it [steps, batch, ...], its
    reference rates per image and neuron [batch, ...], the first step its read-out counts, and the convolution or
    linear layer feeding it alone (None where there is none) with that layer's inputs [steps, batch, ...]."""

    neuron: SpikingNeuron
    currents: torch.Tensor
    reference: torch.Tensor
    counted_from: int
    layer: nn.Module | None = None
    layer_inputs: torch.Tensor | None = None


def light(calibration: LayerUnderCalibration, iterations: int = BIAS_ITERATIONS) -> torch.Tensor:
    return bias_correction(calibration.neuron, calibration.currents, channel_means(calibration.reference),
                           calibration.counted_from, iterations)


def membrane_at(neuron: SpikingNeuron, currents: torch.Tensor, step: int) -> torch.Tensor:
    """The membrane of `neuron`, fresh, after the first `step` steps of `currents` [steps, batch, ...]."""
    with fresh(neuron, currents):
        if step:
            neuron.multi_step_forward(currents[:step].contiguous(), 0)
        return neuron.v.clone()


def window_rates(neuron: SpikingNeuron, start: torch.Tensor, currents: torch.Tensor, window: int) -> torch.Tensor:
    """The model of a rate-coded neuron's rate over a read-out window of `window` steps that it enters with
    membrane `start`, for window-mean `currents`: reset by subtraction sends floor((start + window x current) /
    threshold) spikes, clipped to 0 .. window, while the membrane stays in 0 .. threshold; differentiable through
    the floor by a straight-through gradient."""
    threshold = channel_shaped(neuron.v_threshold.flatten(), currents.dim())
    drive = (start + window * currents) / threshold
    counts = drive + (torch.floor(drive) - drive).detach()
    return counts.clamp(0, window) / window


def fit_weights(calibration: LayerUnderCalibration) -> None:
    """Refit the feeding layer's weights and bias to the reference, on the window-mean inputs the SNN gives it;
    the currents are updated to what the refitted layer sends (the rest of them, e.g. a residual branch, kept)."""
    layer, inputs = calibration.layer, calibration.layer_inputs
    if layer is None:
        return
    counted = slice(calibration.counted_from, None)
    window = calibration.currents.shape[0] - calibration.counted_from
    mean_inputs = inputs[counted].mean(0)
    start = membrane_at(calibration.neuron, calibration.currents, calibration.counted_from)
    with torch.no_grad():
        others = calibration.currents[counted].mean(0) - layer(mean_inputs)
    if layer.bias is None:
        layer.bias = nn.Parameter(layer.weight.new_zeros(layer.weight.shape[0]), requires_grad=False)
    parameters = [layer.weight, layer.bias]
    initial = {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}
    scale = float(layer.weight.detach().abs().mean())
    try:  # the simulation runs without gradients
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=WEIGHT_LEARNING_RATE * scale)
        with torch.enable_grad():
            for _ in range(WEIGHT_ITERATIONS):
                optimizer.zero_grad()
                rates = window_rates(calibration.neuron, start, layer(mean_inputs) + others, window)
                F.mse_loss(rates, calibration.reference).backward()
                optimizer.step()
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
    with torch.no_grad():  # the layer is linear: what it sends more is what the change of its parameters sends
        change = functional_call(layer, {name: getattr(layer, name) - value for name, value in initial.items()},
                                 (inputs.flatten(0, 1),))
    calibration.currents = calibration.currents + change.reshape(calibration.currents.shape)


def advanced(calibration: LayerUnderCalibration) -> torch.Tensor:
    fit_weights(calibration)
    return light(calibration, BIAS_ITERATIONS_AFTER_WEIGHTS)


# method -> correction(layer under calibration) -> constant current per channel [C] that moves the layer's mean
# rate onto its reference (a method may refit the feeding layer first and update the currents); adding a method
# is one entry
SPIKING_CALIBRATIONS: dict[str, Callable[[LayerUnderCalibration], torch.Tensor] | None] = {
    NO_CALIBRATION: None,
    "bias": light,
    "weights": advanced,
}


def _feeding_layer(gm: fx.GraphModule, node: fx.Node, sites: dict[str, list[fx.Node]],
                   channels: int) -> nn.Module | None:
    """The convolution or linear layer whose bias is a current into the neuron fed by `node` alone: `node`
    itself, or an operand of the residual add `node` is; None where there is none."""
    candidates = [node]
    if role_of(gm, node) is Role.ADD and len(node.users) == 1:
        candidates = [arg for arg in node.args if isinstance(arg, fx.Node)]
    for candidate in candidates:
        if candidate.op != "call_module" or len(candidate.users) != 1 or len(sites[candidate.target]) != 1:
            continue
        layer = gm.get_submodule(candidate.target)
        if isinstance(layer, WEIGHTED) and layer.weight.shape[0] == channels:
            return layer
    return None


def _add_current(gm: fx.GraphModule, neuron_node: fx.Node, current: torch.Tensor, layer: nn.Module | None) -> None:
    """Add `current` to the bias of `layer`, the one feeding the neuron alone, or inject it before the neuron."""
    source = neuron_node.args[0]
    if layer is None:
        path = free_name(gm, f"{neuron_node.target}_calibration")
        gm.add_submodule(path, AddBias(current, RATE))
        with gm.graph.inserting_before(neuron_node):
            injection = gm.graph.call_module(path, (source,))
        neuron_node.replace_input_with(source, injection)
    elif layer.bias is None:
        layer.bias = nn.Parameter(current.to(layer.weight.dtype).clone(), requires_grad=False)
    else:
        layer.bias.data.add_(current.to(layer.bias.dtype))


def calibrate_spiking(gm: fx.GraphModule, inputs: torch.Tensor, qann: fx.GraphModule, T: int,
                      method: str = "bias", readout_delay: float = 0.0) -> fx.GraphModule:
    """Correct every neuron layer of the rate-coded spiking graph `gm` (balanced, its neurons named like the
    quantizers of `qann` they stand for) by `method` of SPIKING_CALIBRATIONS, simulating `inputs` for T steps;
    rates are measured over the read-out window that `readout_delay` leaves (see SpikingNetwork.readout_start)."""
    if method not in SPIKING_CALIBRATIONS:
        raise ValueError(f"unknown SNN calibration {method!r}; choose one of {tuple(SPIKING_CALIBRATIONS)}")
    correction = SPIKING_CALIBRATIONS[method]
    if correction is None:
        return gm
    network = SpikingNetwork(gm, T, RATE, readout_delay=readout_delay)
    counted_from = network.readout_start(T)
    # every layer holds all T steps of every image at once: as many images as fit the working set
    images = min(len(inputs), CALIBRATION_WORKING_SET // (T * network.largest_activation(inputs)))
    if images < 1:
        warnings.warn(f"SNN calibration skipped: one image's largest activation over T={T} steps exceeds "
                      f"{CALIBRATION_WORKING_SET >> 20} MiB", ConversionWarning, stacklevel=2)
        return gm
    inputs = inputs[:images]
    references = reference_rates(qann, inputs, per_neuron=True)
    sites = call_sites(gm)
    feeding = {node.target: layer for node in gm.graph.nodes
               if node.op == "call_module" and node.target in references and isinstance(node.args[0], fx.Node)
               and (layer := _feeding_layer(gm, node.args[0], sites, references[node.target].shape[1])) is not None}
    layer_inputs: dict[str, torch.Tensor] = {}
    currents: dict[str, torch.Tensor] = {}

    def by_step(folded: torch.Tensor, batch: int) -> torch.Tensor:
        if folded.shape[0] == batch:  # computed once for every step, before the first neuron
            return folded.unsqueeze(0).expand((T,) + tuple(folded.shape))
        return folded.reshape((T, batch) + tuple(folded.shape[1:]))

    def correct(name: str, neuron: SpikingNeuron, args: tuple) -> tuple:
        folded = args[0]
        reference = references.pop(name)
        layer_input = layer_inputs.pop(name, None)
        calibration = LayerUnderCalibration(
            neuron, by_step(folded, len(inputs)), reference.to(folded.dtype), counted_from, feeding.get(name),
            None if layer_input is None else by_step(layer_input, len(inputs)))
        currents[name] = correction(calibration)
        return (calibration.currents.reshape(folded.shape) + channel_shaped(currents[name], folded.dim()),)

    def keep_input(name: str, args: tuple) -> None:
        layer_inputs[name] = args[0]

    hooks = [neuron.register_forward_pre_hook(lambda module, args, name=name: correct(name, module, args))
             for name, neuron in network.neurons.items() if name in references]
    hooks += [layer.register_forward_pre_hook(lambda module, args, name=name: keep_input(name, args))
              for name, layer in feeding.items()]
    try:
        network.run_all_steps(inputs, T)
    finally:
        for hook in hooks:
            hook.remove()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in currents:
            _add_current(gm, node, currents[node.target], feeding.get(node.target))
    return gm
