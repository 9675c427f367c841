"""SpikingJelly interoperability: our networks as SpikingJelly modules, and SpikingJelly-converted networks
as ours, each compared with the other side's simulation on fresh random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.errors import ConversionError
from ann2snn.interop.spikingjelly import from_spikingjelly, to_spikingjelly
from ann2snn.runtime.layers import Scale
from ann2snn.zoo import build_model

functional = pytest.importorskip("spikingjelly.activation_based.functional")
sj_conversion = pytest.importorskip("spikingjelly.activation_based.ann2snn")
sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")


class PaddedShortcut(nn.Module):
    """What SpikingJelly's own converter rejects: functional ReLUs, F.pad, a slicing shortcut, ReLU6,
    max pooling of spikes (exact pooling, a stateful module here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu6(self.conv2(x) + shortcut)
        x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def _simulate_stepwise(net: nn.Module, x: torch.Tensor, T: int) -> torch.Tensor:
    """T single steps, read out as our network reads them: the average from step floor(readout_delay x T) (a
    network SpikingJelly converted has no delay)."""
    functional.reset_net(net)
    return torch.stack([net(x) for _ in range(T)])[int(getattr(net, "readout_delay", 0.0) * T):].mean(0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_to_spikingjelly_matches_our_simulation_in_both_step_modes(per_channel: bool) -> None:
    snn = ann2snn.convert(PaddedShortcut().eval(), [torch.randn(32, 3, 8, 8)], qbits=3, T=12, per_channel=per_channel)
    net = to_spikingjelly(snn)
    assert net.readout_delay == snn.readout_delay == 0.5 and snn.readout_start(12) == 6
    neurons = [m for m in net.modules() if isinstance(m, sj_neuron.HalfThresholdIFNode)]
    assert len(neurons) == len(snn.neurons) == 2
    x = torch.randn(6, 3, 8, 8)
    ours = snn.simulate(x, [12]).outputs[12]
    single = _simulate_stepwise(net, x, 12)
    torch.testing.assert_close(single, ours, rtol=1e-5, atol=1e-6)
    # reset_net clears every state: a second run repeats the first
    torch.testing.assert_close(_simulate_stepwise(net, x, 12), single, rtol=0, atol=0)
    functional.set_step_mode(net, "m")
    functional.reset_net(net)
    sequence = net(x.unsqueeze(0).expand(12, *x.shape))
    assert sequence.shape == (12, 6, 5)
    torch.testing.assert_close(sequence[6:].mean(0), ours, rtol=1e-5, atol=1e-6)


def test_to_spikingjelly_on_mobilenet_v2() -> None:
    model = build_model("mobilenet_v2_cifar", width_mult=0.25).eval()
    snn = ann2snn.convert(model, [torch.randn(8, 3, 32, 32)], T=4)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_simulate_stepwise(to_spikingjelly(snn), x, 4), snn.simulate(x, [4]).outputs[4],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("neuron", ["signed", "signed-rate", "lif"])
def test_to_spikingjelly_refuses_neurons_without_a_counterpart(neuron: str) -> None:
    snn = ann2snn.convert(PaddedShortcut().eval(), [torch.randn(16, 3, 8, 8)], T=4, neuron=neuron)
    with pytest.raises(ConversionError, match="relu|coding"):
        to_spikingjelly(snn)


def _spikingjelly_converted(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    recipe = sj_conversion.RateCodingRecipe([(calibration, None)], mode="99.9%", channel_wise=True,
                                            half_threshold=True)
    return sj_conversion.Converter(recipe).convert(model).eval()


def _sequential_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()


class FunctionalFlatten(nn.Module):
    """torch.flatten in forward: SpikingJelly wraps it into a step-mode tensor op."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@pytest.mark.parametrize("model", [_sequential_cnn, lambda: FunctionalFlatten().eval()],
                         ids=["sequential-maxpool", "functional-flatten"])
def test_from_spikingjelly_simulates_what_spikingjelly_simulates(model) -> None:
    net = _spikingjelly_converted(model(), torch.randn(32, 3, 8, 8))
    imported = from_spikingjelly(net, T=16)
    assert [type(m) for m in imported.neurons.values()] == [ann2snn.IFNeuron] * 2
    assert not [m for m in imported.modules() if type(m).__module__.startswith("spikingjelly")]
    x = torch.randn(5, 3, 8, 8)
    result = imported.simulate(x, [8, 16])
    for T in (8, 16):
        torch.testing.assert_close(result.outputs[T], _simulate_stepwise(net, x, T), rtol=1e-5, atol=1e-6)
    assert all(bool((spikes > 0).any()) for spikes in result.spikes[16].values())
    # balanced: the layers after the neurons receive plain spikes (the last layer keeps the value of a spike)
    assert len([m for m in imported.modules() if isinstance(m, Scale)]) <= 1
    # our evaluator on it: accuracy from the same outputs, spike counts from the same simulation
    labels = result.outputs[16].argmax(1)
    report = ann2snn.evaluate(imported, [(x, labels)], [16])
    assert report.accuracy_snn[16] == 1.0


def test_from_spikingjelly_refuses_other_neurons() -> None:
    net = _spikingjelly_converted(_sequential_cnn(), torch.randn(32, 3, 8, 8))
    node = next(n for n in net.graph.nodes if n.op == "call_module" and isinstance(net.get_submodule(n.target),
                                                                                     sj_neuron.HalfThresholdIFNode))
    net.add_submodule(node.target, sj_neuron.LIFNode(tau=2.0))
    with pytest.raises(ConversionError, match=node.name):
        from_spikingjelly(net, T=4)
