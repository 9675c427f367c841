"""Pass 5: every node must be something a spiking network can compute; otherwise one error lists all
offending nodes (name, op, module type, source line) so the user can fix them in one go.

Between neurons only linear synaptic computation is allowed (conv, linear, affine, pooling, add, cat,
padding, slicing, reshaping, scaling by constants), plus max pooling, which the spiking network
computes exactly on accumulated spikes. Time is folded into the batch dimension, so ops must leave
dimension 0 alone."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ann2snn.errors import ConversionError, describe_node
from ann2snn.compiler.ops import AVG_POOLS, MAX_POOLS, WEIGHTED
from ann2snn.runtime.layers import ChannelAffine
from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer

SUPPORTED_MODULES: tuple[type, ...] = WEIGHTED + AVG_POOLS + MAX_POOLS + (
    ClippedReLU, QCFSQuantizer, ChannelAffine, nn.Flatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
LINEAR_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.pos, torch.add, torch.sub, torch.cat, torch.concat,
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
}
LINEAR_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "add", "sub", "add_", "sub_", "neg", "size", "dim"}
SCALING_OPS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", "mul_", "div_"}
DIVISIONS = {operator.truediv, torch.div, "div", "div_"}
MEAN_OPS = {torch.mean, "mean"}
SHAPE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg}


def _value_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def is_shape_value(arg: Any) -> bool:
    """Python ints and tuples from size()/shape, which are not tensors."""
    if not isinstance(arg, fx.Node):
        return True
    if arg.op == "call_method" and arg.target in ("size", "dim"):
        return True
    if arg.op == "call_function" and arg.target is getattr:
        return True
    if arg.op == "call_function" and arg.target is operator.getitem:
        return is_shape_value(arg.args[0])
    # arithmetic on sizes (x.shape[1] // 2) is still a size
    return arg.op == "call_function" and arg.target in SHAPE_ARITHMETIC \
        and all(is_shape_value(a) for a in arg.all_input_nodes)


def unsupported_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why `node` cannot be part of a spiking network, or None if it can."""
    if node.op in ("placeholder", "output") or (node.op == "call_function" and is_shape_value(node)):
        return None
    if node.op == "get_attr":
        return "a tensor attribute used inside forward (a constant current); make it a module parameter"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, MAX_POOLS) and module.return_indices:
            return "max pooling that returns indices"
        return None if isinstance(module, SUPPORTED_MODULES) else "not a linear synaptic op or a ReLU-like activation"
    target = node.target
    if target in SCALING_OPS:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and not is_shape_value(a)]
        if len(tensors) > 1:
            return "product of two tensors (not linear in the spikes)"
        if target in DIVISIONS and tensors and node.args[0] is not tensors[0]:
            return "division by a tensor (not linear in the spikes)"
        return None
    if target in (operator.sub, torch.sub) and is_shape_value(node.args[0]) \
            and not is_shape_value(node.args[1]):
        return "a constant minus a tensor; write it as -(x - c)"
    if target in MEAN_OPS:
        dims = _value_arg(node, 1, "dim")
        dims = (dims,) if isinstance(dims, int) else dims
        return None if dims and 0 not in dims else "mean over the batch dimension or over all dimensions"
    if target is F.pad:
        value = _value_arg(node, 3, "value", 0.0)
        return None if not value else f"padding with the non-zero value {value} (a constant current)"
    if target is operator.getitem:
        index = node.args[1]
        if is_shape_value(node.args[0]):
            return None
        first = index[0] if isinstance(index, tuple) and index else index
        return None if first in (slice(None), Ellipsis) else "indexing that selects along the batch dimension"
    if target is getattr:
        return None if node.args[1] in ("shape",) else f"attribute '{node.args[1]}'"
    if node.op == "call_function" and target in LINEAR_FUNCTIONS:
        return None
    if node.op == "call_method" and target in LINEAR_METHODS:
        return None
    return "not a linear synaptic op or a ReLU-like activation"


def check_supported(gm: fx.GraphModule) -> fx.GraphModule:
    problems = [f"  - {describe_node(gm, node)}: {reason}"
                for node in gm.graph.nodes if (reason := unsupported_reason(gm, node)) is not None]
    if problems:
        raise ConversionError(
            f"{len(problems)} node(s) cannot be converted to a spiking network:\n" + "\n".join(problems)
            + "\nReplace these ops (e.g. SiLU/GELU/Hardswish by ReLU or ReLU6) and retrain or fine-tune.")
    return gm
