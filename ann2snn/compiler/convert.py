"""The Python API: quantize (ANN -> QANN) and convert (ANN -> SNN)."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from ann2snn.compiler import passes
from ann2snn.compiler.graph_utils import floating_dtype
from ann2snn.compiler.pass_manager import PassManager
from ann2snn.compiler.passes import (
    balance_thresholds,
    calibrate_spiking,
    calibrate_thresholds,
    emit_neurons,
    insert_encoder,
    insert_quantizers,
    normalize_activations,
    reconstruct_blocks,
    remove_identities,
    set_thresholds,
    trace,
)
from ann2snn.compiler.passes.calibrate_spiking import NO_CALIBRATION
from ann2snn.compiler.passes.reconstruct_blocks import NO_RECONSTRUCTION
from ann2snn.compiler.qbits import QBits, quantizer_bits
from ann2snn.config import ConversionConfig, QuantizationConfig, channelwise_thresholds, quantization_config
from ann2snn.distributed import gather_in_order
from ann2snn.errors import ConversionWarning
from ann2snn.io.batches import batch_input, check_input_batch, check_model_accepts, device_of
from ann2snn.runtime.encoding import SPIKE_ENCODINGS, InputEncoder
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neuron_kinds import neuron_kind

# the threshold rule recorded for thresholds that came from fine-tuning
FINE_TUNED = "fine-tuned"


def _eval_copy(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    device_of(model)  # refuses a model spread over several devices before anything is copied
    if model.training:
        warnings.warn("the model was in training mode; converting its eval() form (BatchNorm running "
                      "statistics, no dropout)", ConversionWarning, stacklevel=3)
    return copy.deepcopy(model).eval()


def prepare_pipeline(example_input=None, *, fold_batchnorm: bool = True, check_supported: bool = True,
                     quantize_streams: bool = False) -> PassManager:
    """Trace and normalise: the graph every later stage (and `ann2snn inspect`) starts from. An example
    input records tensor shapes, which lets a Linear + BatchNorm1d pair fold (else it stays affine).
    `fold_batchnorm=False` keeps the BatchNorm layers (fine-tuning trains them); `check_supported=False`
    keeps nodes a spiking network cannot compute (`ann2snn inspect` reports them itself); `quantize_streams`
    marks the linear values weighted layers read for quantization (see `QuantizationConfig`)."""
    steps = [
        ("trace", partial(trace, example_input=example_input)),
        ("normalize_activations", normalize_activations),
        ("remove_identities", remove_identities),
    ]
    if quantize_streams:
        steps.append(("mark_streams", passes.mark_streams))
    if fold_batchnorm:
        steps.append(("fold_batchnorm", passes.fold_batchnorm))
    if check_supported:
        steps.append(("check_supported", passes.check_supported))
    return PassManager(steps)


def quantize(model: nn.Module, calib_loader: Iterable[Any] | None,
             config: QuantizationConfig | ConversionConfig | QBits | None = None, *,
             thresholds: Mapping[str, Any] | None = None, **settings: Any) -> fx.GraphModule:
    """The quantized ANN (QANN): the model with every activation replaced by a calibrated QCFS
    clip-floor-shift quantizer of 2**qbits - 1 levels. The SNN is judged against it.

    `config` is a `QuantizationConfig` (or a `ConversionConfig`, whose quantization part is used), or, for
    short, the bits: one number, or a mapping of activation names, 'first', 'last' and 'default' to bits
    (see `ann2snn.compiler.qbits`). Keyword `settings` (qbits, threshold_rule, percentile, per_channel,
    reconstruction) build it or change it.

    `thresholds` (quantizer name -> theta, from `finetune`) replace calibration; `calib_loader` then
    only provides an example batch for shapes and may be None. Given a `ConversionConfig` of rate-coded
    neurons, the thresholds are chosen for the levels its `threshold_level_count` says."""
    quantization = quantization_config(config, **settings)
    levels = config.threshold_level_count if isinstance(config, ConversionConfig) else None
    batches = iter(calib_loader if calib_loader is not None else ())
    first = next(batches, None)
    if first is None and thresholds is None:
        raise ValueError("the calibration loader yielded no batches")
    model = _eval_copy(model)
    example = None
    if first is not None:
        example = check_input_batch(batch_input(first), "calibration batch 0")[:1].to(device_of(model))
        check_model_accepts(model, example)
    reconstructs = thresholds is None and quantization.reconstruction != NO_RECONSTRUCTION
    threshold_steps: list[tuple[str, Any]]
    if thresholds is not None:
        threshold_steps = [("set_thresholds", partial(set_thresholds, thresholds=thresholds))]
    else:
        calibration = itertools.chain([first], batches)
        if reconstructs:  # read once, for both passes
            calibration = [batch_input(batch) for batch in calibration]
        threshold_steps = [("calibrate_thresholds", partial(
            calibrate_thresholds, batches=calibration, rule=quantization.threshold_rule,
            percentile=quantization.percentile, levels=levels))]
        if reconstructs:
            # under torchrun every process fits the same network, on the images of all shards
            threshold_steps.append(("reconstruct_blocks", partial(
                reconstruct_blocks, inputs=gather_in_order(calibration), method=quantization.reconstruction)))
    pipeline = PassManager(prepare_pipeline(example, quantize_streams=quantization.quantize_streams).passes + [
        ("insert_quantizers", partial(insert_quantizers, qbits=quantization.qbits,
                                      per_channel=channelwise_thresholds(quantization, levels))),
        *threshold_steps,
    ])
    # GraphModules the passes build start in training mode, in which quantizers train (see QCFSQuantizer)
    return pipeline.run(model).eval()


def _conversion_config(config: ConversionConfig | None, settings: dict[str, Any]) -> ConversionConfig:
    config = config or ConversionConfig()
    return config.replace(**settings) if settings else config


class _FirstInputs:
    """Calibration batches passed through, the inputs of the first `images` images kept on the way (the SNN
    calibration's), so that a loader is read once: `inputs` reads on from where threshold calibration
    stopped (after one batch, with fine-tuned thresholds) until it has them."""

    def __init__(self, batches: Iterable[Any], images: int):
        self.remaining, self.images, self.kept, self.held = iter(batches), images, [], 0

    def _keep(self, batch: Any) -> Any:
        if self.held < self.images:
            self.kept.append(batch_input(batch)[:self.images - self.held])
            self.held += len(self.kept[-1])
        return batch

    def __iter__(self):
        return map(self._keep, self.remaining)

    def inputs(self) -> torch.Tensor | None:
        """The first `images` inputs; under torchrun, of all processes' shards in the single-process order, so
        that every process calibrates on the images one process would (called on every process)."""
        while self.held < self.images and (batch := next(self.remaining, None)) is not None:
            self._keep(batch)
        kept = gather_in_order(self.kept)
        return torch.cat(kept)[:self.images] if kept else None


def _spiking_network(qann: fx.GraphModule, config: ConversionConfig, quantization_record: dict[str, Any],
                     calibration_inputs: torch.Tensor | None = None) -> SpikingNetwork:
    """The spiking network of a calibrated QANN; its `config` is the configuration's record without its
    quantization part, which `quantization_record` describes. Rate-coded networks are then calibrated on
    `calibration_inputs` as the configuration's calibration part says (not without inputs)."""
    neuron, encoding, calibration = config.neuron, config.encoding, config.calibration
    spiking_passes = [
        ("emit_neurons", partial(emit_neurons, neuron=neuron.kind, max_spikes_per_step=neuron.max_spikes_per_step,
                                 neuron_options=neuron.options)),
        ("balance_thresholds", balance_thresholds),
    ]
    if encoding.kind in SPIKE_ENCODINGS:
        encoder = InputEncoder(encoding.kind, encoding.input_mean, encoding.input_std, encoding.seed)
        spiking_passes.append(("insert_encoder", partial(insert_encoder, encoder=encoder)))
    calibrated = config.calibrates_spiking and calibration_inputs is not None
    if calibrated:
        inputs = calibration_inputs.to(device_of(qann), floating_dtype(qann))  # _FirstInputs kept `images`
        spiking_passes.append(("calibrate_spiking", partial(calibrate_spiking, inputs=inputs, qann=qann,
                                                            T=config.simulation.T, method=config.snn_calibration,
                                                            readout_delay=config.readout_delay)))
    spiking_graph = PassManager(spiking_passes).run(copy.deepcopy(qann))
    record = {**config.simulation.to_dict(), **neuron.to_dict(), **encoding.to_dict(), **quantization_record}
    if config.rate_coded:
        applied = dataclasses.replace(calibration, method=config.snn_calibration if calibrated else NO_CALIBRATION,
                                      readout_delay=config.readout_delay)
        record.update(applied.to_dict())
        if quantization_record.get("threshold_rule") == FINE_TUNED:
            del record["threshold_levels"]  # fine-tuned thresholds were not chosen for any number of levels
    return SpikingNetwork(spiking_graph, config.simulation.T, neuron_kind(neuron.kind).coding.name, qann=qann,
                          chunk_size=config.simulation.chunk_size, config=record,
                          readout_delay=config.readout_delay)


def convert_qann(qann: fx.GraphModule, config: ConversionConfig | None = None, **settings: Any) -> SpikingNetwork:
    """The spiking network equivalent to a calibrated QANN, as `config` (its quantization part aside: the
    QANN is quantized already) or the keyword `settings` (T, neuron, max_spikes_per_step, neuron_options,
    chunk_size, encoding, encoding_seed, input_mean, input_std) say. `encoding` is how the input reaches the
    first layer (see `ann2snn.runtime.encoding`): 'direct' (the analog image), or spikes, 'poisson' (seeded
    by `encoding_seed`) or 'regular', of the intensity recovered with the input's normalisation `input_mean`
    and `input_std` (per channel; default 0 and 1: the input is an intensity in [0, 1])."""
    return _spiking_network(qann, _conversion_config(config, settings), {})


def _quantization_record(config: ConversionConfig, qann: fx.GraphModule, fine_tuned: bool) -> dict[str, Any]:
    """The report's record of the QANN: its bits (one number, or 'mixed' and the bits of every activation)
    and where its thresholds came from (per channel or not, as decided)."""
    quantization = config.quantization
    bits = quantizer_bits(qann)
    distinct = set(bits.values())
    if not isinstance(quantization.qbits, Mapping):
        record = {"qbits": quantization.qbits}
    elif len(distinct) == 1:
        record = {"qbits": distinct.pop()}
    else:
        record = {"qbits": "mixed", "qbits_per_layer": bits}
    if fine_tuned:
        return {**record, "threshold_rule": FINE_TUNED}
    settings = {**quantization.to_dict(), "per_channel": config.channelwise_thresholds}
    return {**record, **{key: value for key, value in settings.items() if key != "qbits"}}


def convert(model: nn.Module, calib_loader: Iterable[Any] | None, config: ConversionConfig | None = None, *,
            thresholds: Mapping[str, Any] | None = None, **settings: Any) -> SpikingNetwork:
    """Convert a trained ANN into a spiking network, as `config` (an `ann2snn.config.ConversionConfig`)
    says; keyword `settings` (its flat record's keys: qbits, T, neuron, threshold_rule, percentile,
    per_channel, max_spikes_per_step, neuron_options, chunk_size, encoding, encoding_seed, input_mean,
    input_std) build it, or change the given one.

    `calib_loader` yields tensors, (inputs, labels) tuples or dicts with an image key. The returned
    module simulates `T` steps per call; its `qann` attribute is the quantized ANN it reproduces.
    `neuron` is 'if' (rate-coded integrate-and-fire), 'lif' (leaky; `neuron_options` decay and
    compensate_leak), 'adaptive' (adaptive threshold; `neuron_options` adapt_increase and adapt_decay),
    'signed-rate' or 'signed' (ternary spikes, accumulate coding: equals the QANN once settled);
    `max_spikes_per_step` > 1 allows bursts of graded spikes. `thresholds` from `finetune` replace
    calibration (see `quantize`). Encodings: see `convert_qann`."""
    config = _conversion_config(config, settings)
    batches = _FirstInputs(calib_loader if calib_loader is not None else (), config.calibration.images)
    qann = quantize(model, batches, config, thresholds=thresholds)
    # the calibration images are read on, and under torchrun gathered, only for a network that uses them
    return _spiking_network(qann, config, _quantization_record(config, qann, thresholds is not None),
                            batches.inputs() if config.calibrates_spiking else None)
