"""Pass 1: symbolic tracing with torch.fx, recording which module and source line made each node."""
from __future__ import annotations

import traceback

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer
from ann2snn.errors import ConversionError, innermost_user_frame
from ann2snn.runtime.layers import ChannelAffine, Scale, TemporalModule

LEAF_TYPES: tuple[type, ...] = (ClippedReLU, QCFSQuantizer, ChannelAffine, Scale, TemporalModule)


class _RecordingTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...] = LEAF_TYPES):
        super().__init__()
        self.record_stack_traces = True
        self.leaf_types = leaf_types
        self.path_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.path_stack.append((path, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if not hasattr(error, "ann2snn_module"):
                error.ann2snn_module = (path, type(m).__name__)
            raise
        finally:
            self.path_stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.path_stack:
            node.meta["module_path"] = self.path_stack[-1][0]
        return node


def _user_location(error: Exception) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return innermost_user_frame([(frame.filename, frame.lineno, frame.line or "") for frame in frames])


def _mutates_first_argument(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_") or node.kwargs.get("inplace") is True
    return False


def make_functional(graph: fx.Graph, root: nn.Module) -> None:
    """An in-place op (`x.relu_()`, `nn.ReLU(inplace=True)`, `F.relu(x, inplace=True)`) changes its
    input for every later reader; make those readers read the op's result instead, so the dataflow
    graph says what the eager model computes (and a bare `x.relu_()` statement is not dead code)."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        mutated = node.args[0] if node.args else None
        if not isinstance(mutated, fx.Node) or not _mutates_first_argument(root, node):
            continue
        for reader in list(mutated.users):
            if reader is not node and order[reader] > order[node]:
                reader.replace_input_with(mutated, node)


def trace(model: nn.Module, leaf_types: tuple[type, ...] = LEAF_TYPES,
          example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """Trace `model` into a GraphModule whose nodes carry `module_path` and `stack_trace` metadata
    (and `tensor_meta` shapes when an example input is given)."""
    tracer = _RecordingTracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as error:
        path, kind = getattr(error, "ann2snn_module", ("", type(model).__name__))
        where = f"module '{path}' ({kind})" if path else f"the top-level {kind}"
        raise ConversionError(
            f"torch.fx could not trace {where} at {_user_location(error)}: {error}. "
            "Data-dependent control flow (if/for on tensor values) cannot be converted; rewrite it "
            "without branching on tensor values or make that module a leaf."
        ) from error
    # before the GraphModule exists, so that the code it generates already reads the rewired dataflow
    make_functional(graph, tracer.root)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if example_input is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    return gm
