"""mark_streams (with quantize_streams): the linear values weighted layers read get signed quantizers, whose SNN
is spike-driven in every synaptic layer after the first and equals the QANN with signed neurons."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.cli.arguments import UsageError, conversion_settings
from ann2snn.cli.main import build_parser
from ann2snn.compiler.convert import prepare_pipeline
from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer
from ann2snn.config import ConversionConfig
from ann2snn.errors import ConversionError
from ann2snn.evaluation.synops import COUNTS, SynapticOperationCounter
from ann2snn.runtime.layers import TemporalModule
from tests.helpers import randomize_bn
from tests.networks import ResidualNet


class InvertedResiduals(nn.Module):
    """MobileNetV2's pattern on 3x8x8 inputs, with the model normalising its own input: a stem, a linear
    bottleneck (no ReLU after its projection), a residual block adding onto it, a 1x1 head and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.expand = nn.Sequential(nn.Conv2d(4, 12, 1), nn.BatchNorm2d(12), nn.ReLU6(),
                                    nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU6(),
                                    nn.Conv2d(12, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem((x - 0.5) / 0.25)
        bottleneck = self.project(x)
        stream = bottleneck + self.expand(bottleneck)
        return self.fc(F.adaptive_avg_pool2d(self.head(stream), 1).flatten(1))


def _network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = InvertedResiduals()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return randomize_bn(model).eval()


def _marks(gm: torch.fx.GraphModule) -> dict[str, str]:
    """mark name -> the node it reads."""
    return {node.target: node.args[0].name for node in gm.graph.nodes if node.op == "call_module"
            and isinstance(gm.get_submodule(node.target), ClippedReLU) and gm.get_submodule(node.target).signed}


def test_the_bottleneck_and_the_residual_sum_are_marked_and_nothing_else() -> None:
    marked = prepare_pipeline(quantize_streams=True).run(_network())
    # the projection (its BatchNorm folded into it) and the residual sum; not the normalised input, which
    # only the first convolution reads, nor the expansion's output, which only the addition reads
    assert _marks(marked) == {"project.1_stream": "project_0", "add_stream": "add"}
    assert _marks(prepare_pipeline().run(_network())) == {}


def test_networks_whose_weighted_layers_read_activations_get_no_mark() -> None:
    assert _marks(prepare_pipeline(quantize_streams=True).run(ResidualNet().eval())) == {}


def test_the_fine_tuning_graph_names_the_marks_as_the_conversion_graph_does() -> None:
    kept = prepare_pipeline(fold_batchnorm=False, check_supported=False, quantize_streams=True).run(_network())
    folded = prepare_pipeline(quantize_streams=True).run(_network())
    assert set(_marks(kept)) == set(_marks(folded))


def test_a_signed_quantizer_is_symmetric_and_calibrated_on_magnitudes() -> None:
    quantizer = QCFSQuantizer(3, signed=True)
    quantizer.set_threshold(torch.tensor(3.0), 4)
    x = torch.tensor([-5.0, -2.6, -2.4, -0.4, 0.4, 0.6, 2.6, 5.0])
    assert quantizer.quantized_level(x).tolist() == [-3, -3, -2, 0, 0, 1, 3, 3]
    assert quantizer.float_activation()(x).equal(x)
    thetas = []
    for sign in (1.0, -1.0):
        torch.manual_seed(0)
        calibrated = ann2snn.quantize(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 2, 1)).eval(),
                                      [sign * torch.rand(64, 3, 4, 4)], qbits=3, quantize_streams=True)
        (theta,) = [q.theta for q in calibrated.modules() if isinstance(q, QCFSQuantizer)]
        thetas.append(theta)
    # a conv of -x is minus the conv of x (no bias): the same magnitudes, the same threshold
    assert torch.equal(thetas[0], thetas[1])


def test_the_snn_equals_the_qann_with_negative_counts() -> None:
    model = _network().double()
    calibration = [torch.rand(16, 3, 8, 8, dtype=torch.float64)]
    snn = ann2snn.convert(model, calibration, qbits=3, T=512, neuron="signed", max_spikes_per_step=2,
                          quantize_streams=True)
    x = torch.rand(8, 3, 8, 8, dtype=torch.float64)
    levels = {}
    hooks = [q.register_forward_hook(lambda q, inputs, _, name=name: levels.__setitem__(name, q.quantized_level(
        inputs[0]))) for name, q in snn.qann.named_modules() if isinstance(q, QCFSQuantizer)]
    expected = snn.qann(x)
    for hook in hooks:
        hook.remove()
    result = snn.simulate(x, [512], stop_when_quiet=True)
    assert int(result.steps_used.max()) < 512
    for name in ("project.1_stream", "add_stream"):
        assert snn.neurons[name].lowest == -7
        assert (levels[name] < 0).any(), f"{name}: no negative level to check"
        assert torch.equal(snn.neurons[name].count, levels[name])
    assert (result.outputs[512] - expected).norm() / expected.norm() < 1e-12


def test_every_synaptic_layer_after_the_first_is_spike_driven() -> None:
    x = torch.rand(4, 3, 8, 8)
    counted = {}
    for streams in (False, True):
        snn = ann2snn.convert(_network(), [torch.rand(16, 3, 8, 8)], qbits=3, T=8, neuron="signed",
                              max_spikes_per_step=7, quantize_streams=streams)
        clock = next(module for module in snn.body.modules() if isinstance(module, TemporalModule))
        with SynapticOperationCounter(snn.body, event_driven=True, steps=8,
                                      window=lambda clock=clock: (clock.t0, clock.steps)) as counter:
            snn.simulate(x, [8])
        counted[streams] = {name: float(layer[COUNTS.index("multiply_accumulates")].sum())
                            for name, layer in counter.counts.items()}
    def analog(counts: dict[str, float]) -> set[str]:
        return {name for name, macs in counts.items() if macs > 0}
    # the body starts after the stem, which reads the image; the classifier reads the average of spikes; with
    # analog streams the convolutions reading the bottleneck and the sum multiply too
    assert analog(counted[True]) == {"fc"}
    assert analog(counted[False]) >= {"fc", "expand.0", "head.0"}


def test_zero_one_neurons_are_refused_for_quantized_streams() -> None:
    with pytest.raises(ValueError, match="quantized streams need neurons that fire negative spikes.*'signed'"):
        ConversionConfig.from_dict({"quantize_streams": True})
    qann = ann2snn.quantize(_network(), [torch.rand(16, 3, 8, 8)], qbits=3, quantize_streams=True)
    with pytest.raises(ConversionError, match="neuron 'if' fires no negative spikes"):
        ann2snn.convert_qann(qann, neuron="if")
    assert ConversionConfig.from_dict({"quantize_streams": True, "neuron": "signed"}).to_dict()["quantize_streams"]


def test_the_command_line_quantizes_streams_for_signed_neurons_only() -> None:
    parser = build_parser()
    args = parser.parse_args(["convert", "x.pt", "--quantize-streams", "--neuron", "signed"])
    assert conversion_settings(args)["quantize_streams"] is True
    assert "quantize_streams" not in conversion_settings(parser.parse_args(["convert", "x.pt"]))
    with pytest.raises(UsageError, match="quantized streams need neurons that fire negative spikes"):
        conversion_settings(parser.parse_args(["convert", "x.pt", "--quantize-streams"]))
