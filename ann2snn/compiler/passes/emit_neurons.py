"""Pass 8: the QANN becomes a spiking graph.

Each quantizer becomes a neuron layer followed by a `Scale` holding the value of one spike (the layer's
threshold for rate-coded IF neurons, the quantization step theta/L for signed neurons); with accumulate
coding, biases of conv, linear and affine layers become `AddBias` injections given at the first step
only (with rate coding a bias is a current at every step: it stays in its layer, whose kernel adds it
for free, instead of costing one more pass over the activation); max pooling becomes exact pooling of
accumulated spikes. Everything else stays as synaptic computation."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ann2snn.compiler.graph_utils import free_name, insert_module_after, is_module, is_number, replace_with_module
from ann2snn.compiler.ops import Role, is_shape_value, op_of, role_of
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.errors import ConversionError
from ann2snn.runtime.layers import AddBias, ChannelAffine, Scale, SpikingMaxPool
from ann2snn.runtime.neuron_kinds import neuron_kind, symmetric_neuron_kinds
from ann2snn.runtime.neurons import SpikingNeuron

_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
_OFFSET_SIGNS = {Role.ADD: 1.0, Role.SUB: -1.0}


def make_neuron(quantizer: QCFSQuantizer, kind: str, max_spikes_per_step: int,
                options: dict | None = None) -> tuple[SpikingNeuron, Scale]:
    """The neuron of registry kind `kind` standing for a calibrated quantizer, and the value one of its
    spikes carries. `options` are extra neuron arguments (e.g. decay for 'lif', adapt_increase and
    adapt_decay for 'adaptive')."""
    entry = neuron_kind(kind)
    build = entry.build_symmetric if quantizer.signed else entry.build
    if build is None:
        raise ConversionError(f"neuron {kind!r} fires no negative spikes, and a signed quantizer (a quantized "
                              f"stream) needs them: convert with a neuron of {symmetric_neuron_kinds()}")
    neuron = build(quantizer.theta, quantizer.levels, max_spikes_per_step, options or {})
    return neuron, Scale(entry.spike_value(quantizer.theta, quantizer.levels))


def _functional_max_pool(gm: fx.GraphModule, node: fx.Node) -> nn.Module:
    kind = op_of(gm, node).module
    given = dict(zip(_MAX_POOL_ARGS, node.args[1:]))
    given.update({k: v for k, v in node.kwargs.items() if k in _MAX_POOL_ARGS})
    return kind(**given)


def _constant_offset(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor, c) for `tensor + c`, `c + tensor` or `tensor - c` with a Python number c."""
    sign = _OFFSET_SIGNS.get(role_of(gm, node))
    if node.op not in ("call_function", "call_method") or sign is None or len(node.args) != 2:
        return None
    first, second = node.args
    if isinstance(first, fx.Node) and is_shape_value(first) or isinstance(second, fx.Node) and is_shape_value(second):
        return None
    if isinstance(first, fx.Node) and is_number(second):
        return first, sign * second
    if isinstance(second, fx.Node) and is_number(first) and sign > 0:
        return second, float(first)
    return None


def _strip_bias(layer: nn.Module) -> nn.Module:
    stripped = copy.deepcopy(layer)
    if isinstance(stripped, ChannelAffine):
        stripped.bias.zero_()
    else:
        stripped.bias = None
    return stripped


def emit_neurons(gm: fx.GraphModule, neuron: str = "if", max_spikes_per_step: int = 1,
                 neuron_options: dict | None = None) -> fx.GraphModule:
    coding = neuron_kind(neuron).coding
    stripped_biases: dict[str, tuple[torch.Tensor, int]] = {}
    for node in list(gm.graph.nodes):
        role = role_of(gm, node)
        if is_module(gm, node, QCFSQuantizer):
            quantizer = gm.get_submodule(node.target)
            if not quantizer.calibrated:
                raise ValueError(f"quantizer '{node.target}' has no threshold: calibrate before emitting neurons")
            spiking, amplitude = make_neuron(quantizer, neuron, max_spikes_per_step, neuron_options)
            gm.add_submodule(node.target, spiking)
            insert_module_after(gm, node, f"{node.target}_amplitude", amplitude)
        elif coding.inject_once and role in (Role.WEIGHTED, Role.CHANNELWISE):
            # a layer called at several sites is stripped once; every site gets its own injection
            if node.target not in stripped_biases:
                layer = gm.get_submodule(node.target)
                if layer.bias is None:
                    continue
                stripped_biases[node.target] = (layer.bias.detach().clone(), -1 if isinstance(layer, nn.Linear) else 1)
                gm.add_submodule(node.target, _strip_bias(layer))
            bias, channel_dim = stripped_biases[node.target]
            insert_module_after(gm, node, f"{node.target}_bias", AddBias(bias, coding, channel_dim))
        elif role is Role.MAX_POOLING and node.op == "call_module":
            gm.add_submodule(node.target, SpikingMaxPool(gm.get_submodule(node.target)))
        elif role is Role.MAX_POOLING:
            owner = node.meta.get("module_path")
            path = f"{owner}.{node.name}" if owner else node.name
            replace_with_module(gm, node, free_name(gm, path), SpikingMaxPool(_functional_max_pool(gm, node)),
                                node.args[:1])
        elif (offset := _constant_offset(gm, node)) is not None:
            # a constant current, injected like a bias so that accumulate coding adds it only once
            tensor, constant = offset
            replace_with_module(gm, node, free_name(gm, f"{node.name}_offset"),
                                AddBias(torch.tensor([constant]), coding, 1), (tensor,))
    return gm
