"""How fast a spiking network approaches the networks it was converted from."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.runtime.network import SpikingNetwork

# enough levels that the quantization step is negligible next to float32 rounding of the activations
_UNQUANTIZED_LEVELS = 2 ** 22


def clipped_reference(qann: fx.GraphModule) -> fx.GraphModule:
    """The QANN with its quantization removed but its clipping kept: clamp(x, 0, theta) per layer.
    This is the limit a rate-coded network approaches as T grows (a rate has unbounded resolution)."""
    clipped = copy.deepcopy(qann)
    for module in clipped.modules():
        if isinstance(module, QCFSQuantizer):
            module.levels = _UNQUANTIZED_LEVELS
    return clipped


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((output - reference).norm() / reference.norm().clamp_min(1e-12)).detach())


@torch.no_grad()
def convergence(snn: SpikingNetwork, x: torch.Tensor, T_list: list[int]) -> dict[int, dict[str, float]]:
    """Relative error of the SNN output at each T against the QANN and against the clipped ANN."""
    references = {"qann": snn.qann(x), "clipped": clipped_reference(snn.qann)(x)}
    outputs = snn.simulate(x, T_list).outputs
    return {T: {name: relative_error(outputs[T], ref) for name, ref in references.items()} for T in T_list}
