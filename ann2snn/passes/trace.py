"""Pass 1: symbolic tracing with torch.fx, recording which module and source line made each node."""
from __future__ import annotations

import traceback

import torch.fx as fx
import torch.nn as nn

from ..errors import ConversionError, _TORCH_DIR
from ..graph_utils import finalize
from ..layers import ChannelAffine, ClippedReLU, QCFSQuantizer, Scale, TemporalModule

LEAF_TYPES: tuple[type, ...] = (ClippedReLU, QCFSQuantizer, ChannelAffine, Scale, TemporalModule)


class _RecordingTracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]):
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
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if "/ann2snn/" not in f.filename] or frames
    if not frames:
        return "unknown source line"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"


def trace(model: nn.Module, leaf_types: tuple[type, ...] = LEAF_TYPES) -> fx.GraphModule:
    """Trace `model` into a GraphModule whose nodes carry `module_path` and `stack_trace` metadata."""
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
    return finalize(fx.GraphModule(tracer.root, graph, type(model).__name__))
