"""Pass 10 (spike encodings only): an `InputEncoder` between the network's input and its first layers.

The encoder is a temporal module, so the first layers move from the static prefix into the simulated body
(see `ann2snn.runtime.network.split_static_prefix`): they receive a spike train instead of the analog image."""
from __future__ import annotations

import torch.fx as fx

from ann2snn.compiler.graph_utils import insert_module_after
from ann2snn.runtime.encoding import InputEncoder


def insert_encoder(gm: fx.GraphModule, encoder: InputEncoder) -> fx.GraphModule:
    inputs = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"a spike encoding needs a network with one input, got {len(inputs)} "
                         f"({', '.join(node.name for node in inputs)})")
    insert_module_after(gm, inputs[0], "input_encoder", encoder)
    return gm
