"""The Python API: quantize (ANN -> QANN) and convert (ANN -> SNN)."""
from __future__ import annotations

import copy
import itertools
import warnings
from functools import partial
from typing import Any, Iterable

import torch.fx as fx
import torch.nn as nn

from .passes import (balance_thresholds, calibrate_thresholds, check_supported, emit_neurons, fold_batchnorm,
                     insert_quantizers, normalize_activations, remove_identities, trace)
from .passes.emit_neurons import NEURON_KINDS, coding_of
from .passes.insert_quantizers import check_qbits
from .observers import THRESHOLD_RULES
from .batching import batch_input, device_of
from .pipeline import Pipeline
from .snn import SpikingNetwork, check_steps

DEFAULT_THRESHOLD_RULE = "mse"


def _eval_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        warnings.warn("the model was in training mode; converting its eval() form (BatchNorm running "
                      "statistics, no dropout)", stacklevel=3)
    return copy.deepcopy(model).eval()


def prepare_pipeline(example_input=None) -> Pipeline:
    """Trace and normalise: the graph every later stage (and `ann2snn inspect`) starts from. An example
    input records tensor shapes, which lets a Linear + BatchNorm1d pair fold (else it stays affine)."""
    return Pipeline([
        ("trace", partial(trace, example_input=example_input)),
        ("normalize_activations", normalize_activations),
        ("remove_identities", remove_identities),
        ("fold_batchnorm", fold_batchnorm),
        ("check_supported", check_supported),
    ])


def quantize(model: nn.Module, calib_loader: Iterable[Any], qbits: int = 4, *,
             threshold_rule: str = DEFAULT_THRESHOLD_RULE, percentile: float = 99.99,
             per_channel: bool = False) -> fx.GraphModule:
    """The quantized ANN (QANN): the model with every activation replaced by a calibrated QCFS
    clip-floor-shift quantizer of 2**qbits - 1 levels. The SNN is judged against it."""
    check_qbits(qbits)
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {threshold_rule!r}; choose one of {THRESHOLD_RULES}")
    batches = iter(calib_loader)
    first = next(batches, None)
    if first is None:
        raise ValueError("the calibration loader yielded no batches")
    example = batch_input(first)[:1].to(device_of(model))
    pipeline = Pipeline(prepare_pipeline(example).passes + [
        ("insert_quantizers", partial(insert_quantizers, qbits=qbits, per_channel=per_channel)),
        ("calibrate_thresholds", partial(calibrate_thresholds, batches=itertools.chain([first], batches),
                                         rule=threshold_rule,
                                         percentile=percentile)),
    ])
    return pipeline.run(_eval_copy(model))


def convert_qann(qann: fx.GraphModule, *, T: int = 32, neuron: str = "if", max_spikes_per_step: int = 1,
                 neuron_options: dict | None = None, chunk_size: int | None = None,
                 config: dict | None = None) -> SpikingNetwork:
    """The spiking network equivalent to a calibrated QANN."""
    check_steps("T", T)
    if neuron not in NEURON_KINDS:
        raise ValueError(f"unknown neuron {neuron!r}; choose one of {NEURON_KINDS}")
    spiking_graph = Pipeline([
        ("emit_neurons", partial(emit_neurons, neuron=neuron, max_spikes_per_step=max_spikes_per_step,
                                 neuron_options=neuron_options)),
        ("balance_thresholds", balance_thresholds),
    ]).run(copy.deepcopy(qann))
    config = {"T": T, "neuron": neuron, "max_spikes_per_step": max_spikes_per_step,
              "neuron_options": dict(neuron_options or {}), **(config or {})}
    return SpikingNetwork(spiking_graph, T, coding_of(neuron), qann=qann, chunk_size=chunk_size, config=config)


def convert(model: nn.Module, calib_loader: Iterable[Any], *, qbits: int = 4, T: int = 32, neuron: str = "if",
            threshold_rule: str = DEFAULT_THRESHOLD_RULE, percentile: float = 99.99, per_channel: bool = False,
            max_spikes_per_step: int = 1, neuron_options: dict | None = None,
            chunk_size: int | None = None) -> SpikingNetwork:
    """Convert a trained ANN into a spiking network.

    `calib_loader` yields tensors, (inputs, labels) tuples or dicts with an image key. The returned
    module simulates `T` steps per call; its `qann` attribute is the quantized ANN it reproduces.
    `neuron` is 'if' (rate-coded integrate-and-fire), 'lif' (leaky; `neuron_options` decay and
    compensate_leak) or 'signed' (ternary spikes, accumulate coding: equals the QANN once settled);
    `max_spikes_per_step` > 1 allows bursts of graded spikes."""
    check_qbits(qbits)
    check_steps("T", T)
    if neuron not in NEURON_KINDS:
        raise ValueError(f"unknown neuron {neuron!r}; choose one of {NEURON_KINDS}")
    qann = quantize(model, calib_loader, qbits, threshold_rule=threshold_rule, percentile=percentile,
                    per_channel=per_channel)
    config = {"qbits": qbits, "threshold_rule": threshold_rule, "per_channel": per_channel}
    if threshold_rule == "percentile":
        config["percentile"] = percentile
    return convert_qann(qann, T=T, neuron=neuron, max_spikes_per_step=max_spikes_per_step,
                        neuron_options=neuron_options, chunk_size=chunk_size, config=config)
