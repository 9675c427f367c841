"""Pass 7 (activation matching): run calibration batches through the float network, collect each
activation's statistics and set every quantizer's threshold by the chosen rule, for the quantizer's own
levels or for `levels` (the T a rate-coded network resolves, see `ann2snn.config.SpikingCalibrationConfig`).
In a torch.distributed process group each process passes its own shard, and the statistics of all are
combined exactly."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx

from ann2snn.compiler.graph_utils import floating_dtype
from ann2snn.compiler.observers import HistogramObserver, all_reduce_observers
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.distributed import require_on_every_process
from ann2snn.errors import ConversionError
from ann2snn.io.batches import device_of, model_inputs


@contextmanager
def observing(model: torch.nn.Module, bins: int = 2048) -> Iterator[dict[str, QCFSQuantizer]]:
    """While active, every quantizer acts as its float activation and records statistics."""
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, QCFSQuantizer)}
    for quantizer in quantizers.values():
        quantizer.observer = HistogramObserver(quantizer.per_channel, bins)
    try:
        yield quantizers
    finally:
        for quantizer in quantizers.values():
            quantizer.observer = None


def calibrate_thresholds(gm: fx.GraphModule, batches: Iterable[Any], rule: str = "mse",
                         percentile: float = 99.99, levels: int | None = None) -> fx.GraphModule:
    with observing(gm) as quantizers, torch.no_grad():
        seen = 0
        for x in model_inputs(batches, device_of(gm)):
            gm(x)
            seen += 1
        require_on_every_process(seen > 0, "the calibration loader yielded no batches")
        # Under torchrun every process saw its own shard; thresholds are chosen from all of them.
        all_reduce_observers({name: quantizer.observer for name, quantizer in quantizers.items()})
        dtype = floating_dtype(gm)
        for name, quantizer in quantizers.items():
            if quantizer.observer.max is None:
                raise ConversionError(f"activation '{name}' was never reached by the calibration data")
            quantizer.set_threshold(quantizer.observer.threshold(rule, levels or quantizer.levels, percentile),
                                    quantizer.observer.ndim, dtype)
    return gm
