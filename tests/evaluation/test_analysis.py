"""Activation-rate analysis: per layer, the ANN activation against the SNN's decoded rate, and the error split
into clipping, quantization and spiking; checked where the answer is known."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.evaluation.analysis import ANALYSIS_JSON, analysis_summary, analyze, error_sources_figure, write_analysis
from ann2snn.runtime import network
from tests.helpers import digits_args, digits_checkpoint, randomize_bn, run_cli
from tests.networks import ResidualNet, cnn


def build() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(cnn(3, [8, 8], 8 * 4 * 4, 10, pool=nn.AvgPool2d(2))).eval()


def batches(count: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=generator) for _ in range(count)]


def test_settled_signed_neurons_leave_only_clipping_and_quantization_error() -> None:
    snn = ann2snn.convert(build(), batches(), qbits=3, T=256, neuron="signed", threshold_rule="max")
    analysis = analyze(snn, batches(), [256])  # the calibration data: nothing lies above the max rule's theta
    assert [layer.name for layer in analysis.layers] == list(snn.neurons)
    for layer in analysis.layers:
        assert layer.bits == 3 and layer.clipping_error == 0.0  # max rule: nothing above theta on its own data
        assert layer.snn_error[256] < 1e-6, layer
        assert layer.quantization_error > 0.01
        assert layer.total_error[256] == pytest.approx(layer.quantization_error, rel=1e-4)
        assert layer.correlation[256] > 0.95


def test_rate_coded_error_falls_with_T_and_clipping_is_measured() -> None:
    snn = ann2snn.convert(build(), batches(), qbits=4, T=128, neuron="if", threshold_rule="percentile",
                          percentile=95.0)
    analysis = analyze(snn, batches(1, seed=5), [8, 128])
    first = analysis.layers[0]
    assert first.clipped_fraction > 0.01 and first.clipping_error > 0
    assert first.snn_error[128] < 0.5 * first.snn_error[8]
    assert first.correlation[128] > first.correlation[8]
    assert len(first.scatter["ann"]) == len(first.scatter["snn"]) > 0


def test_layers_after_a_balanced_add_in_sub_batched_simulations(monkeypatch) -> None:
    # a working set of one row: the simulator would split every batch into single samples
    monkeypatch.setattr(network, "WORKING_SET_BYTES", 1)
    torch.manual_seed(0)
    model = ResidualNet(batchnorm=False, pool=False, classes=10).eval()
    snn = ann2snn.convert(model, batches(), qbits=3, T=256, neuron="signed-rate", threshold_rule="max")
    add_neuron = snn.neurons["relu_1"]
    assert not torch.equal(add_neuron.v_threshold, snn.qann.get_submodule("relu_1").theta)
    analysis = analyze(snn, batches(), [256])
    # rate-coded signed neurons track the clipped activation (not its quantized level)
    for layer in analysis.layers:
        assert layer.clipped_error[256] < 0.05, layer
        assert layer.correlation[256] > 0.99, layer


def test_written_files(tmp_path: Path) -> None:
    snn = ann2snn.convert(build(), batches(), qbits=2, T=16, neuron="signed-rate")
    paths = write_analysis(analyze(snn, batches(1), [4, 16]), tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {path.name for path in paths}
    document = json.loads((tmp_path / ANALYSIS_JSON).read_text())
    assert document["format"] == "ann2snn-analysis" and document["T_list"] == [4, 16]
    assert set(document["layers"][0]["snn_error"]) == {"4", "16"}


@pytest.mark.parametrize("neuron, reference, error, quantization_bar", [
    ("if", "clipped ANN |c - s_T|", "clipped_error", False),
    ("signed", "QANN |q - s_T|", "snn_error", True),
])
def test_error_sources_measure_the_spiking_error_against_what_the_coding_approaches(
        neuron: str, reference: str, error: str, quantization_bar: bool) -> None:
    # reported: error_sources.png showed rate-coded neurons' error against the QANN, which they do not track
    snn = ann2snn.convert(build(), batches(), qbits=3, T=16, neuron=neuron)
    analysis = analyze(snn, batches(1), [16])
    axes = error_sources_figure(analysis).axes[0]
    bars = {container.get_label(): [bar.get_height() for bar in container] for container in axes.containers}
    expected = [getattr(layer, error)[16] for layer in analysis.layers]
    assert bars[f"SNN vs {reference}, T = 16"] == pytest.approx(expected)
    assert ("quantization |c - q|" in bars) == quantization_bar
    assert f"{neuron} neurons, 3-bit" in axes.get_title() and reference.split(" |")[0] in axes.get_title()
    assert f"SNN err: against the {reference.split(' |')[0]}" in analysis_summary(analysis).splitlines()[1]


def test_bad_arguments() -> None:
    snn = ann2snn.convert(build(), batches(), qbits=2, T=16)
    with pytest.raises(ValueError, match="T_list is empty"):
        analyze(snn, batches(1), [])
    with pytest.raises(ValueError, match="scatter_T=5 is not one of the analysed T"):
        analyze(snn, batches(1), [4, 16], scatter_T=5)
    with pytest.raises(ValueError, match="yielded no batches"):
        analyze(snn, [], [16])


def test_command_line(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    args = digits_args(checkpoint, "--out", tmp_path / "analysis")
    args[0] = "analyze"
    args[args.index("--calib") + 1:args.index("--calib") + 1] = []
    code, out, err = run_cli(capsys, *[arg if arg != "--eval" else "--data" for arg in args])
    assert code == 0, err
    assert (tmp_path / "analysis" / ANALYSIS_JSON).is_file()
    assert "Quant err" in out and all(name in out for name in ("2", "5", "9"))
