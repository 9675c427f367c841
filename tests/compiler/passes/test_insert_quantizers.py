"""Pass 6 (insert_quantizers): each ClippedReLU becomes an uncalibrated QCFS quantizer with 2**bits-1 levels,
bits given once or per activation."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import insert_quantizers, normalize_activations, trace
from ann2snn.compiler.qbits import activation_nodes, activation_roles, check_qbits, quantizer_bits
from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer
from tests.helpers import qann_levels, randomize_bn
from tests.networks import cnn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x):
        x = F.relu6(self.conv1(x))
        x = self.conv2(x).clamp(0, 4)
        return torch.relu(self.fc(x.flatten(1)))


@pytest.mark.parametrize("qbits", [1, 3, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_clipped_relu_becomes_a_quantizer(qbits: int, per_channel: bool) -> None:
    normalized = run_passes(Net().eval(), trace, normalize_activations)
    expected = [(n.target, normalized.get_submodule(n.target).upper) for n in normalized.graph.nodes
                if n.op == "call_module" and isinstance(normalized.get_submodule(n.target), ClippedReLU)]
    assert [u for _, u in expected] == [6.0, 4.0, None]
    before = [(n.op, n.target) for n in normalized.graph.nodes]

    gm = run_passes(normalized, partial(insert_quantizers, qbits=qbits, per_channel=per_channel))
    assert [(n.op, n.target) for n in gm.graph.nodes] == before
    assert not any(isinstance(m, ClippedReLU) for m in gm.modules())
    for target, upper in expected:
        q = gm.get_submodule(target)
        assert isinstance(q, QCFSQuantizer)
        assert (q.levels, q.upper, q.per_channel) == (2 ** qbits - 1, upper, per_channel)
        assert not q.calibrated and q.observer is None


@pytest.mark.parametrize("qbits", range(1, 9))
def test_qcfs_matches_reference(qbits: int) -> None:
    levels = 2 ** qbits - 1
    theta = torch.rand(()) * 3 + 0.1
    q = QCFSQuantizer(levels)
    q.set_threshold(theta, 4)
    x = torch.randn(6, 5, 7, 7) * float(theta)
    s = theta / levels
    reference = s * torch.clamp(torch.floor(x / s + 0.5), 0, levels)
    torch.testing.assert_close(q(x), reference, rtol=0, atol=0)
    # it is idempotent and its largest output is the threshold
    torch.testing.assert_close(q(q(x)), q(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(q(x + 10 * theta).max(), theta)
    assert q(-x.abs()).abs().max() == 0


@pytest.mark.parametrize("qbits", [1, 2, 5])
def test_qcfs_per_channel_matches_reference(qbits: int) -> None:
    levels = 2 ** qbits - 1
    q = QCFSQuantizer(levels, per_channel=True)
    theta = torch.rand(5) + 0.2
    q.set_threshold(theta, 4)
    assert q.theta.shape == (1, 5, 1, 1)
    x = torch.randn(3, 5, 4, 4)
    s = theta.reshape(1, 5, 1, 1) / levels
    torch.testing.assert_close(q(x), s * torch.clamp(torch.floor(x / s + 0.5), 0, levels), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 9, -1, True, 2.0, "4"])
def test_invalid_qbits(bad) -> None:
    with pytest.raises(ValueError, match="qbits"):
        check_qbits(bad)
    gm = run_passes(Net().eval(), trace, normalize_activations)
    with pytest.raises(ValueError, match="qbits"):
        insert_quantizers(gm, qbits=bad)


def test_check_qbits_returns_levels() -> None:
    assert [check_qbits(b) for b in range(1, 9)] == [1, 3, 7, 15, 31, 63, 127, 255]


# Per-layer bits -------------------------------------------------------------------------------------------


class Branches(nn.Module):
    """Two activations start in parallel from the input, join, and feed two parallel final activations."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.middle = nn.Conv2d(4, 4, 3, padding=1)
        self.head_a, self.head_b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        joined = F.relu(self.middle(F.relu(self.left(x)) + F.relu(self.right(x))))
        return torch.cat([F.relu(self.head_a(joined)), F.relu6(self.head_b(joined))], 1)


def normalized(model: nn.Module):
    return run_passes(model.eval(), trace, normalize_activations)


def test_roles_first_and_last_follow_the_dataflow_not_the_node_order() -> None:
    roles = activation_roles(normalized(Branches()))
    assert list(roles.values()) == [{"first"}, {"first"}, set(), {"last"}, {"last"}]
    single = activation_roles(normalized(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))))
    assert list(single.values()) == [{"first", "last"}]


def test_mapping_gives_each_quantizer_its_levels_names_win_over_roles_over_default() -> None:
    gm = normalized(Branches())
    names = [node.target for node in activation_nodes(gm)]
    gm = insert_quantizers(gm, {"default": 3, "first": 8, "last": 2, names[1]: 5, names[4]: 1})
    assert quantizer_bits(gm) == dict(zip(names, [8, 5, 3, 2, 1]))
    assert [gm.get_submodule(name).levels for name in names] == [255, 31, 7, 3, 1]


def test_a_mapping_without_default_must_cover_every_activation() -> None:
    names = [node.target for node in activation_nodes(normalized(Net()))]
    gm = insert_quantizers(normalized(Net()), {"first": 6, names[1]: 2, "last": 7})
    assert quantizer_bits(gm) == dict(zip(names, [6, 2, 7]))
    with pytest.raises(ValueError, match=f"no bits for {names[1]}.*'default'"):
        insert_quantizers(normalized(Net()), {"first": 6, "last": 7})


@pytest.mark.parametrize("bad, message", [
    ({"default": 4, "conv9.relu": 3}, "no activation called 'conv9.relu'.*the activations are"),
    ({"default": 9}, "'default' must be an integer in 1..8, got 9"),
    ({"first": 0, "default": 4}, "'first' must be an integer in 1..8"),
    ({"default": 4.0}, "'default' must be an integer"),
    ({}, "empty"),
    ({3: 4}, "keys must be activation names"),
])
def test_invalid_mappings_are_refused_with_the_entry_named(bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        insert_quantizers(normalized(Net()), bad)


def test_first_and_last_disagreeing_on_the_same_activation() -> None:
    gm = normalized(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="both the first and the last"):
        insert_quantizers(gm, {"first": 8, "last": 4})
    assert quantizer_bits(insert_quantizers(gm, {"first": 5, "last": 5})) == {"1": 5}


def test_mixed_bits_reach_the_signed_neurons_and_the_snn_equals_the_qann() -> None:
    """Calibration, the signed neurons' level caps and spike values all follow each quantizer's own levels:
    the accumulate-coded SNN settles exactly on the mixed-precision QANN."""
    model = randomize_bn(cnn(3, [8, 8], 32, 5, pool=nn.AdaptiveAvgPool2d(2), hidden=16)).eval()
    calibration = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    qbits = {"first": 2, "default": 5, "last": 3}
    snn = ann2snn.convert(model, calibration, qbits=qbits, T=128, neuron="signed").double()
    qann = snn.qann.double()
    expected = {"2": 2, "5": 5, "9": 3}
    assert quantizer_bits(qann) == expected
    assert {name: neuron.levels for name, neuron in snn.neurons.items()} == {n: 2 ** b - 1 for n, b in expected.items()}
    for name, neuron in snn.neurons.items():
        torch.testing.assert_close(neuron.v_threshold, qann.get_submodule(name).theta / (2 ** expected[name] - 1))
    assert snn.config["qbits"] == "mixed" and snn.config["qbits_per_layer"] == expected
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    reference, levels = qann_levels(qann, x, expected)
    result = snn.simulate(x, [128], stop_when_quiet=True)
    assert int(result.steps_used.max()) < 128, "the network never fell quiet"
    for name, neuron in snn.neurons.items():
        assert torch.equal(neuron.count, levels[name]), f"layer {name}: spike counts differ from the QANN levels"
        assert int(levels[name].max()) == 2 ** expected[name] - 1, f"layer {name} never reaches its top level"
    assert (result.outputs[128] - reference).norm() / reference.norm() < 1e-5


def test_a_mapping_that_resolves_to_one_number_is_recorded_as_that_number() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    snn = ann2snn.convert(model, [torch.randn(8, 4)], qbits={"default": 3, "first": 3}, T=4)
    assert snn.config["qbits"] == 3 and "qbits_per_layer" not in snn.config


def test_quantizers_live_on_the_models_device() -> None:
    # A GPU model in fine-tuning got its thresholds on the CPU and failed in calibration; "meta" stands in
    # for the GPU on a machine without one
    normalized = run_passes(Net().to("meta").eval(), trace, normalize_activations)
    quantized = insert_quantizers(normalized)
    quantizers = [m for m in quantized.modules() if isinstance(m, QCFSQuantizer)]
    assert len(quantizers) == 3
    assert {t.device.type for q in quantizers for t in [*q.parameters(), *q.buffers()]} == {"meta"}
