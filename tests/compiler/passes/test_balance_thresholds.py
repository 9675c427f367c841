"""Pass 9 (balance_thresholds): Scales move forward and fold into the next conv/linear weights."""
from __future__ import annotations

import copy
import importlib
import operator
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.compiler.ops import CONVS
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import balance_thresholds, emit_neurons
from ann2snn.runtime.layers import Scale, SpikingMaxPool
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neuron_kinds import neuron_kind
from ann2snn.runtime.neurons import SpikingNeuron


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv_a = nn.Conv2d(6, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pool = nn.MaxPool2d(2)
        self.conv_c = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 5)
        self.fc2 = nn.Linear(5, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = torch.relu(self.conv_a(x))
        x = F.relu6(self.conv_b(y) + x)         # residual add: the shortcut's Scale stays
        x = self.dw(x).clamp(0, 4)              # depthwise conv fed by a balanced neuron
        x = F.avg_pool2d(self.pool(x), 1)       # 8x8 -> 4x4, Scale moves through both pools
        x = F.pad(x, (1, 1, 1, 1))[:, :, 1:, 1:]  # ... through padding and slicing (scalar only)
        x = F.relu(self.conv_c(x))              # 5x5 -> 3x3
        x = torch.relu(self.fc(x[:, :, :2, :2].flatten(1)))
        return self.fc2(x)


def calibration():
    torch.manual_seed(11)
    return [torch.randn(16, 3, 8, 8) for _ in range(2)]


@pytest.fixture(scope="module")
def qanns():
    torch.manual_seed(0)
    model = ResNetLike().eval()
    return {pc: ann2snn.quantize(model, calibration(), 2, per_channel=pc) for pc in (False, True)}


# (the package exports the pass function under the module's name)
balance_module = importlib.import_module("ann2snn.compiler.passes.balance_thresholds")


def scale_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Scale)]


def is_weighted(gm, node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), CONVS + (nn.Linear,))


@pytest.mark.parametrize("kind", ["if", "signed"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_scales_fold_into_weights_except_on_the_residual(qanns, kind: str, per_channel: bool) -> None:
    emitted = run_passes(copy.deepcopy(qanns[per_channel]), partial(emit_neurons, neuron=kind))
    before = scale_nodes(emitted)
    assert len(before) == 6 and any(is_weighted(emitted, next(iter(n.users))) for n in before)
    balanced = run_passes(copy.deepcopy(emitted), balance_thresholds)

    remaining = scale_nodes(balanced)
    for node in remaining:
        assert not any(is_weighted(balanced, user) for user in node.users), node
    # what is left: with accumulate coding the residual shortcut's Scale feeding the add (conv_b's bias
    # injection sits between conv_b and the add), plus (per channel) the Scales that cannot pass reshaping
    # ops; the first branch's Scale folded into conv_a
    add = next(n for n in balanced.graph.nodes if n.target is operator.add)
    shortcut = add.args[1]
    if kind == "signed":
        assert shortcut in remaining
        assert isinstance(balanced.get_submodule(shortcut.args[0].target), SpikingNeuron)
    else:
        # the add is balanced: conv_b and the neuron after the add took the shortcut's factor
        assert isinstance(balanced.get_submodule(shortcut.target), SpikingNeuron)
        assert is_weighted(balanced, add.args[0])
    conv_a = next(n for n in balanced.graph.nodes if n.target == "conv_a")
    assert isinstance(balanced.get_submodule(conv_a.args[0].target), SpikingNeuron)
    if not per_channel:
        assert len(remaining) == (1 if kind == "signed" else 0)
        # the dw neuron's Scale moved through max pool, avg pool, pad and slicing into conv_c
        conv_c = next(n for n in balanced.graph.nodes if n.target == "conv_c")
        chain = conv_c.args[0]
        assert chain.target is operator.getitem and chain.args[0].target is F.pad
        pool = chain.args[0].args[0].args[0]
        assert isinstance(balanced.get_submodule(pool.target), SpikingMaxPool)
        assert isinstance(balanced.get_submodule(pool.args[0].target), SpikingNeuron)


@pytest.mark.parametrize("per_channel", [False, True])
def test_folded_weights_carry_the_spike_value(qanns, per_channel: bool) -> None:
    qann = qanns[per_channel]
    balanced = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron="signed"), balance_thresholds)
    # conv_a reads the stem neuron: its weights are scaled by the step theta/L of the input channel
    step = (qann.get_submodule("relu").theta / qann.get_submodule("relu").levels).reshape(-1)
    expected = qann.get_submodule("conv_a").weight * (step.reshape(1, -1, 1, 1) if per_channel else step)
    torch.testing.assert_close(balanced.get_submodule("conv_a").weight, expected, rtol=1e-6, atol=0)
    # depthwise conv: channel c of the weight is scaled by the step of input channel c
    q = qann.get_submodule("relu6")
    step = (q.theta / q.levels).reshape(-1)
    expected = qann.get_submodule("dw").weight * (step.reshape(-1, 1, 1, 1) if per_channel else step)
    torch.testing.assert_close(balanced.get_submodule("dw").weight, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_balanced_add_divides_the_layer_and_the_neuron_thresholds(qanns, per_channel: bool, monkeypatch) -> None:
    emitted = run_passes(copy.deepcopy(qanns[per_channel]), partial(emit_neurons, neuron="if"))
    balanced = run_passes(copy.deepcopy(emitted), balance_thresholds)
    shortcut = next(n for n in emitted.graph.nodes if n.target is operator.add).args[1]
    factor = emitted.get_submodule(shortcut.target).factor
    channel = factor.reshape(-1, 1, 1, 1) if per_channel else factor
    # conv_b: its input Scale folded per input channel (as without add balancing), then divided by the
    # shortcut's factor per output channel
    monkeypatch.setattr(balance_module, "_balanced_add", lambda *args: False)
    unbalanced_add = run_passes(copy.deepcopy(emitted), balance_thresholds)
    torch.testing.assert_close(balanced.get_submodule("conv_b").weight,
                               unbalanced_add.get_submodule("conv_b").weight / channel, rtol=1e-6, atol=0)
    torch.testing.assert_close(balanced.get_submodule("conv_b").bias,
                               emitted.get_submodule("conv_b").bias / factor.flatten(), rtol=1e-6, atol=0)
    torch.testing.assert_close(balanced.get_submodule("relu6").v_threshold,
                               emitted.get_submodule("relu6").v_threshold / factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["if", "lif", "signed"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_balanced_simulation_equals_unbalanced(qanns, kind: str, per_channel: bool) -> None:
    emitted = run_passes(copy.deepcopy(qanns[per_channel]), partial(emit_neurons, neuron=kind))
    balanced = run_passes(copy.deepcopy(emitted), balance_thresholds)
    T = 24 if kind == "if" else 40
    x = torch.randn(4, 3, 8, 8)
    plain = SpikingNetwork(emitted, T, neuron_kind(kind).coding.name).simulate(x, [8, T])
    folded = SpikingNetwork(balanced, T, neuron_kind(kind).coding.name).simulate(x, [8, T])
    for t in (8, T):
        scale = float(plain.outputs[t].abs().max())
        assert scale > 0
        torch.testing.assert_close(folded.outputs[t], plain.outputs[t], rtol=1e-5, atol=1e-5 * scale)
        assert folded.spikes[t].keys() == plain.spikes[t].keys()
        for name in plain.spikes[t]:
            torch.testing.assert_close(folded.spikes[t][name], plain.spikes[t][name], rtol=0, atol=0)


def test_balancing_is_idempotent(qanns) -> None:
    balanced = run_passes(copy.deepcopy(qanns[False]), partial(emit_neurons, neuron="if"), balance_thresholds)
    structure = [(n.op, n.target) for n in balanced.graph.nodes]
    weights = {k: v.clone() for k, v in balanced.state_dict().items()}
    again = run_passes(balanced, balance_thresholds)
    assert [(n.op, n.target) for n in again.graph.nodes] == structure
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


class Branching(nn.Module):
    """One neuron read by two convs and a concatenation: its Scale is split per user."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 4, 1)
        self.right = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(12 * 16, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        cat = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x)), x], dim=1)
        return self.fc(F.avg_pool2d(cat, 2).flatten(1))


def test_shared_scale_is_split_per_user() -> None:
    torch.manual_seed(0)
    qann = ann2snn.quantize(Branching().eval(), calibration(), 3)
    emitted = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron="signed"))
    balanced = run_passes(copy.deepcopy(emitted), balance_thresholds)
    stem_neuron = next(n for n in balanced.graph.nodes if n.target == "relu")
    users = {u.target if u.op == "call_module" else u.name for u in stem_neuron.users}
    # left and right read integer spikes; only the concatenation keeps a Scale
    assert "left" in users and "right" in users
    others = [u for u in stem_neuron.users if u.target not in ("left", "right")]
    assert len(others) == 1 and isinstance(balanced.get_submodule(others[0].target), Scale)
    assert next(iter(others[0].users)).target is torch.cat
    x = torch.randn(3, 3, 8, 8)
    a = SpikingNetwork(emitted, 32, "accumulate").simulate(x, [32]).outputs[32]
    b = SpikingNetwork(balanced, 32, "accumulate").simulate(x, [32]).outputs[32]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


class TokenMix(nn.Module):
    """Conv1d -> ReLU -> Linear over the last (length) dimension: channels are dim 1, features dim -1."""

    def __init__(self, channels: int, length: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, channels, 3, padding=1)
        self.mix = nn.Linear(length, 5)
        self.fc = nn.Linear(channels * 5, 3)

    def forward(self, x):
        x = F.relu(self.conv(x))  # [N, C, L]
        x = F.relu(self.mix(x))   # mixes along L, per channel
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("channels", [6, 4])
def test_per_channel_scale_before_linear_on_3d_activation(channels: int) -> None:
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 6) for _ in range(2)]
    qann = ann2snn.quantize(TokenMix(channels).eval(), calib, 2, per_channel=True)
    emitted = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron="signed"))
    balanced = run_passes(copy.deepcopy(emitted), balance_thresholds)
    x = torch.randn(4, 3, 6)
    plain = SpikingNetwork(emitted, 48, "accumulate")(x)
    torch.testing.assert_close(plain, qann(x).detach(), rtol=1e-5, atol=1e-5)  # the emitted graph is right
    folded = SpikingNetwork(balanced, 48, "accumulate")(x)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)


def test_add_with_a_vanishing_channel_factor_is_not_balanced() -> None:
    # a channel that never fired in calibration gets the smallest threshold: balancing would divide by it
    torch.manual_seed(0)
    qann = ann2snn.quantize(ResNetLike().eval(), calibration(), 2, per_channel=True)
    shortcut_quantizer = qann.get_submodule("relu")
    with torch.no_grad():
        shortcut_quantizer.theta[0, 1] = torch.finfo(torch.float32).tiny
    balanced = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron="if"), balance_thresholds)
    add = next(n for n in balanced.graph.nodes if n.target is operator.add)
    assert isinstance(balanced.get_submodule(add.args[1].target), Scale)
    assert torch.isfinite(balanced.get_submodule("conv_b").weight).all()
