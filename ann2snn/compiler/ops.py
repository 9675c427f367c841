"""The op table: the role every known graph op plays, which every pass and `ann2snn inspect` consult.

`OPS` maps a module class (matched along the module's class hierarchy), a function (a `call_function`
target) or a method name (a `call_method` target) to its `Op`. Adding an op is one entry."""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ann2snn.compiler.graph_utils import is_number
from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer
from ann2snn.runtime.layers import ChannelAffine


class Role(enum.Enum):
    ACTIVATION = "ReLU-like activation"  # where its `upper` says so: hardtanh(-1, 1) is none
    QUANTIZER = "quantized activation"
    IDENTITY = "identity"
    NORMALIZATION = "BatchNorm"
    CHANNELWISE = "channel-wise affine"
    WEIGHTED = "weighted synapses"
    MAX_POOLING = "max pooling"
    AVG_POOLING = "average pooling"
    PADDING = "padding"
    RESHAPING = "reshaping"
    PERMUTING = "permutation of dimensions"
    SPLITTING = "splitting into parts"
    REPLICATING = "expand or repeat"
    INDEXING = "indexing"
    MEAN = "mean"
    ADD = "addition"
    SUB = "subtraction"
    SIGN = "unary plus or minus"
    MUL = "multiplication"
    DIV = "division"
    INTEGER_ARITHMETIC = "floor division or remainder"
    SHAPE = "shape"


class Commutes(enum.Enum):
    """Whether op(a * x) == a' * op(x) for a positive factor a (what moves a Scale forward)."""
    NO = 0
    SCALAR = 1  # a scalar a: ops that move, drop or average elements
    PER_CHANNEL = 2  # a per-channel a too: ops that keep each channel apart


NOT_RELU: Any = object()  # what `upper` returns for a clamp or hardtanh that is not a ReLU


@dataclass(frozen=True)
class Op:
    role: Role
    commutes: Commutes = Commutes.NO
    # ACTIVATION: the upper clip (None: unbounded) from the module, or from the node for functions and methods
    upper: Callable[[Any], Any] | None = None
    # a function of Python numbers too, so it is shape arithmetic when every input is a size
    on_sizes: bool = False
    # a functional op's module form (functional max pooling becomes a module)
    module: type[nn.Module] | None = None
    # the dimensions it moves, splits, replicates or reduces, from the node (negative ones count from the end,
    # None: all); time is folded into the batch dimension, so a spiking network cannot compute one that includes 0
    dims: Callable[[fx.Node], tuple[Any, ...] | None] | None = None


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` of the call, given by position or as keyword `name`."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def clamp_upper(lower: Any, upper: Any) -> Any:
    """The upper clip of clamp(x, lower, upper) if it is a ReLU (lower == 0), else NOT_RELU."""
    if not (is_number(lower) and lower == 0):
        return NOT_RELU
    if upper is None:
        return None
    return float(upper) if is_number(upper) and upper > 0 else NOT_RELU


def _dims(value: Any) -> tuple[Any, ...] | None:
    """A dim argument (int or sequence) as a tuple; None for every dimension (None or ())."""
    if value is None or value == ():
        return None
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def call_sizes(node: fx.Node) -> tuple[Any, ...]:
    """The sizes of a method called as x.op(a, b, c) or x.op((a, b, c)), or of torch.op(x, (a, b, c))."""
    rest = node.args[1:] or tuple(node.kwargs.values())[:1]
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)


def _permuted(node: fx.Node) -> tuple[Any, ...]:
    order = call_sizes(node)
    return tuple(position for position, dim in enumerate(order) if dim not in (position, position - len(order)))


def _transposed(node: fx.Node) -> tuple[Any, ...]:
    return (node_arg(node, 1, "dim0"), node_arg(node, 2, "dim1"))


def _expanded(node: fx.Node) -> tuple[Any, ...]:
    """Every dimension but those kept at -1: a leading size from x.size(0) keeps the batch (a new leading
    dimension does not, see `check_supported`)."""
    return tuple(position for position, size in enumerate(call_sizes(node))
                 if size != -1 and not (position == 0 and isinstance(size, fx.Node)))


def _repeated(node: fx.Node) -> tuple[Any, ...]:
    return tuple(position for position, times in enumerate(call_sizes(node)) if times != 1)


def _split(node: fx.Node) -> tuple[Any, ...]:
    return (node_arg(node, 2, "dim", 0),)


_RELU = Op(Role.ACTIVATION, upper=lambda _: None)
_RELU6 = Op(Role.ACTIVATION, upper=lambda _: 6.0)
_CLAMP = Op(Role.ACTIVATION, upper=lambda node: clamp_upper(node_arg(node, 1, "min"), node_arg(node, 2, "max")))
_CLAMP_MIN = Op(Role.ACTIVATION, upper=lambda node: clamp_upper(node_arg(node, 1, "min"), None))
_HARDTANH = Op(Role.ACTIVATION, upper=lambda node: clamp_upper(node_arg(node, 1, "min_val", -1.0),
                                                               node_arg(node, 2, "max_val", 1.0)))
_IDENTITY = Op(Role.IDENTITY)
_WEIGHTED = Op(Role.WEIGHTED)
_MAX_POOL = Op(Role.MAX_POOLING, Commutes.PER_CHANNEL)
_AVG_POOL = Op(Role.AVG_POOLING, Commutes.PER_CHANNEL)
_RESHAPE = Op(Role.RESHAPING, Commutes.SCALAR)
_PERMUTE = Op(Role.PERMUTING, Commutes.SCALAR, dims=_permuted)
_TRANSPOSE = Op(Role.PERMUTING, Commutes.SCALAR, dims=_transposed)
_SPLIT = Op(Role.SPLITTING, dims=_split)  # its parts are a tuple: a Scale before it stays there
_UNBIND = Op(Role.SPLITTING, dims=lambda node: (node_arg(node, 1, "dim", 0),))
_EXPAND = Op(Role.REPLICATING, Commutes.SCALAR, dims=_expanded)
_REPEAT = Op(Role.REPLICATING, Commutes.SCALAR, dims=_repeated)
_MEAN = Op(Role.MEAN, Commutes.SCALAR, dims=lambda node: _dims(node_arg(node, 1, "dim")))

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

OPS: dict[type | Callable | str, Op] = {
    ClippedReLU: Op(Role.ACTIVATION, upper=lambda module: module.upper),
    nn.ReLU: _RELU, F.relu: _RELU, F.relu_: _RELU, torch.relu: _RELU, torch.relu_: _RELU, "relu": _RELU,
    "relu_": _RELU,
    nn.ReLU6: _RELU6, F.relu6: _RELU6,
    nn.Hardtanh: Op(Role.ACTIVATION, upper=lambda module: clamp_upper(module.min_val, module.max_val)),
    F.hardtanh: _HARDTANH, F.hardtanh_: _HARDTANH,
    torch.clamp: _CLAMP, torch.clip: _CLAMP, torch.clamp_: _CLAMP, "clamp": _CLAMP, "clamp_": _CLAMP, "clip": _CLAMP,
    "clip_": _CLAMP,
    torch.clamp_min: _CLAMP_MIN, torch.clamp_min_: _CLAMP_MIN, "clamp_min": _CLAMP_MIN, "clamp_min_": _CLAMP_MIN,
    QCFSQuantizer: Op(Role.QUANTIZER),

    nn.Identity: _IDENTITY, nn.Dropout: _IDENTITY, nn.Dropout1d: _IDENTITY, nn.Dropout2d: _IDENTITY,
    nn.Dropout3d: _IDENTITY, nn.AlphaDropout: _IDENTITY, nn.FeatureAlphaDropout: _IDENTITY, F.dropout: _IDENTITY,
    F.dropout1d: _IDENTITY, F.dropout2d: _IDENTITY, F.dropout3d: _IDENTITY, F.alpha_dropout: _IDENTITY,
    F.feature_alpha_dropout: _IDENTITY, torch.dropout: _IDENTITY, "clone": _IDENTITY, "detach": _IDENTITY,
    # not an identity: a view after a transpose needs it
    "contiguous": Op(Role.RESHAPING, Commutes.PER_CHANNEL),

    nn.BatchNorm1d: Op(Role.NORMALIZATION), nn.BatchNorm2d: Op(Role.NORMALIZATION),
    nn.BatchNorm3d: Op(Role.NORMALIZATION),
    ChannelAffine: Op(Role.CHANNELWISE),
    **dict.fromkeys(CONVS, _WEIGHTED), nn.Linear: _WEIGHTED,

    nn.MaxPool1d: _MAX_POOL, nn.MaxPool2d: _MAX_POOL, nn.MaxPool3d: _MAX_POOL,
    F.max_pool1d: Op(Role.MAX_POOLING, Commutes.PER_CHANNEL, module=nn.MaxPool1d),
    F.max_pool2d: Op(Role.MAX_POOLING, Commutes.PER_CHANNEL, module=nn.MaxPool2d),
    F.max_pool3d: Op(Role.MAX_POOLING, Commutes.PER_CHANNEL, module=nn.MaxPool3d),
    nn.AvgPool1d: _AVG_POOL, nn.AvgPool2d: _AVG_POOL, nn.AvgPool3d: _AVG_POOL, nn.AdaptiveAvgPool1d: _AVG_POOL,
    nn.AdaptiveAvgPool2d: _AVG_POOL, nn.AdaptiveAvgPool3d: _AVG_POOL, F.avg_pool1d: _AVG_POOL,
    F.avg_pool2d: _AVG_POOL, F.avg_pool3d: _AVG_POOL, F.adaptive_avg_pool1d: _AVG_POOL,
    F.adaptive_avg_pool2d: _AVG_POOL, F.adaptive_avg_pool3d: _AVG_POOL,

    nn.ZeroPad1d: Op(Role.PADDING, Commutes.PER_CHANNEL), nn.ZeroPad2d: Op(Role.PADDING, Commutes.PER_CHANNEL),
    nn.ZeroPad3d: Op(Role.PADDING, Commutes.PER_CHANNEL),
    # these commute too; balance_thresholds has never moved a Scale through them, and does not yet
    nn.ReflectionPad1d: Op(Role.PADDING), nn.ReflectionPad2d: Op(Role.PADDING),
    nn.ReplicationPad1d: Op(Role.PADDING), nn.ReplicationPad2d: Op(Role.PADDING),
    # per channel only for some modes and sizes (see balance_thresholds)
    F.pad: Op(Role.PADDING, Commutes.SCALAR),

    nn.Flatten: Op(Role.RESHAPING),  # as for the reflection pads above
    torch.flatten: _RESHAPE, torch.reshape: _RESHAPE, torch.squeeze: _RESHAPE, torch.unsqueeze: _RESHAPE,
    "view": _RESHAPE, "reshape": _RESHAPE, "flatten": _RESHAPE, "squeeze": _RESHAPE, "unsqueeze": _RESHAPE,
    # the other inputs of a concatenation carry other scales
    torch.cat: Op(Role.RESHAPING), torch.concat: Op(Role.RESHAPING),
    torch.transpose: _TRANSPOSE, torch.swapaxes: _TRANSPOSE, torch.swapdims: _TRANSPOSE, "transpose": _TRANSPOSE,
    "swapaxes": _TRANSPOSE, "swapdims": _TRANSPOSE, torch.permute: _PERMUTE, "permute": _PERMUTE,
    torch.chunk: _SPLIT, "chunk": _SPLIT, torch.split: _SPLIT, "split": _SPLIT, torch.tensor_split: _SPLIT,
    "tensor_split": _SPLIT, torch.unbind: _UNBIND, "unbind": _UNBIND,
    "expand": _EXPAND, "repeat": _REPEAT,
    operator.getitem: Op(Role.INDEXING, Commutes.SCALAR),
    torch.mean: _MEAN, "mean": _MEAN,

    operator.add: Op(Role.ADD, on_sizes=True), torch.add: Op(Role.ADD), "add": Op(Role.ADD), "add_": Op(Role.ADD),
    operator.sub: Op(Role.SUB, on_sizes=True), torch.sub: Op(Role.SUB), "sub": Op(Role.SUB), "sub_": Op(Role.SUB),
    operator.neg: Op(Role.SIGN, on_sizes=True), operator.pos: Op(Role.SIGN), "neg": Op(Role.SIGN),
    operator.mul: Op(Role.MUL, on_sizes=True), torch.mul: Op(Role.MUL), "mul": Op(Role.MUL), "mul_": Op(Role.MUL),
    operator.truediv: Op(Role.DIV, on_sizes=True), torch.div: Op(Role.DIV), "div": Op(Role.DIV),
    "div_": Op(Role.DIV),
    operator.floordiv: Op(Role.INTEGER_ARITHMETIC, on_sizes=True),
    operator.mod: Op(Role.INTEGER_ARITHMETIC, on_sizes=True),
    "size": Op(Role.SHAPE), "dim": Op(Role.SHAPE), getattr: Op(Role.SHAPE),
}


def module_types(role: Role) -> tuple[type, ...]:
    return tuple(kind for kind, op in OPS.items() if isinstance(kind, type) and op.role is role)


WEIGHTED = module_types(Role.WEIGHTED)
BATCHNORMS = module_types(Role.NORMALIZATION)


def op_of(gm: fx.GraphModule, node: fx.Node) -> Op | None:
    """The table's entry for what `node` calls, or None for an op the table does not know."""
    if node.op == "call_module":
        kind = next((kind for kind in type(gm.get_submodule(node.target)).__mro__ if kind in OPS), None)
        return OPS.get(kind)
    if node.op in ("call_function", "call_method"):
        return OPS.get(node.target)
    return None


def relu_upper(gm: fx.GraphModule, node: fx.Node) -> Any:
    """For a ReLU-like node, its upper clip (None when unbounded); NOT_RELU for anything else."""
    op = op_of(gm, node)
    if op is None or op.role is not Role.ACTIVATION:
        return NOT_RELU
    return op.upper(gm.get_submodule(node.target) if node.op == "call_module" else node)


def role_of(gm: fx.GraphModule, node: fx.Node) -> Role | None:
    op = op_of(gm, node)
    if op is None or op.role is Role.ACTIVATION and relu_upper(gm, node) is NOT_RELU:
        return None
    return op.role


def is_shape_value(arg: Any) -> bool:
    """Python ints and tuples from size()/shape and arithmetic on them, which are not tensors."""
    if not isinstance(arg, fx.Node):
        return True
    if arg.op not in ("call_function", "call_method"):
        return False
    op = OPS.get(arg.target)
    if op is not None and op.role is Role.SHAPE:
        return True
    if arg.target is operator.getitem:
        return is_shape_value(arg.args[0])
    return arg.op == "call_function" and op is not None and op.on_sizes \
        and all(is_shape_value(a) for a in arg.all_input_nodes)
