"""NIR interoperability (the Neuromorphic Intermediate Representation, optional dependency: `pip install nir`).

`export_nir(snn, path, input_shape)` writes a rate-coded network of IF (or LIF) neurons as a NIR graph;
`import_nir(path)` reads a NIR graph, ours or one written elsewhere (snnTorch, SpikingJelly, ...), as our
`SpikingNetwork`, so that our evaluator, ONNX export and reports work on it.

What a file of ours means in discrete time (also written into its metadata, `SEMANTICS`):
- one time step is one unit of NIR time (dt = 1): an IF node's `r` is 1 (v += r * dt * I), an LIF node has
  tau = 1 / (1 - decay) and r = tau, so that v <- decay * v + I (forward Euler, as snnTorch and SpikingJelly
  discretise);
- the Input node receives the analog image at every step (direct encoding: the first layer's current is the
  same at every step, which is how our simulator computes it once);
- every threshold is 1: the thresholds (per channel or not) are folded into the weights and biases before the
  neurons, the value of a spike into the weights after them; a scaling that cannot be folded is written as a
  1x1 convolution (or an Affine) with diagonal weights, so that no node other than Conv2d, Affine, AvgPool2d,
  Flatten, IF and LIF is needed (the importers of snnTorch and SpikingJelly read no Scale node);
- a grouped or depthwise convolution is written as the dense Conv2d it equals (zero weights between groups), which
  every reader accepts (see `_ungrouped`);
- reset by subtraction (v <- v - v_threshold at a spike, so that an LIF node's next step decays what is left),
  which NIR's IF and LIF, resetting to v_reset, do not express: the importer must subtract (snnTorch:
  reset_mechanism "subtract", which for LIF subtracts after the next decay instead; SpikingJelly: v_reset=None);
- a neuron fires when v >= v_threshold (NIR writes v > v_threshold: they differ only where the membrane lands
  exactly on the threshold);
- every membrane starts at half the threshold (`initial_membrane` x v_threshold, 0.5): NIR has no initial
  state, so the importer must set it;
- the output is the Output node's value averaged over steps `readout_start` .. T - 1 (floor(readout_delay x T)).

What NIR cannot express is refused before anything is written, naming the layer and the nearest exportable
option: signed neurons (ternary spikes, accumulate coding), adaptive thresholds, bursts (several spikes per step),
exact max pooling of spikes, and spike encoders.

A graph written elsewhere is read as NIR defines it: a neuron resets to v_reset and fires when v > v_threshold,
its membrane starting at 0 (`NIRNeuron`), with the time step `dt` given to `import_nir` (1e-4 s by default, as
snnTorch and SpikingJelly write)."""
from __future__ import annotations

import importlib
import io
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ann2snn.compiler.graph_utils import finalize
from ann2snn.errors import ConversionError, describe_node
from ann2snn.interop.spikingjelly import merged_graph
from ann2snn.io.atomic import atomic_write
from ann2snn.runtime.coding import RATE
from ann2snn.runtime.encoding import InputEncoder
from ann2snn.runtime.layers import AddBias, ChannelAffine, Scale, SpikingMaxPool
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neurons import AdaptiveNeuron, IFNeuron, LIFNeuron, SignedNeuron, SpikingNeuron

FILE_NAME = "snn.nir"
# The discrete-time semantics of a file written by `export_nir`, stored in its metadata (NIR keeps a flat dict of
# strings and numbers); `import_nir` recognises its files by the first key.
SEMANTICS = {
    "ann2snn_semantics": "discrete time, dt = 1 time step; Input receives the analog image at every step; "
                         "reset by subtraction (v -= v_threshold at a spike); spike when v >= v_threshold; "
                         "membranes start at initial_membrane x v_threshold; output = mean of the Output node "
                         "over steps readout_start .. T - 1",
    "dt": 1.0,
    "reset": "subtract",
    "spike_condition": "v >= v_threshold",
    "input": "analog image at every step",
}
# NIR time of one step in graphs written by others: snnTorch and SpikingJelly both default to 0.1 ms.
FOREIGN_DT = 1e-4

_REFUSED = {
    SignedNeuron: "signed neurons send ternary spikes and count them, which NIR's IF and LIF cannot; convert with "
                  "neuron='if' (or 'lif')",
    AdaptiveNeuron: "an adaptive threshold has no NIR node; convert with neuron='if'",
    SpikingMaxPool: "exact max pooling of spike trains has no NIR node (NIR pools by sum or average); use average "
                    "pooling (nn.AvgPool2d) in the model",
    InputEncoder: "spike encoders have no NIR node (NIR graphs start at their input); convert with encoding='direct' "
                  "and give the simulator the analog image, or encode spikes before the graph",
}


def _nir() -> Any:
    try:
        return importlib.import_module("nir")
    except ImportError as error:
        raise ImportError(f"NIR interoperability needs the nir package ({error}); install it with pip install nir") \
            from error


# --- export: checks ----------------------------------------------------------------------------------

def check_exportable(snn: SpikingNetwork) -> None:
    """Raise a ConversionError naming the first layer NIR cannot express, and the nearest option that it can."""
    gm = merged_graph(snn)
    if snn.coding != RATE:
        raise ConversionError(f"NIR export takes rate-coded networks; this one uses {snn.coding} coding "
                              f"(neuron={snn.config.get('neuron')!r}): convert with neuron='if'")
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        reason = next((why for kind, why in _REFUSED.items() if type(module) is kind), None)
        if reason is None and isinstance(module, SpikingNeuron):
            if type(module) not in _NEURON_EXPORTERS:
                reason = f"{type(module).__name__} has no NIR node; convert with neuron='if'"
            elif module.max_spikes_per_step != 1:
                reason = (f"bursts (max_spikes_per_step={module.max_spikes_per_step}) have no NIR form: NIR neurons "
                          f"send one spike per step; convert with max_spikes_per_step=1")
        if reason is not None:
            raise ConversionError(f"{describe_node(gm, node)}: cannot be written to NIR: {reason}")


# --- export: the graph -------------------------------------------------------------------------------

@dataclass
class _Pointwise:
    """A map applied at every position: out[o] = sum_i weight[o, i] x[i] + bias[o], on [C, H, W] with a spatial
    `stride` (written as a 1x1 Conv2d) or on [C] features (written as an Affine). Scales, channel affine
    maps, biases, strided slices and channel padding become these, to be folded into their neighbours."""

    weight: np.ndarray
    bias: np.ndarray
    spatial: tuple[int, ...]  # the input's (H, W) for rank 4, () for rank 2
    stride: int = 1

    @classmethod
    def diagonal(cls, factor: np.ndarray, spatial: tuple[int, ...], bias: np.ndarray | None = None) -> _Pointwise:
        return cls(np.diag(factor).astype(np.float32), np.zeros_like(factor) if bias is None else bias, spatial)

    def is_diagonal(self) -> bool:
        return self.stride == 1 and not self.bias.any() and self.weight.shape[0] == self.weight.shape[1] \
            and not (self.weight - np.diag(np.diag(self.weight))).any()


class _Graph:
    """NIR nodes (or `_Pointwise` maps still to be folded) and the edges between them; a node's input is the sum
    of what its edges bring, as in NIR."""

    def __init__(self):
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []

    def add(self, name: str, node: Any, sources: tuple[str, ...]) -> tuple[str, ...]:
        name = self._fresh(name)
        self.nodes[name] = node
        self.edges += [(source, name) for source in sources]
        return (name,)

    def _fresh(self, name: str) -> str:
        candidate, count = name, 0
        while candidate in self.nodes:
            count += 1
            candidate = f"{name}_{count}"
        return candidate

    def sources(self, name: str) -> list[str]:
        return [a for a, b in self.edges if b == name]

    def targets(self, name: str) -> list[str]:
        return [b for a, b in self.edges if a == name]

    def prune(self, output: str) -> None:
        """Drop the nodes whose values do not reach `output` (e.g. those only shape queries read)."""
        needed, frontier = {output}, [output]
        while frontier:
            for source in self.sources(frontier.pop()):
                if source not in needed:
                    needed.add(source)
                    frontier.append(source)
        self.nodes = {name: node for name, node in self.nodes.items() if name in needed}
        self.edges = [(a, b) for a, b in self.edges if a in needed and b in needed]

    def bypass(self, name: str) -> None:
        """Drop a node folded into its neighbours: each of its sources now feeds each of its targets."""
        sources, targets = self.sources(name), self.targets(name)
        del self.nodes[name]
        self.edges = [(a, b) for a, b in self.edges if name not in (a, b)] + \
            [(source, target) for source in sources for target in targets]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


def _per_channel(values: torch.Tensor, channels: int) -> np.ndarray:
    """A scalar or per-channel tensor ([C], [1, C], [1, C, 1, 1]) as [C] values."""
    flat = _numpy(values).reshape(-1)
    if flat.size not in (1, channels):
        raise ValueError(f"expected a scalar or {channels} per-channel values, got shape {tuple(values.shape)}")
    return np.broadcast_to(flat, (channels,)).copy()


class _Exporter(fx.Interpreter):
    """Runs the merged graph on an example sample (neurons pass their input on, for the shapes) and builds
    the NIR graph beside it: `wires[node]` names the NIR nodes whose outputs sum to the node's value."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.built = _Graph()
        self.wires: dict[fx.Node, tuple[str, ...]] = {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.op == "placeholder":
            self.wires[node] = self.built.add("input", _nir().Input(input_type={"input": np.array(value.shape[1:])}),
                                              ())
        elif node.op == "output":
            (result,) = node.args
            result = result[0] if isinstance(result, (tuple, list)) else result
            self.output = self.built.add("output", _nir().Output(
                output_type={"output": np.array(self.env[result].shape[1:])}), self.wires[result])
        elif node.op != "get_attr" and any(arg in self.wires for arg in node.all_input_nodes):
            wire = self._export(node, value)
            if wire is not None:
                self.wires[node] = wire
        return value

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, SpikingNeuron):
            return args[0]
        if isinstance(module, AddBias):
            return args[0] + module.shaped_bias(args[0].ndim)
        return super().call_module(target, args, kwargs)

    def _export(self, node: fx.Node, value: Any) -> tuple[str, ...] | None:
        if node.op == "call_module":
            module = self.module.get_submodule(node.target)
            exporter = next((f for kind, f in _MODULE_EXPORTERS.items() if isinstance(module, kind)), None)
        else:
            module = node.target
            exporter = (_FUNCTION_EXPORTERS if node.op == "call_function" else _METHOD_EXPORTERS).get(node.target)
        if exporter is None:
            raise ConversionError(f"{describe_node(self.module, node)}: has no NIR mapping (NIR has Conv2d, Affine, "
                                  f"AvgPool2d, SumPool2d, Flatten, IF and LIF, and sums a node's inputs)")
        try:
            return exporter(self, node, module, value)
        except ValueError as error:
            raise ConversionError(f"{describe_node(self.module, node)}: cannot be written to NIR: {error}") from None

    def wire(self, arg: fx.Node) -> tuple[str, ...]:
        return self.wires[arg]

    def shape(self, arg: fx.Node) -> tuple[int, ...]:
        return tuple(self.env[arg].shape[1:])

    def spatial(self, arg: fx.Node) -> tuple[int, ...]:
        return self.shape(arg)[1:]

    def values(self, args: tuple) -> tuple:
        """Arguments as the example run computed them (sizes, kernel sizes)."""
        return fx.node.map_arg(args, lambda arg: self.env[arg])

    def pointwise(self, node: fx.Node, source: fx.Node, map_: _Pointwise) -> tuple[str, ...]:
        return self.built.add(node.name, map_, self.wire(source))


def _export_conv(exporter: _Exporter, node: fx.Node, conv: nn.Conv2d, value) -> tuple[str, ...]:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"padding {conv.padding!r} ({conv.padding_mode}): NIR convolutions pad with zeros by "
                         f"a number of pixels")
    bias = _numpy(conv.bias) if conv.bias is not None else np.zeros(conv.out_channels, np.float32)
    (x,) = node.args
    nir_conv = _nir().Conv2d(input_shape=np.array(exporter.shape(x)[1:]), weight=_numpy(conv.weight),
                             stride=np.array(conv.stride), padding=np.array(conv.padding),
                             dilation=np.array(conv.dilation), groups=conv.groups, bias=bias)
    return exporter.built.add(node.name, nir_conv, exporter.wire(x))


def _export_linear(exporter: _Exporter, node: fx.Node, linear: nn.Linear, value) -> tuple[str, ...]:
    if exporter.env[node.args[0]].dim() != 2:
        raise ValueError("a linear layer on a tensor of rank other than 2 ([batch, features])")
    nir = _nir()
    weight = _numpy(linear.weight)
    layer = nir.Affine(weight=weight, bias=_numpy(linear.bias)) if linear.bias is not None else nir.Linear(weight)
    return exporter.built.add(node.name, layer, exporter.wire(node.args[0]))


def _pool_pair(value) -> np.ndarray:
    return np.array(value if isinstance(value, (tuple, list)) else (value, value))


def _export_avg_pool(exporter: _Exporter, node: fx.Node, source: fx.Node, kernel, stride=None, padding=0,
                     ceil_mode: bool = False, count_include_pad: bool = True, divisor_override=None):
    if ceil_mode or divisor_override is not None or (not count_include_pad and np.any(_pool_pair(padding))):
        raise ValueError("average pooling with ceil_mode, divisor_override or padding left out of the count: NIR's "
                         "AvgPool2d divides by the kernel's size")
    stride = kernel if stride in (None, []) else stride
    pool = _nir().AvgPool2d(kernel_size=_pool_pair(kernel), stride=_pool_pair(stride), padding=_pool_pair(padding))
    return exporter.built.add(node.name, pool, exporter.wire(source))


def _export_avg_pool_module(exporter: _Exporter, node: fx.Node, pool: nn.AvgPool2d, value):
    return _export_avg_pool(exporter, node, node.args[0], pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                            pool.count_include_pad, pool.divisor_override)


def _export_avg_pool_function(exporter: _Exporter, node: fx.Node, function, value):
    return _export_avg_pool(exporter, node, node.args[0], *exporter.values(node.args[1:]),
                            **exporter.values(node.kwargs))


def _export_adaptive_avg_pool(exporter: _Exporter, node: fx.Node, pool, value):
    (height, width) = exporter.spatial(node.args[0])
    (out_height, out_width) = value.shape[2:]
    if height % out_height or width % out_width:
        raise ValueError(f"adaptive average pooling of {height}x{width} to {out_height}x{out_width}: only sizes that "
                         f"divide evenly are one AvgPool2d")
    kernel = (height // out_height, width // out_width)
    return _export_avg_pool(exporter, node, node.args[0], kernel, kernel, 0)


def _export_flatten(exporter: _Exporter, node: fx.Node, target, value) -> tuple[str, ...]:
    source = node.args[0]
    if not (value.dim() == 2 and value.shape[0] == exporter.env[source].shape[0]):
        raise ValueError(f"a reshape to {tuple(value.shape)}: NIR's Flatten keeps the batch and flattens the rest")
    if exporter.env[source].dim() == 2:
        return exporter.wire(source)
    flatten = _nir().Flatten(input_type={"input": np.array(exporter.shape(source))}, start_dim=0, end_dim=-1)
    return exporter.built.add(node.name, flatten, exporter.wire(source))


def _export_scale(exporter: _Exporter, node: fx.Node, scale: Scale, value) -> tuple[str, ...]:
    (x,) = node.args
    channels = exporter.shape(x)[0]
    return exporter.pointwise(node, x, _Pointwise.diagonal(_per_channel(scale.factor, channels), exporter.spatial(x)))


def _export_channel_affine(exporter: _Exporter, node: fx.Node, affine: ChannelAffine, value) -> tuple[str, ...]:
    (x,) = node.args
    channels = exporter.shape(x)[0]
    return exporter.pointwise(node, x, _Pointwise.diagonal(_per_channel(affine.weight, channels),
                                                           exporter.spatial(x), _per_channel(affine.bias, channels)))


def _export_add_bias(exporter: _Exporter, node: fx.Node, add_bias: AddBias, value) -> tuple[str, ...]:
    (x,) = node.args
    channels = exporter.shape(x)[0]
    if add_bias.channel_dim != 1:
        raise ValueError(f"a bias along dimension {add_bias.channel_dim}; NIR's nodes add biases along channels")
    return exporter.pointwise(node, x, _Pointwise.diagonal(np.ones(channels, np.float32), exporter.spatial(x),
                                                           _per_channel(add_bias.bias, channels)))


def _export_add(exporter: _Exporter, node: fx.Node, function, value) -> tuple[str, ...]:
    if node.kwargs or not all(isinstance(arg, fx.Node) and arg in exporter.wires for arg in node.args):
        raise ValueError("only the sum of two spiking-network tensors is a NIR edge pair")
    return tuple(name for arg in node.args for name in exporter.wire(arg))


def _export_getitem(exporter: _Exporter, node: fx.Node, function, value) -> tuple[str, ...]:
    """x[:, :, ::s, ::s] on [N, C, H, W]: a 1x1 convolution with identity weights and stride s."""
    source, index = node.args
    full = slice(None)
    if not (isinstance(index, tuple) and len(index) == 4 and index[:2] == (full, full)
            and index[2] == index[3] and isinstance(index[2], slice) and index[2].start in (None, 0)
            and index[2].stop is None):
        raise ValueError(f"indexing {index!r}: NIR expresses only the strided subsampling x[:, :, ::s, ::s]")
    channels = exporter.shape(source)[0]
    identity = _Pointwise.diagonal(np.ones(channels, np.float32), exporter.spatial(source))
    identity.stride = index[2].step or 1
    return exporter.pointwise(node, source, identity)


def _export_pad(exporter: _Exporter, node: fx.Node, function, value) -> tuple[str, ...]:
    """Zero-padding of the channels of [N, C, H, W] (option-A shortcuts): a 1x1 convolution placing the channels."""
    source, pad = node.args[:2]
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    fill = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
    if len(pad) != 6 or any(pad[:4]) or mode != "constant" or fill not in (0, None):
        raise ValueError(f"padding {tuple(pad)} ({mode}, value {fill}): NIR expresses only zero channels added to "
                         f"[N, C, H, W]")
    channels = exporter.shape(source)[0]
    placing = np.zeros((pad[4] + channels + pad[5], channels), np.float32)
    placing[pad[4]:pad[4] + channels] = np.eye(channels, dtype=np.float32)
    return exporter.pointwise(node, source, _Pointwise(placing, np.zeros(len(placing), np.float32),
                                                       exporter.spatial(source)))


def _export_shape_query(exporter: _Exporter, node: fx.Node, method, value) -> None:
    """x.size(), x.dim(): their values were computed on the example and are constants of the graph."""
    return None


def _export_passthrough(exporter: _Exporter, node: fx.Node, target, value) -> tuple[str, ...]:
    return exporter.wire(node.args[0])


def _neuron_inputs(exporter: _Exporter, node: fx.Node, threshold: np.ndarray,
                   leak: np.ndarray | None) -> tuple[str, ...]:
    """The neuron's input wires, each divided by its threshold (a diagonal map, folded later), so that the neuron
    fires at 1; a constant leak current, divided too, joins the first of them as a bias."""
    wires = []
    for index, source in enumerate(exporter.wire(node.args[0])):
        bias = leak / threshold if leak is not None and index == 0 else None
        scaling = _Pointwise.diagonal(1 / threshold, exporter.spatial(node.args[0]), bias)
        wires += exporter.built.add(f"{node.name}_input", scaling, (source,))
    return tuple(wires)


def _export_if(exporter: _Exporter, node: fx.Node, neuron: IFNeuron, value) -> tuple[str, ...]:
    shape = exporter.shape(node.args[0])
    threshold = _per_channel(neuron.v_threshold, shape[0])
    inputs = _neuron_inputs(exporter, node, threshold, None)
    ones = np.ones(shape, np.float32)
    return exporter.built.add(node.name, _nir().IF(r=ones, v_threshold=ones.copy(), v_reset=np.zeros_like(ones),
                                                   metadata=_neuron_metadata(node, neuron)), inputs)


def _export_lif(exporter: _Exporter, node: fx.Node, neuron: LIFNeuron, value) -> tuple[str, ...]:
    if neuron.decay == 1:  # (and no leak current: it is (1 - decay) x v_threshold / 2)
        return _export_if(exporter, node, neuron, value)
    shape = exporter.shape(node.args[0])
    threshold = _per_channel(neuron.v_threshold, shape[0])
    leak = _per_channel(neuron.leak_current, shape[0])
    inputs = _neuron_inputs(exporter, node, threshold, leak if leak.any() else None)
    ones = np.ones(shape, np.float32)
    tau = np.full(shape, 1 / (1 - neuron.decay))
    return exporter.built.add(node.name, _nir().LIF(tau=tau, r=tau.copy(), v_leak=np.zeros_like(ones),
                                                    v_threshold=ones, v_reset=np.zeros_like(ones),
                                                    metadata={**_neuron_metadata(node, neuron), "decay": neuron.decay}),
                              inputs)


def _neuron_metadata(node: fx.Node, neuron: SpikingNeuron) -> dict[str, Any]:
    """Which of our layers the NIR node is (spike counts are reported by layer), and where its membrane starts."""
    return {"layer": str(node.target), "initial_membrane": float(neuron.initial_membrane)}


# (more specific classes first: LIFNeuron is an IFNeuron)
_NEURON_EXPORTERS: dict[type, Callable] = {LIFNeuron: _export_lif, IFNeuron: _export_if}
_MODULE_EXPORTERS: dict[type, Callable] = {
    **_NEURON_EXPORTERS,
    nn.Conv2d: _export_conv,
    nn.Linear: _export_linear,
    nn.AvgPool2d: _export_avg_pool_module,
    nn.AdaptiveAvgPool2d: _export_adaptive_avg_pool,
    nn.Flatten: _export_flatten,
    Scale: _export_scale,
    ChannelAffine: _export_channel_affine,
    AddBias: _export_add_bias,
    nn.Identity: _export_passthrough,
    nn.Dropout: _export_passthrough,
}
_FUNCTION_EXPORTERS: dict[Callable, Callable] = {
    operator.add: _export_add,
    torch.add: _export_add,
    operator.getitem: _export_getitem,
    F.pad: _export_pad,
    F.avg_pool2d: _export_avg_pool_function,
    torch._C._nn.avg_pool2d: _export_avg_pool_function,
    F.adaptive_avg_pool2d: _export_adaptive_avg_pool,
    torch.flatten: _export_flatten,
}
_METHOD_EXPORTERS: dict[str, Callable] = {
    "view": _export_flatten,
    "reshape": _export_flatten,
    "flatten": _export_flatten,
    "size": _export_shape_query,
    "dim": _export_shape_query,
    "contiguous": _export_passthrough,
}


# --- export: folding the pointwise maps ----------------------------------------------------------------

def _is_affine(node: Any) -> bool:
    nir = _nir()
    return isinstance(node, (nir.Conv2d, nir.Affine, nir.Linear, _Pointwise))


def _weight_and_bias(node: Any) -> tuple[np.ndarray, np.ndarray]:
    bias = getattr(node, "bias", None)
    return node.weight, np.zeros(node.weight.shape[0], np.float32) if bias is None else bias


def _fold_after(producer: Any, map_: _Pointwise) -> Any | None:
    """`map_` applied after `producer` as one node, or None where that is not one node."""
    nir = _nir()
    weight, bias = _weight_and_bias(producer)
    new_bias = (map_.weight @ bias + map_.bias).astype(np.float32)
    if isinstance(producer, _Pointwise):
        return _Pointwise((map_.weight @ weight).astype(np.float32), new_bias, producer.spatial,
                          producer.stride * map_.stride)
    if map_.stride != 1:
        return None
    if isinstance(producer, nir.Conv2d):
        if producer.groups != 1 and not map_.is_diagonal():
            return None
        new_weight = np.einsum("om,mikl->oikl", map_.weight, weight).astype(np.float32)
        return nir.Conv2d(input_shape=producer.input_shape, weight=new_weight, stride=producer.stride,
                          padding=producer.padding, dilation=producer.dilation, groups=producer.groups, bias=new_bias)
    return nir.Affine(weight=(map_.weight @ weight).astype(np.float32), bias=new_bias)


def _input_channels(conv: Any) -> np.ndarray:
    """For each output channel of a NIR Conv2d (a row), the input channels its filter reads: those of its group."""
    groups, (out_channels, per_group) = int(conv.groups), conv.weight.shape[:2]
    group_of_output = np.arange(out_channels) // (out_channels // groups)
    return group_of_output[:, None] * per_group + np.arange(per_group)[None, :]


def _fold_before(consumer: Any, factor: np.ndarray) -> Any:
    """`consumer` applied to its input scaled by `factor` (one value per input channel or feature)."""
    nir = _nir()
    if isinstance(consumer, _Pointwise):
        return _Pointwise((consumer.weight * factor).astype(np.float32), consumer.bias, consumer.spatial,
                          consumer.stride)
    if isinstance(consumer, nir.Conv2d):
        columns = factor[_input_channels(consumer)]
        return nir.Conv2d(input_shape=consumer.input_shape, weight=(consumer.weight * columns[..., None, None])
                          .astype(np.float32), stride=consumer.stride, padding=consumer.padding,
                          dilation=consumer.dilation, groups=consumer.groups, bias=consumer.bias)
    weight, bias = _weight_and_bias(consumer)
    return nir.Affine(weight=(weight * factor).astype(np.float32), bias=bias)


def _through(node: Any, factor: np.ndarray) -> np.ndarray | None:
    """A per-channel factor moved from before `node` to after it (average pooling keeps channels, flattening
    spells them out per position), or None where it does not commute."""
    nir = _nir()
    if isinstance(node, nir.AvgPool2d):
        return factor
    if isinstance(node, nir.Flatten):
        return np.repeat(factor, int(np.prod(node.input_type["input"][1:])))
    return None


def _fold_once(graph: _Graph) -> bool:
    for name, node in list(graph.nodes.items()):
        if not isinstance(node, _Pointwise):
            continue
        sources, targets = graph.sources(name), graph.targets(name)
        # after a single-use linear layer: one layer
        if len(sources) == 1 and graph.targets(sources[0]) == [name] and _is_affine(graph.nodes[sources[0]]):
            folded = _fold_after(graph.nodes[sources[0]], node)
            if folded is not None:
                graph.nodes[sources[0]] = folded
                graph.bypass(name)
                return True
        # a pure scaling before a linear layer (through pooling and flattening) that only it feeds
        if node.is_diagonal() and len(targets) == 1:
            factor, path = np.diag(node.weight), [targets[0]]
            while factor is not None and not _is_affine(graph.nodes[path[-1]]) and \
                    len(graph.sources(path[-1])) == 1 and len(graph.targets(path[-1])) == 1:
                factor = _through(graph.nodes[path[-1]], factor)
                path.append(graph.targets(path[-1])[0])
            consumer = path[-1]
            if factor is not None and _is_affine(graph.nodes[consumer]) and len(graph.sources(consumer)) == 1:
                graph.nodes[consumer] = _fold_before(graph.nodes[consumer], factor)
                graph.bypass(name)
                return True
        if node.is_diagonal() and not (np.diag(node.weight) - 1).any():
            graph.bypass(name)
            return True
    return False


def _ungrouped(conv: Any) -> Any:
    """A grouped convolution as the dense one it equals: each filter has zero weights on the other groups' input
    channels, terms that add exact zeros. nir 1.0.8 types a Conv2d's input as weight.shape[1] channels (one
    group's), so `nir.read` refuses a file with a grouped one; snnTorch 1.0.0's importer cannot build a depthwise
    one (it builds in_channels = weight.shape[1]) and SpikingJelly 2.0.0's refuses groups. All of them read the
    dense form, which holds `groups` times the weights."""
    out_channels = conv.weight.shape[0]
    dense = np.zeros((out_channels, int(conv.groups) * conv.weight.shape[1], *conv.weight.shape[2:]), np.float32)
    dense[np.arange(out_channels)[:, None], _input_channels(conv)] = conv.weight
    return replace(conv, weight=dense, groups=1)


def _written(node: Any, nir) -> Any:
    """A node left after folding as it is written: a pointwise map as a 1x1 Conv2d or an Affine, a grouped
    convolution as a dense one (`_ungrouped`)."""
    if isinstance(node, nir.Conv2d) and int(node.groups) != 1:
        return _ungrouped(node)
    if not isinstance(node, _Pointwise):
        return node
    if not node.spatial:
        return nir.Affine(weight=node.weight, bias=node.bias)
    return nir.Conv2d(input_shape=np.array(node.spatial), weight=node.weight[:, :, None, None],
                      stride=np.array([node.stride] * 2),
                      padding=np.array([0, 0]), dilation=np.array([1, 1]), groups=1, bias=node.bias)


def nir_graph(snn: SpikingNetwork, input_shape: tuple[int, ...], T: int | None = None) -> Any:
    """`snn` as a NIRGraph for inputs of shape `input_shape` (C, H, W), after `check_exportable`; its metadata
    states `T` steps (default: the network's T) and their read-out window."""
    nir = _nir()
    check_exportable(snn)
    gm = merged_graph(snn)
    exporter = _Exporter(gm)
    with torch.no_grad():
        exporter.run(torch.zeros((1, *input_shape)))
    graph = exporter.built
    graph.prune(*exporter.output)
    while _fold_once(graph):
        pass
    nodes = {name: _written(node, nir) for name, node in graph.nodes.items()}
    T = snn.T if T is None else T
    metadata = {**SEMANTICS, "T": T, "readout_delay": snn.readout_delay, "readout_start": snn.readout_start(T),
                "initial_membrane": _uniform_initial_membrane(snn)}
    return _typed_graph(nir, nodes, graph.edges, metadata)


def _typed_graph(nir, nodes: dict[str, Any], edges: list[tuple[str, str]], metadata: dict) -> Any:
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata, type_check=False)
    graph.infer_types()
    return graph


def _uniform_initial_membrane(snn: SpikingNetwork) -> float:
    initial = {float(neuron.initial_membrane) for neuron in snn.neurons.values()}
    if len(initial) != 1:
        raise ConversionError(f"NIR export needs one initial membrane for every neuron; this network has "
                              f"{sorted(initial)}")
    return initial.pop()


def export_nir(snn: SpikingNetwork, path: str | Path, input_shape: tuple[int, ...], T: int | None = None) -> Path:
    """Write `snn` to the NIR file `path` (atomically: readers never see a partial file), stating `T` steps
    (default: the network's T); see the module docstring for what the file means. Raises ConversionError, before
    writing anything, for what NIR cannot express."""
    graph = nir_graph(snn, tuple(input_shape), T)
    buffer = io.BytesIO()
    _nir().write(buffer, graph)
    path = Path(path)
    atomic_write(path, buffer.getvalue())
    return path


# --- import ------------------------------------------------------------------------------------------

def nir_step(v: torch.Tensor, current: torch.Tensor, v_threshold: torch.Tensor, max_spikes_per_step: int,
             decay: torch.Tensor, leak_current: torch.Tensor, v_reset: torch.Tensor):
    """One step of a NIR IF or LIF neuron as NIR defines it: v <- decay * v + leak + I, a spike where
    v > v_threshold, and v set to v_reset there."""
    v.mul_(decay).add_(leak_current).add_(current)
    spikes = (v > v_threshold).to(v.dtype)
    v.copy_(torch.where(spikes > 0, v_reset, v))
    return spikes, spikes


class NIRNeuron(SpikingNeuron):
    """A neuron of a NIR graph written elsewhere: leaky (decay < 1) or not, reset to `v_reset`, firing when the
    membrane exceeds the threshold, starting at 0 (see `nir_step`)."""

    dynamics = staticmethod(nir_step)
    membrane_unit_buffers = ("v_threshold", "leak_current", "v_reset")

    def __init__(self, v_threshold: torch.Tensor, decay: torch.Tensor, leak_current: torch.Tensor,
                 v_reset: torch.Tensor):
        super().__init__(v_threshold, initial_membrane=0.0)
        self.register_buffer("decay", decay.detach().clone())
        self.register_buffer("leak_current", leak_current.detach().clone())
        self.register_buffer("v_reset", v_reset.detach().clone())

    def constants(self) -> tuple:
        return (*super().constants(), self.decay, self.leak_current, self.v_reset)


def _tensor(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


def _neuron_values(values) -> torch.Tensor:
    """A per-neuron NIR parameter as one value where all are equal, else as the neurons' array."""
    array = np.asarray(values, dtype=np.float32)
    return _tensor(array.reshape(-1)[0]) if array.size and (array == array.reshape(-1)[0]).all() else _tensor(array)


@dataclass(frozen=True)
class _ImportContext:
    ours: bool
    dt: float
    initial_membrane: float


def _pair(value) -> tuple[int, int]:
    """A NIR size, stride or padding (one number, or one per spatial dimension) as two integers."""
    return tuple(int(v) for v in np.broadcast_to(value, 2))


def _import_conv(node, context: _ImportContext) -> list[nn.Module]:
    weight = _tensor(node.weight)
    conv = nn.Conv2d(weight.shape[1] * int(node.groups), weight.shape[0], tuple(weight.shape[2:]),
                     stride=_pair(node.stride), padding=_pair(node.padding), dilation=_pair(node.dilation),
                     groups=int(node.groups))
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(_tensor(node.bias))
    return [conv]


def _import_linear(node, context: _ImportContext) -> list[nn.Module]:
    weight = _tensor(node.weight)
    bias = getattr(node, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(_tensor(bias))
    return [linear]


def _import_avg_pool(node, context: _ImportContext) -> list[nn.Module]:
    return [nn.AvgPool2d(_pair(node.kernel_size), _pair(node.stride), _pair(node.padding))]


def _import_sum_pool(node, context: _ImportContext) -> list[nn.Module]:
    # a sum is an average not divided by the kernel's size
    return [nn.AvgPool2d(_pair(node.kernel_size), _pair(node.stride), _pair(node.padding), divisor_override=1)]


def _import_flatten(node, context: _ImportContext) -> list[nn.Module]:
    return [nn.Flatten(node.start_dim + 1 if node.start_dim >= 0 else node.start_dim,
                       node.end_dim + 1 if node.end_dim >= 0 else node.end_dim)]


def _import_scale(node, context: _ImportContext) -> list[nn.Module]:
    return [Scale(_tensor(node.scale))]


def _with_gain(gain: torch.Tensor, neuron: nn.Module) -> list[nn.Module]:
    """The neuron after a Scale by the input gain NIR's r and time constants give, where that gain is not 1."""
    return [neuron] if bool((gain == 1).all()) else [Scale(gain), neuron]


def _import_if(node, context: _ImportContext) -> list[nn.Module]:
    gain = _neuron_values(np.asarray(node.r, np.float64) * context.dt)
    threshold = _neuron_values(node.v_threshold)
    if context.ours:
        return _with_gain(gain, IFNeuron(threshold, initial_membrane=context.initial_membrane))
    zero = torch.zeros(())
    return _with_gain(gain, NIRNeuron(threshold, torch.ones(()), zero, _neuron_values(node.v_reset)))


def _import_lif(node, context: _ImportContext) -> list[nn.Module]:
    tau, r = np.asarray(node.tau, np.float64), np.asarray(node.r, np.float64)
    rate = context.dt / tau
    gain = _neuron_values(rate * r)
    decay = _neuron_values(1 - rate)
    leak = _neuron_values(rate * np.asarray(node.v_leak, np.float64))
    threshold = _neuron_values(node.v_threshold)
    if context.ours and decay.numel() == 1 and not leak.any():
        neuron = LIFNeuron(threshold, float(decay), compensate_leak=False, initial_membrane=context.initial_membrane)
        return _with_gain(gain, neuron)
    if context.ours:
        raise ConversionError("an ann2snn NIR file whose LIF nodes have several decays or a leak: not written by "
                              "export_nir")
    return _with_gain(gain, NIRNeuron(threshold, decay, leak, _neuron_values(node.v_reset)))


def _importers() -> dict[type, Callable[[Any, _ImportContext], list[nn.Module]]]:
    nir = _nir()
    return {nir.Conv2d: _import_conv, nir.Affine: _import_linear, nir.Linear: _import_linear,
            nir.AvgPool2d: _import_avg_pool, nir.SumPool2d: _import_sum_pool, nir.Flatten: _import_flatten,
            nir.Scale: _import_scale, nir.IF: _import_if, nir.LIF: _import_lif}


def _metadata_value(value) -> Any:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode() if isinstance(value, bytes) else value


def _topological(graph) -> list[str]:
    order, done = [], set()
    pending = list(graph.nodes)
    while pending:
        ready = [name for name in pending if all(a in done for a, b in graph.edges if b == name)]
        if not ready:
            raise ConversionError(f"NIR graph with a cycle among {sorted(pending)}: recurrent graphs are not "
                                  f"imported")
        order += ready
        done.update(ready)
        pending = [name for name in pending if name not in done]
    return order


def import_nir(path: str | Path, T: int | None = None, *, dt: float = FOREIGN_DT,
               readout_delay: float | None = None) -> SpikingNetwork:
    """The NIR graph in `path` (a file, or a NIRGraph) as our `SpikingNetwork` simulating `T` steps (default: the
    file's T where ann2snn wrote it, else 32). A file of ours is read with the semantics its metadata states (and
    its dt, T and read-out delay); a graph written elsewhere as NIR defines it (see `NIRNeuron`), one step
    lasting `dt`, with the read-out over every step unless `readout_delay` says otherwise."""
    nir = _nir()
    graph = path if isinstance(path, nir.NIRGraph) else nir.read(str(path))
    metadata = {key: _metadata_value(value) for key, value in (graph.metadata or {}).items()}
    ours = metadata.get("reset") == SEMANTICS["reset"]
    context = _ImportContext(ours, float(metadata["dt"]) if ours else dt,
                             float(metadata.get("initial_membrane", 0.0)) if ours else 0.0)
    T = T or int(metadata.get("T", 32))
    readout_delay = float(metadata.get("readout_delay", 0.0)) if readout_delay is None else readout_delay
    importers = _importers()
    fx_graph, root, values = fx.Graph(), nn.Module(), {}
    for name in _topological(graph):
        node = graph.nodes[name]
        incoming = [values[a] for a, b in graph.edges if b == name]
        if isinstance(node, nir.Input):
            values[name] = fx_graph.placeholder("x")
            continue
        if not incoming:
            raise ConversionError(f"NIR node {name!r} ({type(node).__name__}) has no inputs")
        value = incoming[0]
        for other in incoming[1:]:
            value = fx_graph.call_function(operator.add, (value, other))
        if isinstance(node, nir.Output):
            fx_graph.output(value)
            continue
        importer = importers.get(type(node))
        if importer is None:
            raise ConversionError(f"NIR node {name!r}: {type(node).__name__} has no counterpart here (imported: "
                                  f"{', '.join(kind.__name__ for kind in importers)})")
        for index, module in enumerate(importer(node, context)):
            target = _module_name(name) + ("_gain" if index == 0 and isinstance(module, Scale)
                                           and not isinstance(node, nir.Scale) else "")
            root.add_module(target, module)
            value = fx_graph.call_module(target, (value,))
        values[name] = value
    config = {"T": T, "neuron": "if" if ours else "nir", "source": "nir", "readout_delay": readout_delay}
    return SpikingNetwork(finalize(fx.GraphModule(root, fx_graph, "NIRGraph")), T, RATE, config=config,
                          readout_delay=readout_delay)


def _module_name(name: str) -> str:
    return "nir_" + "".join(c if c.isalnum() else "_" for c in name)
