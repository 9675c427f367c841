"""Pass 5: every node must be something a spiking network can compute; otherwise one error lists all
offending nodes (name, op, module type, source line) so the user can fix them in one go.

Between neurons only linear synaptic computation is allowed (conv, linear, affine, pooling, add, cat,
padding, slicing, reshaping, scaling by constants), plus max pooling, which the spiking network
computes exactly on accumulated spikes. Time is folded into the batch dimension, so ops must leave
dimension 0 alone."""
from __future__ import annotations

import torch.fx as fx

from ann2snn.compiler.ops import Role, call_sizes, is_shape_value, node_arg, op_of, role_of
from ann2snn.errors import ConversionError, describe_node

_SYNAPTIC = {Role.WEIGHTED, Role.CHANNELWISE, Role.MAX_POOLING, Role.AVG_POOLING, Role.PADDING, Role.RESHAPING,
             Role.PERMUTING, Role.SPLITTING, Role.REPLICATING, Role.MEAN, Role.ADD, Role.SUB, Role.SIGN, Role.SHAPE}
_ACTIVATIONS = {Role.ACTIVATION, Role.QUANTIZER}
_UNSUPPORTED = "not a linear synaptic op or a ReLU-like activation"


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def _batch_dimension_reason(node: fx.Node, role: Role, dims: tuple | None) -> str | None:
    """Why an op acting on `dims` of its first input would act on the batch dimension, or None if it does not."""
    what = role.value
    if dims is None:
        return f"{what} over all dimensions, the batch dimension too"
    rank = _rank(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if any(not isinstance(dim, int) for dim in dims):
        return f"{what} over dimensions computed at run time ({dims}): give them as integers"
    if rank is None and any(dim < 0 for dim in dims):
        return f"{what} over a negative dimension of a tensor whose rank is unknown: count dimensions from 0"
    if 0 in (dim % rank if dim < 0 else dim for dim in dims):
        return f"{what} over dimension 0, the batch dimension (time steps are folded into it)"
    if role is Role.REPLICATING and rank is not None and len(call_sizes(node)) != rank:
        return f"{what} that adds leading dimensions, so that the batch dimension moves"
    return None


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
    op = op_of(gm, node)
    if op is not None and op.dims is not None and (reason := _batch_dimension_reason(node, role, op.dims(node))):
        return reason
    if role is Role.PADDING:
        value = node_arg(node, 3, "value", 0.0)
        return None if not value else f"padding with the non-zero value {value} (a constant current)"
    if role is Role.INDEXING:
        source, index = node.args[0], node.args[1]
        if is_shape_value(source) or role_of(gm, source) is Role.SPLITTING:
            return None  # a size, or one of the parts of a split
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
