"""SpikingJelly interoperability (optional dependency: `pip install ann2snn[spikingjelly]`).

`to_spikingjelly(snn)`: our rate-coded IF network as a module built from SpikingJelly's own neurons, so
that SpikingJelly's tools work on it: `functional.reset_net`, `functional.set_step_mode(net, 's' | 'm')`,
monitors that look for its neuron classes. In step mode 's' a call is one time step on [N, ...]; in 'm'
a call is a sequence [T, N, ...] (outputs [T, N, ...], each step's contribution: the time average of
the outputs of steps floor(readout_delay x T) .. T - 1 is what `snn(x)` returns; the module's
`readout_delay` is the network's, see `SpikingNetwork.readout_start`). The network keeps our graph, so every
op the compiler accepts works (functional pads, slicing shortcuts, ReLU6 bounds): stateless ops run on time
folded into the batch (step mode 'm' unfolds only around the stateful modules), neurons are SpikingJelly's
`HalfThresholdIFNode` (or `IFNode` with soft reset when the membrane starts at 0) behind a scaling by
1 / v_threshold, and our other temporal modules (exact max pooling, bias injection, spike encoders) a
SpikingJelly `MemoryModule` running their declared state and step.

`from_spikingjelly(net, T)`: a network converted by SpikingJelly's `Converter` (rate coding; IF neurons
between voltage scalers, as its `RateCodingRecipe` makes them) as our `SpikingNetwork`, which simulates
it the same way, faster, and gives it our evaluator (accuracy at several T, spikes, synaptic operations,
energy) and ONNX export. SpikingJelly's step-mode layers become the torch layers they extend; its max
pooling after the spikes stays where it is, as it computes in SpikingJelly.

Only what both sides have an equivalent for converts: a neuron without a counterpart raises a
`ConversionError` naming the layer."""
from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ann2snn.compiler.graph_utils import finalize
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import balance_thresholds
from ann2snn.errors import ConversionError, describe_node
from ann2snn.runtime.coding import RATE
from ann2snn.runtime.layers import Scale, TemporalModule, declares_step
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neurons import IFNeuron, SpikingNeuron


def _import(module: str) -> Any:
    try:
        return importlib.import_module(f"spikingjelly.activation_based.{module}")
    except ImportError as error:
        raise ImportError(f"SpikingJelly interoperability needs SpikingJelly ({error}); install it with "
                          f"pip install 'ann2snn[spikingjelly]'") from error


# --- ours -> SpikingJelly ----------------------------------------------------------------------------

def merged_graph(snn: SpikingNetwork) -> fx.GraphModule:
    """The network's static prefix and spiking body as one graph from the input to the output."""
    graph = fx.Graph()
    (prefix_input,) = [n for n in snn.prefix.graph.nodes if n.op == "placeholder"]
    values = {prefix_input: graph.placeholder("x")}
    boundary = graph.graph_copy(snn.prefix.graph, values)
    body_inputs = [n for n in snn.body.graph.nodes if n.op == "placeholder"]
    body_values = dict(zip(body_inputs, boundary if isinstance(boundary, (tuple, list)) else (boundary,)))
    graph.output(graph.graph_copy(snn.body.graph, body_values))
    root = nn.Module()
    for part in (snn.prefix, snn.body):
        _merge_into(root, part)
    return fx.GraphModule(root, graph, "SpikingJellyGraph")


def _merge_into(target: nn.Module, source: nn.Module) -> None:
    """Prefix and body split one module tree: a container both use gets the submodules of each."""
    for name, child in source.named_children():
        if hasattr(target, name):
            _merge_into(getattr(target, name), child)
        else:
            target.add_module(name, copy.deepcopy(child))


class _TimeFolded(nn.Module):
    """Runs a SpikingJelly stateful module inside a graph whose tensors fold time into the batch: in step
    mode 'm' it unfolds [T * N, ...] to the [T, N, ...] the module expects, and folds its output back.
    (The network sets `time_steps` before each multi-step call.)"""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.time_steps = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module.step_mode == "s":
            return self.module(x)
        return self.module(x.unflatten(0, (self.time_steps, -1))).flatten(0, 1)


def _spikingjelly_memory(module: TemporalModule) -> nn.Module:
    base = _import("base")

    class SpikingJellyMemory(base.MemoryModule):
        """One of our temporal modules (see `ann2snn.runtime.layers.TemporalModule`) as a SpikingJelly
        memory module: its declared state as memories, beside the step index `t`, and its declared step as
        `single_step_forward` (step mode 'm' runs the module's multi-step update, held to that step)."""

        def __init__(self, module: TemporalModule):
            super().__init__()
            self.module = module
            self.register_memory("t", 0)
            for name in module.state_names:
                self.register_memory(name, None)
            self.step_mode = "s"

        def _run(self, first_input: torch.Tensor, steps: int, update) -> torch.Tensor:
            names = self.module.state_names
            self.module.load_state(self.module.initial_state(first_input) if self.t == 0
                                   else {name: getattr(self, name) for name in names})
            try:
                out = update()
                for name, value in self.module.state().items():
                    setattr(self, name, value)
            finally:
                self.module.reset()
            self.t += steps
            return out

        def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._run(x, 1, lambda: self.module.single_step_forward(x, self.t))

        def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
            return self._run(x_seq[0], x_seq.shape[0], lambda: self.module.multi_step_forward(x_seq, self.t))

    return SpikingJellyMemory(copy.deepcopy(module))


def _spikingjelly_neuron(gm: fx.GraphModule, node: fx.Node, neuron: SpikingNeuron) -> nn.Module:
    sj_neuron = _import("neuron")
    if type(neuron) is not IFNeuron or neuron.max_spikes_per_step != 1 or neuron.initial_membrane not in (0.0, 0.5):
        raise ConversionError(
            f"{describe_node(gm, node)}: {type(neuron).__name__}({neuron.extra_repr()}, initial_membrane="
            f"{neuron.initial_membrane}) has no SpikingJelly counterpart; to_spikingjelly takes networks of IF "
            f"neurons with one spike per step (convert with neuron='if', max_spikes_per_step=1)")
    if neuron.initial_membrane == 0.5:
        return sj_neuron.HalfThresholdIFNode(v_threshold=1.0)
    return sj_neuron.IFNode(v_threshold=1.0, v_reset=None)


def _replace(gm: fx.GraphModule, node: fx.Node, modules: list[tuple[str, nn.Module]]) -> None:
    """Replace a call_module node by a chain of new modules named `<target>.<suffix>`."""
    value = node.args[0]
    with gm.graph.inserting_before(node):
        for suffix, module in modules:
            gm.add_submodule(f"{node.target}_{suffix}", module)
            value = gm.graph.call_module(f"{node.target}_{suffix}", (value,))
    node.replace_all_uses_with(value)
    gm.graph.erase_node(node)


def _network(graph: fx.GraphModule, T: int, config: dict) -> nn.Module:
    base = _import("base")

    class SpikingJellyNetwork(nn.Module, base.StepModule):
        """A converted network in SpikingJelly's terms (see `to_spikingjelly`); `T` and `config` are the
        settings it was converted with."""

        def __init__(self):
            super().__init__()
            self.graph_module = graph
            self.T = T
            self.config = config
            self.step_mode = "s"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.step_mode == "s":
                return self.graph_module(x)
            for module in self.graph_module.modules():
                if isinstance(module, _TimeFolded):
                    module.time_steps = x.shape[0]
            return self.graph_module(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1))

    return SpikingJellyNetwork()


def to_spikingjelly(snn: SpikingNetwork) -> nn.Module:
    """`snn` (rate-coded IF neurons) built from SpikingJelly modules; see the module docstring."""
    if snn.coding.inject_once:
        raise ConversionError(f"to_spikingjelly takes rate-coded networks; this one uses {snn.coding} coding "
                              f"(neuron={snn.config.get('neuron')!r}), which SpikingJelly's neurons do not implement")
    gm = merged_graph(snn)
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, SpikingNeuron):
            reciprocal = Scale(1.0 / module.v_threshold)
            _replace(gm, node, [("scaler", reciprocal), ("node", _TimeFolded(_spikingjelly_neuron(gm, node, module)))])
        elif isinstance(module, TemporalModule):
            if not declares_step(module):
                raise ConversionError(f"{describe_node(gm, node)}: {type(module).__name__} has no SpikingJelly "
                                      f"counterpart (it declares no single_step_forward)")
            _replace(gm, node, [("memory", _TimeFolded(_spikingjelly_memory(module)))])
    network = _network(finalize(gm), snn.T, dict(snn.config))
    network.readout_delay = snn.readout_delay  # SpikingJelly's modules return every step: the window is the caller's
    return network


# --- SpikingJelly -> ours ----------------------------------------------------------------------------

def _torch_layer(module: nn.Module) -> nn.Module:
    """A SpikingJelly step-mode layer (e.g. `layer.Conv2d`) as the torch layer it extends."""
    torch_class = next(kind for kind in type(module).__mro__ if _is_torch_layer_class(kind))
    plain = copy.deepcopy(module)
    plain.__class__ = torch_class
    plain.__dict__.pop("_step_mode", None)
    return plain


def _is_torch_layer_class(kind: type) -> bool:
    return kind is not nn.Module and kind.__module__.startswith("torch.nn")


def _scale_of(scaler: nn.Module, gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """A voltage scaler's factor shaped to broadcast along the channels of [N, C, ...]."""
    scale = scaler.scale.detach().clone().float() if isinstance(scaler.scale, torch.Tensor) \
        else torch.tensor(float(scaler.scale))
    if scale.dim() == 0:
        return scale
    if getattr(scaler, "channel_dim", 1) != 1:
        raise ConversionError(f"{describe_node(gm, node)}: a voltage scaler along dimension {scaler.channel_dim}; "
                              f"only channel dimension 1 is supported")
    # (the tensor's rank is not known here: the value broadcasts from [C] like the QCFS thresholds)
    return scale.reshape(1, -1, 1, 1) if _rank(node) == 4 else scale.reshape(1, -1)


def _rank(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None else 4


# Tensor ops SpikingJelly wraps into step-mode modules, called again as the methods they stand for.
_TENSOR_METHODS = {"flatten", "mean", "transpose", "unsqueeze", "permute", "size", "reshape", "expand", "dim"}


def _restore_tensor_op(gm: fx.GraphModule, node: fx.Node, op: nn.Module) -> None:
    """SpikingJelly's step-mode wrapper of a tensor op (flatten, size, reshape, ...) as that op again: our
    simulator folds time into the batch, as SpikingJelly's single-step mode sees it."""
    x, *rest = node.args
    with gm.graph.inserting_before(node):
        if op.op_name in _TENSOR_METHODS:
            restored = gm.graph.call_method(op.op_name, tuple(node.args), dict(op.op_kwargs))
        elif op.op_name == "unflatten":
            restored = gm.graph.call_method("unflatten", (x, op.op_kwargs["dim"], op.op_kwargs["unflattened_size"]))
        elif op.op_name == "cat":
            restored = gm.graph.call_function(torch.cat, (list(node.args),), {"dim": op.op_kwargs["dim"]})
        elif op.op_name == "shape":
            restored = gm.graph.call_function(getattr, (x, "shape"))
        else:
            raise ConversionError(f"{describe_node(gm, node)}: SpikingJelly's step-mode op {op.op_name!r} has no "
                                  f"counterpart here")
    node.replace_all_uses_with(restored)
    gm.graph.erase_node(node)


def from_spikingjelly(net: nn.Module, T: int, example: torch.Tensor | None = None) -> SpikingNetwork:
    """A SpikingJelly-converted network (`spikingjelly.activation_based.ann2snn.Converter` output, rate
    coding) as our `SpikingNetwork` simulating `T` steps. `example` (one input batch) lets per-channel
    scalers be shaped for 2-d activations (linear layers); without it they are taken as convolutional."""
    base, sj_neuron, sj_modules = _import("base"), _import("neuron"), _import("ann2snn.modules")
    if not isinstance(net, fx.GraphModule):
        raise ConversionError(f"expected the GraphModule SpikingJelly's Converter returns, got {type(net).__name__}")
    gm = copy.deepcopy(net)
    if example is not None:
        fx.passes.shape_prop.ShapeProp(gm).propagate(example)
    scalers = (sj_modules.VoltageScaler, sj_modules.ChannelVoltageScaler)
    # neurons first: a scaler right before a neuron becomes part of its threshold
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        module = gm.get_submodule(node.target)
        if not isinstance(module, (sj_neuron.HalfThresholdIFNode, sj_neuron.IFNode)):
            continue
        if module.v_reset is not None and not isinstance(module, sj_neuron.HalfThresholdIFNode):
            raise ConversionError(f"{describe_node(gm, node)}: IFNode with hard reset (v_reset={module.v_reset}); "
                                  f"rate-coded conversion uses soft reset (v_reset=None)")
        source = node.args[0]
        scale = torch.tensor(1.0)
        if source.op == "call_module" and isinstance(gm.get_submodule(source.target), scalers) \
                and len(source.users) == 1:
            scale = _scale_of(gm.get_submodule(source.target), gm, source)
            node.replace_input_with(source, source.args[0])
        initial = 0.5 if isinstance(module, sj_neuron.HalfThresholdIFNode) else 0.0
        gm.add_submodule(node.target, IFNeuron(float(module.v_threshold) / scale, initial_membrane=initial))
    gm.graph.eliminate_dead_code()
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        module = gm.get_submodule(node.target)
        if type(module).__name__ == "_StepModeTensorOp":
            _restore_tensor_op(gm, node, module)
        elif isinstance(module, scalers):
            gm.add_submodule(node.target, Scale(_scale_of(module, gm, node)))
        elif isinstance(module, (base.MemoryModule, base.StepModule)) and not isinstance(module, IFNeuron):
            if not any(_is_torch_layer_class(kind) for kind in type(module).__mro__):
                raise ConversionError(f"{describe_node(gm, node)}: SpikingJelly's {type(module).__name__} has no "
                                      f"counterpart here; from_spikingjelly takes rate-coded IF networks")
            gm.add_submodule(node.target, _torch_layer(module))
    # SpikingJelly scales every spike train back by its threshold: folded into the next weights, the layers
    # receive plain spikes, as in our conversions (the counts of synaptic operations then see events)
    balanced = run_passes(finalize(gm), balance_thresholds)
    return SpikingNetwork(balanced, T, RATE, config={"T": T, "neuron": "if", "source": "spikingjelly"})
