"""A memory-aware energy model, beside the operation count of `ann2snn.evaluation.synops`.

The operation-only estimate (E_MAC x MACs + E_AC x ACs) leaves out what dominates on real hardware: moving
data. This model prices, per layer and per image, the operations and the memory accesses of the ANN and of the
SNN on one architecture and by one rule, after Lemaire et al., "An analytical estimation of spiking neural
networks energy efficiency" (ICONIP 2022; its terms are also those of SpikingJelly-based tools such as Qualia's
EnergyEstimationMetric): each layer has its own memories (a layer-per-core, spatial architecture), sized to what
they hold, and an access costs what a memory of that size costs.

What is counted (the counts come from `synops.SynapticOperationCounter`, per synaptic layer):

* weight reads: one read per stored weight per pass (an image for the ANN, a time step of an image for the
  SNN) -- the layer's weights streamed once and reused from registers across its outputs -- or, where a pass
  has fewer synaptic events than the layer has synapses, one read per synaptic event (an SNN fetches the fan-out
  of each spike). The ANN thus reads each weight once per image, the SNN up to once per step;
* input traffic: every input entry of a synaptic layer is written into the layer's input buffer and read out of
  it once per pass: every entry of the ANN's dense activations, only the events of the SNN (a spike is an
  address event of `spike_bits`; a graded or analog value, like the ANN's, of `activation_bits`);
* membrane state: every neuron's membrane potential is read and written once per time step (the step's input
  current added, the threshold compared), in a memory that holds the layer's membranes;
* operations: the synaptic MACs and ACs of `synops` at the preset's costs, and per neuron per step one
  accumulate (integrating and comparing) and per spike one more (the reset by subtraction).

Left out, for both networks alike: biases (one read per output per pass, fewer than the weight reads by the
fan-in), the ANN's activation function and the SNN's read-out accumulator (a compare or add per output), and
address computation. With `stop_when_quiet` the SNN is priced for all T steps.

The access cost of a memory is Horowitz's 45 nm SRAM figure per 64-bit access, interpolated between his
sizes on log-log axes (the cost grows about as the square root of the size, as the wires do) and extrapolated
below the smallest; a memory larger than the largest SRAM he quotes is DRAM. An access of b bits costs b / 64 of a
64-bit one (words packed). Presets fix the costs and the bit widths: `ENERGY_PRESETS`; a new preset is one entry.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ann2snn.evaluation.synops import COUNTS, PICOJOULES_PER_MICROJOULE, Counts, LayerSize, operation_energy_pj

KIB = 1024
MIB = 1024 * KIB
WORD_BITS = 64

HOROWITZ = ('M. Horowitz, "Computing\'s energy problem (and what we can do about it)", ISSCC 2014, 45 nm at '
            "0.9 V: fp32 add 0.9 / multiply 3.7 pJ, fp16 add 0.4 / multiply 1.1 pJ, int8 add 0.03 / multiply 0.2 "
            "pJ, int32 add 0.1 / multiply 3.1 pJ; 64-bit SRAM access 10 pJ (8 KB), 20 pJ (32 KB), 100 pJ (1 MB), "
            "DRAM 1.3-2.6 nJ")
LEMAIRE = ('E. Lemaire et al., "An analytical estimation of spiking neural networks energy efficiency", ICONIP '
           "2022: weights fetched per spike event, membrane potentials read and written per neuron, per-layer "
           "memories whose access cost grows with their size")
# Horowitz's SRAM figures: (memory size in bytes, pJ per 64-bit access).
HOROWITZ_SRAM = ((8 * KIB, 10.0), (32 * KIB, 20.0), (MIB, 100.0))
# The lower end of his 1.3-2.6 nJ: the model then flatters neither network when a layer's weights leave SRAM.
HOROWITZ_DRAM_PJ = 1300.0
# An address event: up to 2**14 neurons per layer and the burst count (signed, bursts of up to 2 spikes).
ADDRESS_EVENT_BITS = 16


@dataclass(frozen=True)
class EnergyPreset:
    """The costs and widths the model prices with: pJ per multiply-accumulate (`e_mac_pj`, the ANN's and the
    SNN's analog inputs) and per accumulate (`e_ac_pj`, a spike into a membrane, a neuron update), the bits of a
    weight, of an activation value, of a spike event and of a membrane potential, and the memory figures."""

    description: str
    e_mac_pj: float
    e_ac_pj: float
    weight_bits: int
    activation_bits: int
    spike_bits: int
    membrane_bits: int
    sources: str
    sram_pj_per_word: tuple[tuple[int, float], ...] = HOROWITZ_SRAM
    dram_pj_per_word: float = HOROWITZ_DRAM_PJ

    @property
    def largest_sram_bytes(self) -> int:
        return self.sram_pj_per_word[-1][0]

    def word_pj(self, memory_bytes: float) -> float:
        """pJ per 64-bit access to a memory of `memory_bytes`: the SRAM figures interpolated on log-log axes
        (extrapolated by the nearest segment below the smallest), DRAM above the largest."""
        if memory_bytes > self.largest_sram_bytes:
            return self.dram_pj_per_word
        points = self.sram_pj_per_word
        segment = next((index for index in range(len(points) - 2) if memory_bytes <= points[index + 1][0]),
                       len(points) - 2)
        (low_size, low_pj), (high_size, high_pj) = points[segment], points[segment + 1]
        exponent = math.log(high_pj / low_pj) / math.log(high_size / low_size)
        return low_pj * (max(memory_bytes, 1.0) / low_size) ** exponent

    def access_pj(self, entries: int, bits: int) -> float:
        """pJ per access of one `bits`-wide entry in a memory holding `entries` of them."""
        return self.word_pj(entries * bits / 8) * bits / WORD_BITS

    def to_dict(self) -> dict[str, Any]:
        """The constants as report.json's "energy_memory" section records them."""
        record = asdict(self)
        record["sram_pj_per_word"] = [{"bytes": size, "pj_per_64_bits": pj} for size, pj in self.sram_pj_per_word]
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EnergyPreset:
        """The preset a report recorded, to price other counts on the same terms."""
        sram = tuple((point["bytes"], point["pj_per_64_bits"]) for point in record["sram_pj_per_word"])
        return cls(**{**record, "sram_pj_per_word": sram})


ENERGY_PRESETS: dict[str, EnergyPreset] = {
    "fp32-45nm": EnergyPreset(
        description="45 nm, 32-bit floating point weights, activations and membranes",
        e_mac_pj=4.6, e_ac_pj=0.9, weight_bits=32, activation_bits=32, spike_bits=ADDRESS_EVENT_BITS,
        membrane_bits=32, sources=f"{HOROWITZ} (MAC = multiply + add); {LEMAIRE}"),
    "fp16-45nm": EnergyPreset(
        description="45 nm, 16-bit floating point weights, activations and membranes",
        e_mac_pj=1.5, e_ac_pj=0.4, weight_bits=16, activation_bits=16, spike_bits=ADDRESS_EVENT_BITS,
        membrane_bits=16, sources=f"{HOROWITZ} (MAC = multiply + add); {LEMAIRE}"),
    "int8-45nm": EnergyPreset(
        description="45 nm, 8-bit integer weights and activations, 16-bit integer membranes: the ANN multiplies "
                    "8-bit values into 32-bit sums, the SNN's spikes add integer weights into its membranes",
        e_mac_pj=0.3, e_ac_pj=0.1, weight_bits=8, activation_bits=8, spike_bits=ADDRESS_EVENT_BITS,
        membrane_bits=16, sources=f"{HOROWITZ} (MAC = int8 multiply + int32 add; AC = int32 add, an upper bound "
                                  f"of the 16-bit add he does not list); {LEMAIRE}"),
}
DEFAULT_ENERGY_PRESET = "fp32-45nm"
TERMS = ("weights", "activations", "membranes", "operations")
MODEL = ("Per layer, with one memory per layer sized to what it holds: weight reads (once per weight per pass, an "
         "image for the ANN, a step for the SNN, or once per synaptic event where a pass has fewer), every input "
         "entry (ANN) or event (SNN) written into and read from the layer's input buffer, every membrane read and "
         "written once per step, MACs and ACs at the preset's costs plus one accumulate per neuron per step and "
         "per spike. Access cost: Horowitz's 64-bit SRAM figures interpolated on log-log axes by memory size, "
         "DRAM above the largest, scaled by bits / 64. Biases, activation functions and address computation are "
         "left out for both networks.")


def check_energy_preset(name: str) -> EnergyPreset:
    if name not in ENERGY_PRESETS:
        raise ValueError(f"unknown energy preset {name!r}; choose one of {tuple(ENERGY_PRESETS)}")
    return ENERGY_PRESETS[name]


@dataclass(frozen=True)
class LayerTraffic:
    """A synaptic layer's work per image: its size and each quantity of `synops.COUNTS`."""

    name: str
    size: LayerSize
    counts: dict[str, float]


@dataclass(frozen=True)
class NeuronTraffic:
    """A spiking layer's work per image: `neurons` updated at each of `steps` steps, firing `spikes`."""

    name: str
    neurons: int
    steps: int
    spikes: float


@dataclass(frozen=True)
class NetworkTraffic:
    """What one network does per image (the ANN has no spiking layers)."""

    synaptic: list[LayerTraffic]
    neurons: list[NeuronTraffic]


def layer_traffic(counts: Counts, sizes: Mapping[str, LayerSize], images: int, steps: int = 1,
                  runs: int = 1) -> list[LayerTraffic]:
    """Per-image traffic of a counter's layers over its first `steps` time steps, counted `runs` times (the
    SNN's static prefix, counted once, runs at every step of a rate-coded network)."""
    return [LayerTraffic(name, sizes[name], {quantity: float(per_step[row, :steps].sum()) * runs / images
                                             for row, quantity in enumerate(COUNTS)})
            for name, per_step in counts.items()]


def _synaptic_terms(preset: EnergyPreset, layer: LayerTraffic) -> dict[str, float]:
    counts, size = layer.counts, layer.size
    # each input entry is written into the layer's input buffer and read out of it
    inputs = 2 * (counts["spike_reads"] * preset.access_pj(size.input_entries, preset.spike_bits)
                  + counts["value_reads"] * preset.access_pj(size.input_entries, preset.activation_bits))
    return {"weights": counts["weight_reads"] * preset.access_pj(size.stored_weights, preset.weight_bits),
            "activations": inputs, "membranes": 0.0,
            "operations": counts["multiply_accumulates"] * preset.e_mac_pj + counts["accumulates"] * preset.e_ac_pj}


def _neuron_terms(preset: EnergyPreset, layer: NeuronTraffic) -> dict[str, float]:
    updates = layer.neurons * layer.steps
    return {"weights": 0.0, "activations": 0.0,
            "membranes": 2 * updates * preset.access_pj(layer.neurons, preset.membrane_bits),
            "operations": (updates + layer.spikes) * preset.e_ac_pj}


def _microjoules(picojoules: Mapping[str, float]) -> dict[str, float]:
    return {f"{term}_uj": value / PICOJOULES_PER_MICROJOULE for term, value in picojoules.items()}


def _rows(preset: EnergyPreset, network: NetworkTraffic) -> list[dict[str, Any]]:
    """Per layer: what it does, the operation-only energy of `synops` and the memory-aware terms, in µJ."""
    rows = []
    for layer in network.synaptic:
        terms = _synaptic_terms(preset, layer)
        operation_only = operation_energy_pj(layer.counts["multiply_accumulates"], layer.counts["accumulates"])
        rows.append({"name": layer.name, "kind": "synaptic", **asdict(layer.size), **layer.counts,
                     **_microjoules({"operation_only": operation_only, **terms, "total": sum(terms.values())})})
    for layer in network.neurons:
        terms = _neuron_terms(preset, layer)
        rows.append({"name": layer.name, "kind": "neurons", "neurons": layer.neurons, "steps": layer.steps,
                     "spikes": layer.spikes,
                     **_microjoules({"operation_only": 0.0, **terms, "total": sum(terms.values())})})
    return rows


def _terms(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    rows = list(rows)
    totals = {f"{term}_uj": sum(row[f"{term}_uj"] for row in rows) for term in TERMS}
    return {**totals, "total_uj": sum(totals.values())}


def memory_energy(preset_name: str, ann: NetworkTraffic | None, snn: Mapping[int, NetworkTraffic]) -> dict[str, Any]:
    """The report.json section "energy_memory": the ANN's and the SNN's (at each T) energy per image by term, the
    ratio, the per-layer breakdown (the SNN's at the largest T) and the assumptions it rests on."""
    preset = check_energy_preset(preset_name)
    ann_rows = _rows(preset, ann) if ann is not None else None
    snn_rows = {T: _rows(preset, traffic) for T, traffic in sorted(snn.items())}
    ann_terms = _terms(ann_rows) if ann_rows is not None else None
    snn_terms = {str(T): _terms(rows) for T, rows in snn_rows.items()}
    T_max = max(snn_rows) if snn_rows else None
    return {
        "preset": preset_name,
        "constants": preset.to_dict(),
        "model": MODEL,
        "ann_uj_per_image": ann_terms["total_uj"] if ann_terms is not None else None,
        "snn_uj_per_image": {T: terms["total_uj"] for T, terms in snn_terms.items()},
        "ann_over_snn": ({T: ann_terms["total_uj"] / terms["total_uj"] for T, terms in snn_terms.items()
                          if terms["total_uj"]} if ann_terms is not None else None),
        "terms": {"ann": ann_terms, "snn": snn_terms},
        "per_layer": {"T": T_max, "ann": ann_rows, "snn": snn_rows[T_max] if T_max is not None else []},
    }

