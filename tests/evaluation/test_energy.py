from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ann2snn
from ann2snn.evaluation.energy import (
    DEFAULT_ENERGY_PRESET,
    ENERGY_PRESETS,
    HOROWITZ_DRAM_PJ,
    HOROWITZ_SRAM,
    KIB,
    MIB,
    EnergyPreset,
    LayerTraffic,
    NetworkTraffic,
    NeuronTraffic,
    check_energy_preset,
    layer_traffic,
    memory_energy,
)
from ann2snn.evaluation.report import REPORT_JSON, REPORT_MD, markdown, summary, write_report
from ann2snn.evaluation.synops import COUNTS, LayerSize, SynapticOperationCounter

FP32 = ENERGY_PRESETS["fp32-45nm"]


def counted(counter: SynapticOperationCounter, name: str) -> dict[str, list[float]]:
    return {quantity: counter.counts[name][row].tolist() for row, quantity in enumerate(COUNTS)}


def ones_conv() -> nn.Conv2d:
    # 1 -> 2 channels, 3x3, padding 1, on a 3x3 map: a corner feeds 4 positions x 2 channels, an edge 6 x 2, the
    # centre 9 x 2; every weight is a synapse.
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    return conv


def test_conv_spike_traffic_counted_by_hand() -> None:
    conv = ones_conv()
    window = [0, 1]
    step0 = torch.zeros(1, 1, 3, 3)
    step0[0, 0, 0, 0], step0[0, 0, 1, 1] = 1.0, 2.0   # a spike in a corner, a burst of two in the centre
    step1 = torch.zeros(1, 1, 3, 3)
    step1[0, 0, 0, 1] = 1.0                            # a spike on an edge
    with SynapticOperationCounter(nn.Sequential(conv), event_driven=True, steps=2,
                                  window=lambda: tuple(window)) as counter:
        conv(step0)
        window[:] = [1, 1]
        conv(step1)
    assert counter.sizes["0"] == LayerSize(input_entries=9, stored_weights=18, synapses=18)
    assert counted(counter, "0") == {
        "accumulates": [1 * 8 + 2 * 18, 12],
        "multiply_accumulates": [0, 0],
        "spike_reads": [2, 1],
        # step 0 needs 8 + 18 = 26 fetches, more than the 18 weights: they are read once; step 1 fetches 12
        "weight_reads": [18, 12],
        "value_reads": [0, 0],
    }


def test_conv_dense_pass_reads_every_entry_and_each_weight_once() -> None:
    conv = ones_conv()
    with SynapticOperationCounter(nn.Sequential(conv), event_driven=False) as counter:
        conv(torch.zeros(2, 1, 3, 3))   # two images: an ANN reads every entry, zero or not
    assert counted(counter, "0") == {"accumulates": [0], "multiply_accumulates": [2 * (4 * 8 + 4 * 12 + 18)],
                                     "spike_reads": [0], "value_reads": [2 * 9], "weight_reads": [2 * 18]}


def test_linear_graded_and_spike_rows_counted_by_hand() -> None:
    linear = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        linear.weight[:, 0] = 0.0   # 9 synapses of 12 stored weights; input 0 reaches nobody
    window = [0, 2]
    rows = torch.tensor([[0.5, 1.25, 0.0, 0.0],   # step 0: graded values, two entries to read, 3 fetches
                         [1.0, 1.0, 1.0, 1.0]])   # step 1: four spikes, 9 fetches
    with SynapticOperationCounter(nn.Sequential(linear), event_driven=True, steps=2,
                                  window=lambda: tuple(window)) as counter:
        linear(rows)
    assert counter.sizes["0"] == LayerSize(input_entries=4, stored_weights=12, synapses=9)
    assert counted(counter, "0") == {"accumulates": [0, 9], "multiply_accumulates": [3, 0], "spike_reads": [0, 4],
                                     "value_reads": [2, 0], "weight_reads": [3, 9]}


def test_the_same_work_costs_the_same_in_the_ann_and_the_snn() -> None:
    """An SNN step on analog values does what an ANN pass does: both counters count it, and it is priced, alike."""
    linear = nn.Linear(6, 5)
    x = torch.rand(3, 6) + 0.1   # no zeros, no integers
    traffic = {}
    for event_driven in (False, True):
        with SynapticOperationCounter(nn.Sequential(linear), event_driven=event_driven) as counter:
            linear(x)
        traffic[event_driven] = NetworkTraffic(layer_traffic(counter.counts, counter.sizes, images=3), [])
    assert traffic[True] == traffic[False]
    priced = memory_energy(DEFAULT_ENERGY_PRESET, traffic[False], {1: traffic[True]})
    assert priced["ann_over_snn"] == {"1": 1.0}


def test_word_cost_at_horowitz_s_sizes_between_and_beyond() -> None:
    for size, picojoules in HOROWITZ_SRAM:
        assert FP32.word_pj(size) == pytest.approx(picojoules)
    # between 8 and 32 KiB the cost grows as the square root of the size (10 -> 20 pJ over 4x)
    assert FP32.word_pj(16 * KIB) == pytest.approx(10 * math.sqrt(2))
    assert FP32.word_pj(2 * KIB) == pytest.approx(10 / 2)
    assert FP32.word_pj(MIB + 1) == HOROWITZ_DRAM_PJ
    # an access of b bits costs b / 64 of a 64-bit one
    assert FP32.access_pj(2048, 32) == pytest.approx(10 / 2)   # 8 KiB of 32-bit weights
    assert FP32.access_pj(8192, 8) == pytest.approx(10 / 8)


@pytest.mark.parametrize("name", list(ENERGY_PRESETS))
def test_memory_cost_is_monotone_in_size(name: str) -> None:
    preset = ENERGY_PRESETS[name]
    sizes = [2 ** (exponent / 4) for exponent in range(0, 4 * 32)]
    costs = [preset.word_pj(size) for size in sizes]
    assert all(low <= high for low, high in zip(costs, costs[1:]))
    assert costs[0] < costs[-1]


def test_preset_registry_round_trip() -> None:
    assert DEFAULT_ENERGY_PRESET in ENERGY_PRESETS
    for name, preset in ENERGY_PRESETS.items():
        assert check_energy_preset(name) is preset
        record = json.loads(json.dumps(preset.to_dict()))
        assert EnergyPreset.from_dict(record) == preset
    with pytest.raises(ValueError, match="unknown energy preset 'tpu'; choose one of .*fp32-45nm"):
        check_energy_preset("tpu")


def test_energy_terms_priced_by_hand() -> None:
    """fp32: 2048 weights are 8 KiB (10 pJ per 64 bits), 8192 spike events of 16 bits 16 KiB (10 sqrt 2 pJ),
    8192 values of 32 bits 32 KiB (20 pJ), 256 membranes of 32 bits 1 KiB (10 / sqrt 8 pJ)."""
    layer = LayerTraffic("conv", LayerSize(input_entries=8192, stored_weights=2048, synapses=2000),
                         {"accumulates": 1000.0, "multiply_accumulates": 100.0, "spike_reads": 50.0,
                          "value_reads": 10.0, "weight_reads": 300.0})
    neurons = NeuronTraffic("spikes", neurons=256, steps=4, spikes=100.0)
    section = memory_energy("fp32-45nm", NetworkTraffic([layer], []), {4: NetworkTraffic([layer], [neurons])})
    synaptic, spiking = section["per_layer"]["snn"]
    assert synaptic["weights_uj"] * 1e6 == pytest.approx(300 * 10 / 2)
    assert synaptic["activations_uj"] * 1e6 == pytest.approx(2 * (50 * 10 * math.sqrt(2) / 4 + 10 * 20 / 2))
    assert synaptic["operations_uj"] * 1e6 == pytest.approx(100 * 4.6 + 1000 * 0.9)
    assert synaptic["operation_only_uj"] * 1e6 == pytest.approx(100 * 4.6 + 1000 * 0.9)
    assert spiking["membranes_uj"] * 1e6 == pytest.approx(2 * 256 * 4 * 10 / math.sqrt(8) / 2)
    assert spiking["operations_uj"] * 1e6 == pytest.approx((256 * 4 + 100) * 0.9)
    assert section["terms"]["snn"]["4"]["total_uj"] == pytest.approx(
        synaptic["total_uj"] + spiking["total_uj"])
    assert section["ann_over_snn"]["4"] == pytest.approx(synaptic["total_uj"] / section["snn_uj_per_image"]["4"])


def tiny_evaluation(energy_preset: str = DEFAULT_ENERGY_PRESET) -> dict:
    torch.manual_seed(0)   # the same network and data at every call
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(),
                          nn.Linear(5, 3)).eval()
    inputs = torch.randn(16, 3, 4, 4)
    data = TensorDataset(inputs, model(inputs).argmax(-1).detach())
    snn = ann2snn.convert(model, DataLoader(data, batch_size=8), T=4)
    report = ann2snn.evaluate(snn, DataLoader(data, batch_size=8), [2, 4], ann=model, energy_preset=energy_preset)
    return {**report.to_json(), "model": {"checkpoint": None, "arch": "tiny_cnn", "arch_kwargs": {},
                                          "arch_source": "argument"}}


def test_per_layer_figures_add_up_to_both_models_totals() -> None:
    document = tiny_evaluation()
    energy, memory = document["energy"], document["energy_memory"]
    ann_rows, snn_rows = memory["per_layer"]["ann"], memory["per_layer"]["snn"]
    assert [row["name"] for row in ann_rows] == ["0", "3", "5"]
    assert {row["kind"] for row in snn_rows} == {"synaptic", "neurons"}
    assert [row["name"] for row in snn_rows if row["kind"] == "neurons"] == \
        [layer["name"] for layer in document["spikes"]["per_layer"]]
    # the operation-only model, per layer, adds up to the totals it always reported
    assert sum(row["operation_only_uj"] for row in ann_rows) == pytest.approx(energy["ann_uj_per_image"])
    assert sum(row["operation_only_uj"] for row in snn_rows) == pytest.approx(energy["snn_uj_per_image"]["4"])
    assert sum(row["total_uj"] for row in ann_rows) == pytest.approx(memory["ann_uj_per_image"])
    assert sum(row["total_uj"] for row in snn_rows) == pytest.approx(memory["snn_uj_per_image"]["4"])
    # every neuron's membrane is read and written at every step
    for row in snn_rows:
        if row["kind"] == "neurons":
            assert row["steps"] == 4
            per_access = FP32.access_pj(row["neurons"], 32)
            assert row["membranes_uj"] * 1e6 == pytest.approx(2 * row["neurons"] * 4 * per_access)
    assert set(memory["terms"]["snn"]) == {"2", "4"}
    membranes = {T: terms["membranes_uj"] for T, terms in memory["terms"]["snn"].items()}
    assert membranes["2"] == pytest.approx(membranes["4"] / 2)


def test_the_preset_chosen_prices_the_report() -> None:
    fp32, int8 = tiny_evaluation("fp32-45nm"), tiny_evaluation("int8-45nm")
    assert int8["energy_memory"]["preset"] == "int8-45nm"
    assert int8["energy_memory"]["constants"] == ENERGY_PRESETS["int8-45nm"].to_dict()
    assert int8["energy_memory"]["ann_uj_per_image"] < fp32["energy_memory"]["ann_uj_per_image"]
    assert int8["energy"] == fp32["energy"], "the operation-only figures do not depend on the preset"
    with pytest.raises(ValueError, match="unknown energy preset"):
        tiny_evaluation("tpu")


def test_report_files_hold_both_models_per_layer_and_in_total(tmp_path: Path) -> None:
    document = tiny_evaluation()
    write_report(document, tmp_path)
    written = json.loads((tmp_path / REPORT_JSON).read_text())
    memory = written["energy_memory"]
    assert memory["preset"] == DEFAULT_ENERGY_PRESET and memory["ann_uj_per_image"] > 0
    assert set(memory["snn_uj_per_image"]) == {"2", "4"} and set(memory["ann_over_snn"]) == {"2", "4"}
    assert written["energy"]["ann_uj_per_image"] == document["energy"]["ann_uj_per_image"]

    text = (tmp_path / REPORT_MD).read_text()
    assert text == markdown(document)
    assert "## Memory-aware energy per image" in text
    assert "### ANN per layer" in text and "### SNN per layer at T = 4" in text
    assert "preset `fp32-45nm`" in text and "Horowitz" in text and "Lemaire" in text
    ann_total = f"{memory['ann_uj_per_image']:.3g} µJ"
    assert any(line.startswith("| ANN | – |") and ann_total in line for line in text.splitlines())
    for row in memory["per_layer"]["snn"]:
        assert any(line.startswith(f"| {row['name']} |") and f"{row['total_uj']:.3g} µJ" in line
                   for line in text.splitlines()), row["name"]
    ratio = memory["ann_over_snn"]["4"]
    assert f"Memory-aware energy (fp32-45nm): ANN {ann_total}, SNN {memory['snn_uj_per_image']['4']:.3g} µJ at T = 4" \
        in summary(document)
    assert f"(ANN/SNN {ratio:.2f})" in summary(document)


def test_reports_written_before_the_memory_model_still_render() -> None:
    document = tiny_evaluation()
    del document["energy_memory"]
    assert "Memory-aware" not in markdown(document) and "Memory-aware" not in summary(document)
