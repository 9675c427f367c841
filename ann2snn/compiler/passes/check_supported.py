"""Pass 5: every node must be something a spiking network can compute; otherwise one error lists all
offending nodes (name, op, module type, source line) so the user can fix them in one go.

Between neurons only linear synaptic computation is allowed (conv, linear, affine, pooling, add, cat,
padding, slicing, reshaping, scaling by constants), plus max pooling, which the spiking network
computes exactly on accumulated spikes. Time is folded into the batch dimension, so ops must leave
dimension 0 alone."""
from __future__ import annotations

import torch.fx as fx

from ann2snn.compiler.ops import Role, is_shape_value, node_arg, role_of
from ann2snn.errors import ConversionError, describe_node

_SYNAPTIC = {Role.WEIGHTED, Role.CHANNELWISE, Role.MAX_POOLING, Role.AVG_POOLING, Role.PADDING, Role.RESHAPING,
             Role.ADD, Role.SUB, Role.SIGN, Role.SHAPE}
_ACTIVATIONS = {Role.ACTIVATION, Role.QUANTIZER}
_UNSUPPORTED = "not a linear synaptic op or a ReLU-like activation"


def unsupported_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why `node` cannot be part of a spiking network, or None if it can."""
    if node.op in ("placeholder", "output") or (node.op == "call_function" and is_shape_value(node)):
        return None
    if node.op == "get_attr":
        return "a tensor attribute used inside forward (a constant current); make it a module parameter"
    role = role_of(gm, node)
    if node.op == "call_module":
        if role is Role.MAX_POOLING and gm.get_submodule(node.target).return_indices:
            return "max pooling that returns indices"
        return None if role in _SYNAPTIC | _ACTIVATIONS else _UNSUPPORTED
    if role in (Role.MUL, Role.DIV):
        tensors = [a for a in node.args if isinstance(a, fx.Node) and not is_shape_value(a)]
        if len(tensors) > 1:
            return "product of two tensors (not linear in the spikes)"
        if role is Role.DIV and tensors and node.args[0] is not tensors[0]:
            return "division by a tensor (not linear in the spikes)"
        return None
    if role is Role.SUB and node.op == "call_function" and len(node.args) == 2 and is_shape_value(node.args[0]) \
            and not is_shape_value(node.args[1]):
        return "a constant minus a tensor; write it as -(x - c)"
    if role is Role.MEAN:
        dims = node_arg(node, 1, "dim")
        dims = (dims,) if isinstance(dims, int) else dims
        return None if dims and 0 not in dims else "mean over the batch dimension or over all dimensions"
    if role is Role.PADDING:
        value = node_arg(node, 3, "value", 0.0)
        return None if not value else f"padding with the non-zero value {value} (a constant current)"
    if role is Role.INDEXING:
        index = node.args[1]
        if is_shape_value(node.args[0]):
            return None
        first = index[0] if isinstance(index, tuple) and index else index
        return None if first in (slice(None), Ellipsis) else "indexing that selects along the batch dimension"
    if node.target is getattr:
        return None if node.args[1] in ("shape",) else f"attribute '{node.args[1]}'"
    return None if role in _SYNAPTIC else _UNSUPPORTED


def check_supported(gm: fx.GraphModule) -> fx.GraphModule:
    problems = [f"  - {describe_node(gm, node)}: {reason}"
                for node in gm.graph.nodes if (reason := unsupported_reason(gm, node)) is not None]
    if problems:
        raise ConversionError(
            f"{len(problems)} node(s) cannot be converted to a spiking network:\n" + "\n".join(problems)
            + "\nReplace these ops (e.g. SiLU/GELU/Hardswish by ReLU or ReLU6) and retrain or fine-tune.")
    return gm
