"""The Python API: quantize (ANN -> QANN) and convert (ANN -> SNN)."""
from __future__ import annotations

import copy
import itertools
import warnings
from functools import partial
from collections.abc import Mapping
from typing import Any, Iterable

import torch.fx as fx
import torch.nn as nn

from ann2snn.compiler.passes import balance_thresholds, calibrate_thresholds, check_supported, emit_neurons, fold_batchnorm, insert_encoder, insert_quantizers, normalize_activations, remove_identities, set_thresholds, trace
from ann2snn.compiler.passes.emit_neurons import NEURON_KINDS, coding_of
from ann2snn.compiler.qbits import QBits, check_qbits_spec, quantizer_bits
from ann2snn.compiler.observers import THRESHOLD_RULES
from ann2snn.runtime.encoding import SPIKE_ENCODINGS, InputEncoder, check_encoding
from ann2snn.io.batches import batch_input, check_input_batch, check_model_accepts, device_of
from ann2snn.errors import ConversionWarning
from ann2snn.compiler.pass_manager import Pipeline
from ann2snn.runtime.network import SpikingNetwork, check_steps

DEFAULT_THRESHOLD_RULE = "mse"


def _eval_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    device_of(model)  # refuses a model spread over several devices before anything is copied
    if model.training:
        warnings.warn("the model was in training mode; converting its eval() form (BatchNorm running "
                      "statistics, no dropout)", ConversionWarning, stacklevel=3)
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


def quantize(model: nn.Module, calib_loader: Iterable[Any] | None, qbits: QBits = 4, *,
             threshold_rule: str = DEFAULT_THRESHOLD_RULE, percentile: float = 99.99,
             per_channel: bool = False, thresholds: Mapping[str, Any] | None = None) -> fx.GraphModule:
    """The quantized ANN (QANN): the model with every activation replaced by a calibrated QCFS
    clip-floor-shift quantizer of 2**qbits - 1 levels. The SNN is judged against it. `qbits` is one
    number of bits, or a mapping of activation names, 'first', 'last' and 'default' to bits (see
    `ann2snn.compiler.qbits`).

    `thresholds` (quantizer name -> theta, from `finetune`) replace calibration; `calib_loader` then
    only provides an example batch for shapes and may be None."""
    check_qbits_spec(qbits)
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {threshold_rule!r}; choose one of {THRESHOLD_RULES}")
    if threshold_rule == "percentile" and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    batches = iter(calib_loader if calib_loader is not None else ())
    first = next(batches, None)
    if first is None and thresholds is None:
        raise ValueError("the calibration loader yielded no batches")
    model = _eval_copy(model)
    example = None
    if first is not None:
        example = check_input_batch(batch_input(first), "calibration batch 0")[:1].to(device_of(model))
        check_model_accepts(model, example)
    if thresholds is not None:
        set_activation_thresholds = ("set_thresholds", partial(set_thresholds, thresholds=thresholds))
    else:
        set_activation_thresholds = ("calibrate_thresholds", partial(
            calibrate_thresholds, batches=itertools.chain([first], batches), rule=threshold_rule,
            percentile=percentile))
    pipeline = Pipeline(prepare_pipeline(example).passes + [
        ("insert_quantizers", partial(insert_quantizers, qbits=qbits, per_channel=per_channel)),
        set_activation_thresholds,
    ])
    # GraphModules the passes build start in training mode, in which quantizers train (see QCFSQuantizer)
    return pipeline.run(model).eval()


def _check_simulation_options(T: int, neuron: str, max_spikes_per_step: int, chunk_size: int | None,
                              encoding: str) -> None:
    """Refuse bad simulation settings before any pass runs."""
    check_steps("T", T)
    if neuron not in NEURON_KINDS:
        raise ValueError(f"unknown neuron {neuron!r}; choose one of {NEURON_KINDS}")
    check_encoding(encoding, coding_of(neuron), neuron)
    if not isinstance(max_spikes_per_step, int) or isinstance(max_spikes_per_step, bool) or max_spikes_per_step < 1:
        raise ValueError(f"max_spikes_per_step must be a positive integer, got {max_spikes_per_step!r}")
    if chunk_size is not None:
        check_steps("chunk_size", chunk_size)


def convert_qann(qann: fx.GraphModule, *, T: int = 32, neuron: str = "if", max_spikes_per_step: int = 1,
                 neuron_options: dict | None = None, chunk_size: int | None = None, encoding: str = "direct",
                 encoding_seed: int = 0, input_mean=None, input_std=None,
                 config: dict | None = None) -> SpikingNetwork:
    """The spiking network equivalent to a calibrated QANN. `encoding` is how the input reaches the
    first layer (see `ann2snn.runtime.encoding`): 'direct' (the analog image), or spikes, 'poisson' (seeded by
    `encoding_seed`) or 'regular', of the intensity recovered with the input's normalisation
    `input_mean` and `input_std` (per channel; default 0 and 1: the input is an intensity in [0, 1])."""
    _check_simulation_options(T, neuron, max_spikes_per_step, chunk_size, encoding)
    passes = [
        ("emit_neurons", partial(emit_neurons, neuron=neuron, max_spikes_per_step=max_spikes_per_step,
                                 neuron_options=neuron_options)),
        ("balance_thresholds", balance_thresholds),
    ]
    encoding_config = {"encoding": encoding}
    if encoding in SPIKE_ENCODINGS:
        encoder = InputEncoder(encoding, input_mean, input_std, encoding_seed)
        passes.append(("insert_encoder", partial(insert_encoder, encoder=encoder)))
        encoding_config.update(input_mean=encoder.mean.tolist(), input_std=encoder.std.tolist())
        if encoding == "poisson":
            encoding_config["encoding_seed"] = encoding_seed
    spiking_graph = Pipeline(passes).run(copy.deepcopy(qann))
    config = {"T": T, "neuron": neuron, "max_spikes_per_step": max_spikes_per_step,
              "neuron_options": dict(neuron_options or {}), **encoding_config, **(config or {})}
    return SpikingNetwork(spiking_graph, T, coding_of(neuron), qann=qann, chunk_size=chunk_size, config=config)


def _bits_config(qbits: QBits, qann: fx.GraphModule) -> dict[str, Any]:
    """The report's record of the QANN's bits: one number, or 'mixed' and the bits of every activation."""
    if not isinstance(qbits, Mapping):
        return {"qbits": qbits}
    bits = quantizer_bits(qann)
    distinct = set(bits.values())
    return {"qbits": distinct.pop()} if len(distinct) == 1 else {"qbits": "mixed", "qbits_per_layer": bits}


def convert(model: nn.Module, calib_loader: Iterable[Any] | None, *, qbits: QBits = 4, T: int = 32, neuron: str = "if",
            threshold_rule: str = DEFAULT_THRESHOLD_RULE, percentile: float = 99.99, per_channel: bool = False,
            max_spikes_per_step: int = 1, neuron_options: dict | None = None,
            chunk_size: int | None = None, thresholds: Mapping[str, Any] | None = None,
            encoding: str = "direct", encoding_seed: int = 0, input_mean=None, input_std=None) -> SpikingNetwork:
    """Convert a trained ANN into a spiking network.

    `calib_loader` yields tensors, (inputs, labels) tuples or dicts with an image key. The returned
    module simulates `T` steps per call; its `qann` attribute is the quantized ANN it reproduces.
    `neuron` is 'if' (rate-coded integrate-and-fire), 'lif' (leaky; `neuron_options` decay and
    compensate_leak), 'adaptive' (adaptive threshold; `neuron_options` adapt_increase and adapt_decay),
    'signed-rate' or 'signed' (ternary spikes, accumulate coding: equals the QANN once settled);
    `max_spikes_per_step` > 1 allows bursts of graded spikes. `thresholds` from `finetune` replace
    calibration (see `quantize`). `encoding`, `encoding_seed`, `input_mean` and `input_std`: see
    `convert_qann`."""
    check_qbits_spec(qbits)
    _check_simulation_options(T, neuron, max_spikes_per_step, chunk_size, encoding)
    qann = quantize(model, calib_loader, qbits, threshold_rule=threshold_rule, percentile=percentile,
                    per_channel=per_channel, thresholds=thresholds)
    if thresholds is not None:
        config = {**_bits_config(qbits, qann), "threshold_rule": "fine-tuned"}
    else:
        config = {**_bits_config(qbits, qann), "threshold_rule": threshold_rule, "per_channel": per_channel}
        if threshold_rule == "percentile":
            config["percentile"] = percentile
    return convert_qann(qann, T=T, neuron=neuron, max_spikes_per_step=max_spikes_per_step,
                        neuron_options=neuron_options, chunk_size=chunk_size, encoding=encoding,
                        encoding_seed=encoding_seed, input_mean=input_mean, input_std=input_std, config=config)
