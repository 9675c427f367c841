"""Pass 3b (with `quantize_streams`): every linear value a weighted layer reads is marked for quantization.

A network whose weighted layers read only quantized activations becomes an SNN whose every synaptic layer after
the first is driven by spikes. MobileNetV2's linear bottlenecks and residual stream, and ShuffleNetV2's linear
depthwise outputs, feed convolutions with values no ReLU follows: left analog, each of their synapses costs a
multiply-accumulate in the SNN (11.3 M of `models/mobilenet_v2.pt`'s 21.7 M MACs per image). The mark, a signed
`ClippedReLU` (the identity), becomes a symmetric quantizer in `insert_quantizers` and a signed neuron whose
count runs from -L to L.

The value is marked where it is computed, so that every reader (the next block's convolution and the next
residual addition) reads the same spikes: found by walking back from each weighted layer's input through the ops
that only move, select, pool or pad values. Values computed from the input alone (a normalisation inside the
model) stay analog: the first weighted layer reads the image as it is. The mark is named after the node that
computes the value, before BatchNorm folds, so that the fine-tuning graph (BatchNorm kept) and the conversion
graph give it the same name."""
from __future__ import annotations

import torch.fx as fx

from ann2snn.compiler.graph_utils import insert_module_after
from ann2snn.compiler.ops import Role, is_shape_value, role_of
from ann2snn.compiler.quantizer import ClippedReLU

# ops a weighted layer's input is walked back through: they keep spikes spikes (average pooling and means give
# fractions of spikes, which the synaptic layer after them multiplies as it would their inputs)
_PASSING = frozenset({Role.RESHAPING, Role.PERMUTING, Role.SPLITTING, Role.INDEXING, Role.PADDING,
                      Role.REPLICATING, Role.MAX_POOLING, Role.AVG_POOLING, Role.MEAN})
_QUANTIZED = frozenset({Role.ACTIVATION, Role.QUANTIZER})


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in node.all_input_nodes if not is_shape_value(arg)]


def _computing_nodes(gm: fx.GraphModule, node: fx.Node) -> set[fx.Node]:
    """The nodes whose values reach `node` through passing ops only."""
    found: set[fx.Node] = set()
    pending = [node]
    while pending:
        current = pending.pop()
        if role_of(gm, current) in _PASSING:
            pending.extend(_tensor_inputs(current))
        else:
            found.add(current)
    return found


def _mark_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target}_stream"
    owner = node.meta.get("module_path")
    return f"{owner}.{node.name}_stream" if owner else f"{node.name}_stream"


def mark_streams(gm: fx.GraphModule) -> fx.GraphModule:
    after_weights: set[fx.Node] = set()
    to_mark: list[fx.Node] = []
    for node in gm.graph.nodes:  # graph order is topological
        role = role_of(gm, node)
        if role is Role.WEIGHTED:
            for value in _tensor_inputs(node)[:1]:
                to_mark += [computed for computed in _computing_nodes(gm, value)
                            if computed in after_weights and role_of(gm, computed) not in _QUANTIZED
                            and computed not in to_mark]
        if role is Role.WEIGHTED or any(arg in after_weights for arg in node.all_input_nodes):
            after_weights.add(node)
    for node in to_mark:
        insert_module_after(gm, node, _mark_name(node), ClippedReLU(signed=True))
    return gm
