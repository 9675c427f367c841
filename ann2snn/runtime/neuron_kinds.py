"""The neuron registry: every `neuron=` kind the compiler can emit, as one table entry (constructor, coding,
value of a spike, the options it takes). Adding a neuron model is one entry here."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ann2snn.runtime.coding import ACCUMULATE, RATE, Coding
from ann2snn.runtime.neurons import (
    DEFAULT_ADAPT_DECAY,
    DEFAULT_ADAPT_INCREASE,
    AdaptiveNeuron,
    IFNeuron,
    LIFNeuron,
    SignedNeuron,
    SpikingNeuron,
)


@dataclass(frozen=True)
class NeuronKind:
    """`build(theta, levels, max_spikes_per_step, options)` makes the neuron standing for a calibrated QCFS
    quantizer of threshold theta and L = levels, and `build_symmetric` (None: the kind cannot) one standing for a
    signed quantizer (levels -L to L); `spike_value(theta, levels)` is what one of its spikes is
    worth in the QANN's units; `options` names the keyword options `build` accepts (with their defaults);
    `readout_delay` is the fraction of T a rate-coded network of these neurons leaves out of its read-out by
    default (see `ann2snn.runtime.network.SpikingNetwork.readout_start`); `snn_calibration` the SNN calibration
    it gets by default (see `ann2snn.compiler.passes.calibrate_spiking.SPIKING_CALIBRATIONS`)."""

    name: str
    coding: Coding
    build: Callable[[torch.Tensor, int, int, Mapping[str, Any]], SpikingNeuron]
    spike_value: Callable[[torch.Tensor, int], torch.Tensor]
    options: Mapping[str, Any]
    description: str
    readout_delay: float = 0.0
    snn_calibration: str = "bias"
    build_symmetric: Callable[[torch.Tensor, int, int, Mapping[str, Any]], SpikingNeuron] | None = None


def _threshold(theta: torch.Tensor, levels: int) -> torch.Tensor:
    return theta


def _step(theta: torch.Tensor, levels: int) -> torch.Tensor:
    return theta / levels


# 0/1 neurons fire their first spikes late and unevenly: on the shared ResNet-20 (`if`, test-1000) the read-out
# over the second half gave 62.7 / 73.2 / 80.6 % at T = 8 / 16 / 32 against 57.2 / 68.8 / 75.8 % over every
# step (tools/ablation.py). lif and adaptive fire as if does. signed-rate neurons take back early spikes, so
# their early steps are worth reading: 78.2 / 81.1 % at T = 8 / 16 over every step, 71.9 / 78.5 % without
# the first half.
ZERO_ONE_READOUT_DELAY = 0.5
# The weight calibration models a neuron's read-out window as an integrate-and-fire neuron does it (exactly, while
# the membrane stays within 0 .. threshold); the other rate-coded kinds leak, adapt or take spikes back, and keep
# the bias calibration.
IF_CALIBRATION = "weights"


NEURON_KINDS: dict[str, NeuronKind] = {kind.name: kind for kind in (
    NeuronKind("if", RATE, lambda theta, levels, k, options: IFNeuron(theta, k, **options), _threshold, {},
               "integrate-and-fire, 0/1 spikes, threshold theta, reset by subtraction", ZERO_ONE_READOUT_DELAY,
               IF_CALIBRATION),
    NeuronKind("lif", RATE, lambda theta, levels, k, options: LIFNeuron(theta, max_spikes_per_step=k, **options),
               _threshold, {"decay": 0.95, "compensate_leak": True},
               "leaky integrate-and-fire with leak-compensating current", ZERO_ONE_READOUT_DELAY),
    NeuronKind("signed", ACCUMULATE,
               lambda theta, levels, k, options: SignedNeuron(theta / levels, levels, k, **options),
               _step, {}, "ternary spikes of theta/L, count kept in [0, L]: equals the QANN once settled",
               build_symmetric=lambda theta, levels, k, options: SignedNeuron(theta / levels, levels, k,
                                                                              symmetric=True, **options)),
    NeuronKind("signed-rate", RATE, lambda theta, levels, k, options: SignedNeuron(theta, None, k, **options),
               _threshold, {}, "ternary spikes of theta, rate-coded: takes back spikes fired too early",
               build_symmetric=lambda theta, levels, k, options: SignedNeuron(theta, None, k, symmetric=True,
                                                                              **options)),
    NeuronKind("adaptive", RATE, lambda theta, levels, k, options: AdaptiveNeuron(theta, k, **options), _threshold,
               {"adapt_increase": DEFAULT_ADAPT_INCREASE, "adapt_decay": DEFAULT_ADAPT_DECAY},
               "adaptive threshold: fewer, heavier spikes", ZERO_ONE_READOUT_DELAY),
)}


def neuron_kind(name: str) -> NeuronKind:
    try:
        return NEURON_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown neuron {name!r}; choose one of {tuple(NEURON_KINDS)}") from None


def symmetric_neuron_kinds() -> tuple[str, ...]:
    """The kinds that can stand for a signed quantizer."""
    return tuple(name for name, kind in NEURON_KINDS.items() if kind.build_symmetric is not None)
