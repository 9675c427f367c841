"""Pass 7, alternative to calibration: every quantizer takes a given threshold (from quantization-aware
fine-tuning), looked up by the quantizer's module name. The names are those `normalize_activations` gives,
so they agree between the fine-tuning graph (BatchNorm intact) and the conversion graph (BatchNorm folded)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx

from ann2snn.compiler.graph_utils import floating_dtype
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.errors import ConversionError


def set_thresholds(gm: fx.GraphModule, thresholds: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    quantizers = {name: module for name, module in gm.named_modules() if isinstance(module, QCFSQuantizer)}
    problems = []
    if missing := sorted(set(quantizers) - set(thresholds)):
        problems.append(f"no threshold for {', '.join(missing)}")
    if unknown := sorted(set(thresholds) - set(quantizers)):
        problems.append(f"no activation named {', '.join(unknown)}")
    if problems:
        raise ConversionError(f"the given thresholds do not match the model's activations: {'; '.join(problems)}. "
                              "Were they fine-tuned on a different architecture?")
    dtype = floating_dtype(gm)
    for name, quantizer in quantizers.items():
        theta = torch.as_tensor(thresholds[name], dtype=dtype, device=quantizer.theta.device)
        if not torch.isfinite(theta).all() or (theta <= 0).any():
            raise ConversionError(f"threshold of '{name}' must be finite and positive, got "
                                  f"{theta.flatten()[:4].tolist()}")
        # A per-layer threshold is a scalar; a per-channel one keeps its broadcast shape [1, C, 1, ...].
        quantizer.per_channel = theta.dim() > 0
        quantizer.theta = theta.detach().clone()
    return gm
