"""Pass 6: each normalised activation becomes a QCFS clip-floor-shift quantizer with 2**bits - 1 levels
(uncalibrated until `calibrate_thresholds` sets its threshold), symmetric for the signed marks of
`mark_streams`; `ann2snn.compiler.qbits` says how many bits each activation gets."""
from __future__ import annotations

import torch.fx as fx

from ann2snn.compiler.graph_utils import is_module
from ann2snn.compiler.qbits import QBits, activation_bits, activation_nodes, check_qbits
from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer
from ann2snn.io.batches import device_of


def insert_quantizers(gm: fx.GraphModule, qbits: QBits = 4, per_channel: bool = False) -> fx.GraphModule:
    bits = activation_bits(gm, qbits)
    # A quantizer's threshold lives where the model does, or the model (a GPU one in fine-tuning) is split
    device = device_of(gm)
    for node in activation_nodes(gm):
        if is_module(gm, node, ClippedReLU):
            activation = gm.get_submodule(node.target)
            gm.add_submodule(node.target, QCFSQuantizer(check_qbits(bits[node.target]), activation.upper, per_channel,
                                                        activation.signed).to(device))
    return gm


