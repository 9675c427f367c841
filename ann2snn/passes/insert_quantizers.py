"""Pass 6: each normalised activation becomes a QCFS clip-floor-shift quantizer with 2**qbits - 1 levels
(uncalibrated until `calibrate_thresholds` sets its threshold)."""
from __future__ import annotations

import torch.fx as fx

from ..graph_utils import finalize, is_module
from ..layers import ClippedReLU, QCFSQuantizer


def check_qbits(qbits: int) -> int:
    if not isinstance(qbits, int) or isinstance(qbits, bool) or not 1 <= qbits <= 8:
        raise ValueError(f"qbits must be an integer in 1..8, got {qbits!r}")
    return 2 ** qbits - 1


def insert_quantizers(gm: fx.GraphModule, qbits: int = 4, per_channel: bool = False) -> fx.GraphModule:
    levels = check_qbits(qbits)
    for node in gm.graph.nodes:
        if is_module(gm, node, ClippedReLU):
            upper = gm.get_submodule(node.target).upper
            gm.add_submodule(node.target, QCFSQuantizer(levels, upper, per_channel))
    return finalize(gm)
