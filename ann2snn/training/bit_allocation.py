"""Automatic per-layer precision: spend activation bits where a layer's quantization hurts the output most,
under a budget of bits per neuron.

Sensitivity: for each activation and each candidate number of bits b, the QANN with that activation alone at
b bits (calibrated at b bits) and every other at the highest candidate; its cost is the KL divergence of its
output distribution from the ANN's, averaged over the probe images. Allocation: every activation starts at
the highest candidate; while the mean bits per neuron (each activation weighted by its number of neurons, so
that the budget bounds the total) exceeds the budget, the activation whose next bit down costs the least KL
per neuron-bit saved loses one bit; budget the last step left unspent then goes back, a bit at a time, to the
activations where it reduces the KL most per neuron-bit. Fewer bits also mean fewer spikes: a signed neuron fires at
most 2**bits - 1 times, a rate-coded one represents that many levels.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ann2snn.compiler.convert import quantize
from ann2snn.compiler.qbits import DEFAULT_KEY, assigned_bits, check_qbits, check_qbits_spec, quantizer_bits
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.config import QuantizationConfig
from ann2snn.distributed import reduce_over_processes
from ann2snn.io.batches import device_of, model_inputs

DEFAULT_MIN_BITS = 2
DEFAULT_MAX_BITS = 8
DEFAULT_PROBE_IMAGES = 256
METRIC = "mean KL divergence of the QANN's output distribution from the ANN's"


@dataclass
class BitAllocation:
    """The bits chosen for every activation (pass `bits` as `qbits` to `quantize`/`convert`), the neurons per
    image of each, and the measured sensitivity: KL at each candidate bits with that activation alone lowered."""

    bits: dict[str, int]
    budget: float
    neurons: dict[str, int]
    pinned: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    baseline_kl: float
    probe_images: int

    @property
    def mean_bits(self) -> float:
        return mean_bits(self.bits, self.neurons)

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "mean_bits": self.mean_bits, "bits": dict(self.bits),
                "pinned": dict(self.pinned), "neurons": dict(self.neurons), "metric": METRIC,
                "probe_images": self.probe_images, "baseline_kl": self.baseline_kl,
                "sensitivity": {name: {str(bits): kl for bits, kl in sorted(by_bits.items())}
                                for name, by_bits in self.sensitivity.items()}}


def read_qbits_config(path: str | Path) -> dict[str, int]:
    """A per-layer bits mapping from a JSON file: {"default": 4, "first": 8, "layer3.2.relu_18": 6}."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a JSON object of activation names to bits, got {type(mapping).__name__}")
    try:
        return dict(check_qbits_spec(mapping))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def mean_bits(bits: Mapping[str, int], neurons: Mapping[str, int]) -> float:
    """Bits per neuron, averaged over every neuron of the network."""
    return sum(bits[name] * neurons[name] for name in bits) / sum(neurons[name] for name in bits)


def _probe(batches: list[torch.Tensor], images: int) -> list[torch.Tensor]:
    probe, seen = [], 0
    for x in batches:
        if seen >= images:
            break
        probe.append(x[:images - seen])
        seen += probe[-1].shape[0]
    return probe


def _neurons_per_image(qann: fx.GraphModule, x: torch.Tensor) -> dict[str, int]:
    sizes: dict[str, int] = {}
    handles = [module.register_forward_hook(
        lambda module, inputs, output, name=name: sizes.__setitem__(name, output[0].numel()))
        for name, module in qann.named_modules() if isinstance(module, QCFSQuantizer)]
    try:
        with torch.no_grad():
            qann(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _kl_sum(qann: nn.Module, probe: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """The summed (over images) KL divergence of qann's output distribution from the target log-probabilities."""
    with torch.no_grad():
        return sum(float(F.kl_div(F.log_softmax(qann(x), -1), target, log_target=True, reduction="sum"))
                   for x, target in zip(probe, targets))


def _greedy(sensitivity: dict[str, dict[int, float]], neurons: dict[str, int], pinned: dict[str, int],
            budget: float, min_bits: int, max_bits: int) -> dict[str, int]:
    bits = {name: pinned.get(name, max_bits) for name in neurons}
    lowest = mean_bits({name: pinned.get(name, min_bits) for name in neurons}, neurons)
    if lowest > budget:
        raise ValueError(f"a budget of {budget} bits per neuron cannot be met: with {min_bits} bits for every "
                         f"activation not pinned, the network still needs {lowest:.3f}")
    while mean_bits(bits, neurons) > budget:
        lowerable = [name for name in sensitivity if bits[name] > min_bits]
        name = min(lowerable, key=lambda name: (sensitivity[name][bits[name] - 1] - sensitivity[name][bits[name]])
                   / neurons[name])
        bits[name] -= 1
    # The last step down may leave part of the budget unspent: give it back where a bit helps most.
    while raisable := [name for name in sensitivity if bits[name] < max_bits
                       and mean_bits({**bits, name: bits[name] + 1}, neurons) <= budget]:
        name = max(raisable, key=lambda name: (sensitivity[name][bits[name]] - sensitivity[name][bits[name] + 1])
                   / neurons[name])
        bits[name] += 1
    return bits


def allocate_bits(model: nn.Module, calib_loader: Iterable[Any], budget: float, *,
                  pinned: Mapping[str, int] | None = None, min_bits: int = DEFAULT_MIN_BITS,
                  max_bits: int = DEFAULT_MAX_BITS, probe_images: int = DEFAULT_PROBE_IMAGES,
                  quantization: QuantizationConfig | None = None) -> BitAllocation:
    """Bits per activation, between `min_bits` and `max_bits`, whose mean per neuron is at most `budget`.

    `calib_loader` calibrates every candidate QANN (as `quantize` does, with the threshold settings of
    `quantization`, whose bits the candidates replace);
    its first `probe_images` images measure the sensitivities. `pinned` fixes some activations' bits
    (activation names, 'first', 'last'; see `ann2snn.compiler.qbits`); they count in the mean."""
    check_qbits(min_bits)
    check_qbits(max_bits)
    if min_bits > max_bits:
        raise ValueError(f"min_bits ({min_bits}) is above max_bits ({max_bits})")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1 <= budget <= 8:
        raise ValueError(f"the bit budget must be a number of bits per neuron in [1, 8], got {budget!r}")
    if probe_images < 1:
        raise ValueError(f"probe_images must be positive, got {probe_images}")
    pinned = dict(pinned or {})
    if DEFAULT_KEY in pinned:
        raise ValueError("a bit budget allocates every activation that is not pinned: drop the 'default' entry")
    batches = list(model_inputs(calib_loader, device_of(model)))
    if not batches:
        raise ValueError("the calibration loader yielded no batches")
    quantization = quantization or QuantizationConfig()
    candidates = range(min_bits, max_bits + 1)
    qanns = {bits: quantize(model, batches, dataclasses.replace(quantization, qbits=bits)) for bits in candidates}
    probe_qann = copy.deepcopy(qanns[max_bits])
    pinned_bits = assigned_bits(probe_qann, pinned) if pinned else {}
    probe = _probe(batches, probe_images)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        targets = [F.log_softmax(reference(x), -1) for x in probe]
    neurons = _neurons_per_image(probe_qann, probe[0])

    kl_sums: dict[str, dict[int, float]] = {}
    baseline = _kl_sum(probe_qann, probe, targets)
    for name in quantizer_bits(probe_qann):
        if name in pinned_bits:
            continue
        kept = probe_qann.get_submodule(name)
        kl_sums[name] = {max_bits: baseline}
        for bits in itertools.islice(candidates, len(candidates) - 1):
            probe_qann.add_submodule(name, qanns[bits].get_submodule(name))
            kl_sums[name][bits] = _kl_sum(probe_qann, probe, targets)
        probe_qann.add_submodule(name, kept)
    # Under torchrun every process probed its own shard: all choose from the sensitivities of all.
    kl_sums, baseline, images = reduce_over_processes((kl_sums, baseline, sum(x.shape[0] for x in probe)), "sum")
    sensitivity = {name: {bits: kl / images for bits, kl in by_bits.items()} for name, by_bits in kl_sums.items()}
    bits = _greedy(sensitivity, neurons, pinned_bits, float(budget), min_bits, max_bits)
    return BitAllocation(bits=bits, budget=float(budget), neurons=neurons, pinned=pinned_bits,
                         sensitivity=sensitivity, baseline_kl=baseline / images, probe_images=images)
