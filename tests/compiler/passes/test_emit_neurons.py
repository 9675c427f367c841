"""Pass 8 (emit_neurons): quantizers become neuron + Scale, biases become AddBias, max pools become exact."""
from __future__ import annotations

import copy
import operator
from functools import partial

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.compiler.ops import WEIGHTED
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import emit_neurons, insert_quantizers, normalize_activations, trace
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.runtime.layers import AddBias, ChannelAffine, Scale, SpikingMaxPool
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neurons import IFNeuron, SignedNeuron, SpikingNeuron
from tests.helpers import randomize_bn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6)  # after an add: stays a ChannelAffine
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 2 * 2, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        y = self.bn(self.conv2(x) + self.conv3(x)).clamp(0, 4)
        y = F.max_pool2d(self.pool(y), kernel_size=2, stride=2)
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


def calibration():
    torch.manual_seed(7)
    return [torch.randn(16, 3, 8, 8) for _ in range(2)]


@pytest.fixture(scope="module")
def qanns():
    torch.manual_seed(0)
    model = randomize_bn(Net()).eval()
    return {pc: ann2snn.quantize(model, calibration(), 3, per_channel=pc) for pc in (False, True)}


def modules_of(gm, types):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types)]


@pytest.mark.parametrize("kind", ["if", "signed"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantizers_become_neuron_and_scale(qanns, kind: str, per_channel: bool) -> None:
    qann = qanns[per_channel]
    quantizers = {n.target: qann.get_submodule(n.target) for n in modules_of(qann, QCFSQuantizer)}
    assert len(quantizers) == 3
    gm = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron=kind))

    assert not modules_of(gm, QCFSQuantizer)
    neurons = modules_of(gm, SpikingNeuron)
    assert [n.target for n in neurons] == list(quantizers)
    for node in neurons:
        q, neuron = quantizers[node.target], gm.get_submodule(node.target)
        assert type(neuron) is (IFNeuron if kind == "if" else SignedNeuron)
        value = q.theta if kind == "if" else q.theta / q.levels
        torch.testing.assert_close(neuron.v_threshold, value, rtol=1e-6, atol=0)
        if kind == "signed":
            assert neuron.levels == q.levels
        # exactly one user: the Scale carrying the value of one spike
        assert len(node.users) == 1
        (scale_node,) = node.users
        scale = gm.get_submodule(scale_node.target)
        assert isinstance(scale, Scale)
        torch.testing.assert_close(scale.factor, value, rtol=1e-6, atol=0)
    assert len(modules_of(gm, Scale)) == 3


def _biases(gm: fx.GraphModule) -> dict[str, torch.Tensor | None]:
    layers = {n.target: gm.get_submodule(n.target) for n in modules_of(gm, WEIGHTED + (ChannelAffine,))}
    return {name: None if layer.bias is None or not torch.count_nonzero(layer.bias) else layer.bias.detach().clone()
            for name, layer in layers.items()}


def test_biases_become_add_bias_with_accumulate_coding(qanns) -> None:
    qann = qanns[False]
    biased = _biases(qann)
    # conv2 (bias=False) feeds an add, so the BN is not folded into it and it stays bias-free
    assert sorted(k for k, b in biased.items() if b is not None) == ["bn", "conv1", "conv3", "fc1", "fc2"]
    gm = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron="signed"))
    assert all(bias is None for bias in _biases(gm).values())
    for node in modules_of(gm, WEIGHTED + (ChannelAffine,)):
        layer = gm.get_submodule(node.target)
        torch.testing.assert_close(layer.weight, qann.get_submodule(node.target).weight, rtol=0, atol=0)
        if biased[node.target] is None:
            continue
        (user,) = node.users
        add = gm.get_submodule(user.target)
        assert isinstance(add, AddBias) and add.once
        torch.testing.assert_close(add.bias, biased[node.target].flatten(), rtol=0, atol=0)
        assert add.channel_dim == (-1 if isinstance(layer, nn.Linear) else 1)
    assert len(modules_of(gm, AddBias)) == sum(b is not None for b in biased.values())


@pytest.mark.parametrize("kind", ["if", "lif", "signed-rate"])
def test_biases_stay_in_their_layers_with_rate_coding(qanns, kind: str) -> None:
    # a bias is a current at every step: the layer's kernel adds it, no extra pass over the activation
    qann = qanns[False]
    gm = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron=kind))
    assert not modules_of(gm, AddBias)
    for name, bias in _biases(qann).items():
        kept = _biases(gm)[name]
        assert (kept is None) == (bias is None)
        if bias is not None:
            torch.testing.assert_close(kept, bias, rtol=0, atol=0)


def test_max_pools_become_spiking_max_pools(qanns) -> None:
    gm = run_passes(copy.deepcopy(qanns[False]), partial(emit_neurons, neuron="signed"))
    pools = modules_of(gm, SpikingMaxPool)
    assert len(pools) == 2
    assert not [n for n in gm.graph.nodes if n.target is F.max_pool2d]
    # every remaining nn.MaxPool2d is the pooling function inside a SpikingMaxPool
    wrapped = {id(m.pool) for m in gm.modules() if isinstance(m, SpikingMaxPool)}
    assert all(id(m) in wrapped for m in gm.modules() if isinstance(m, nn.MaxPool2d))
    for node in pools:
        inner = gm.get_submodule(node.target).pool
        assert isinstance(inner, nn.MaxPool2d) and inner.kernel_size == 2 and inner.stride == 2
    # exact pooling of accumulated inputs: the summed output equals pooling of the summed input
    pool = gm.get_submodule(pools[0].target)
    x = torch.randint(-2, 3, (6, 2, 3, 4, 4)).float()
    pool.reset()
    pool.set_window(0, 6)
    out = pool(x.flatten(0, 1)).reshape(6, 2, 3, 2, 2)
    torch.testing.assert_close(out.cumsum(0), F.max_pool2d(x.cumsum(0).flatten(0, 1), 2).reshape(6, 2, 3, 2, 2))


def test_uncalibrated_quantizer_is_rejected() -> None:
    gm = run_passes(Net().eval(), trace, normalize_activations, partial(insert_quantizers, qbits=2))
    with pytest.raises(ValueError, match="no threshold"):
        emit_neurons(gm, neuron="if")
    with pytest.raises(ValueError, match="unknown neuron"):
        emit_neurons(copy.deepcopy(ann2snn.quantize(Net().eval(), calibration(), 2)), neuron="bogus")


@pytest.mark.parametrize("per_channel", [False, True])
def test_emitted_signed_network_reproduces_the_qann(qanns, per_channel: bool) -> None:
    qann = qanns[per_channel]
    snn = SpikingNetwork(run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron="signed")), 64, "accumulate")
    x = torch.randn(5, 3, 8, 8)
    result = snn.simulate(x, [64], stop_when_quiet=True)
    assert int(result.steps_used.max()) < 64
    expected = qann(x).detach()
    torch.testing.assert_close(result.outputs[64], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)  # applied twice (weight sharing)
        self.fc = nn.Linear(4 * 8 * 8, 3)
        with torch.no_grad():
            self.conv.bias.uniform_(0.2, 0.5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv(x))
        x = F.relu(self.conv(x))
        return self.fc(x.flatten(1))


def test_shared_conv_keeps_its_bias_at_every_call_site() -> None:
    torch.manual_seed(0)
    qann = ann2snn.quantize(SharedConv().eval(), calibration(), 2)
    gm = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron="signed"))
    conv_nodes = [n for n in gm.graph.nodes if n.target == "conv"]
    assert len(conv_nodes) == 2
    for node in conv_nodes:
        assert any(isinstance(gm.get_submodule(u.target), AddBias) for u in node.users if u.op == "call_module")
    snn = SpikingNetwork(gm, 64, "accumulate")
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(snn.simulate(x, [64]).outputs[64], qann(x), rtol=1e-5, atol=1e-5)


class ConstantCurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x + 0.5))  # a constant added between two neuron layers
        return self.fc(x.flatten(1))


def test_constant_add_between_layers_with_signed_neurons() -> None:
    torch.manual_seed(0)
    snn = ann2snn.convert(ConstantCurrent().eval(), calibration(), qbits=2, T=64, neuron="signed")
    x = torch.randn(3, 3, 8, 8)
    expected = snn.qann(x).detach()
    torch.testing.assert_close(snn(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("neuron, once", [("if", False), ("signed", True)])
def test_constant_add_becomes_a_bias_injection(neuron: str, once: bool) -> None:
    # x + 0.5 is a constant current: injected like a bias, once for accumulate coding
    torch.manual_seed(0)
    qann = ann2snn.quantize(ConstantCurrent().eval(), calibration(), 2)
    gm = run_passes(copy.deepcopy(qann), partial(emit_neurons, neuron=neuron))
    assert not any(n.target is operator.add for n in gm.graph.nodes)
    offset = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("_offset"))
    injection = gm.get_submodule(offset.target)
    assert isinstance(injection, AddBias) and injection.once is once
    assert injection.bias.tolist() == [0.5]
    assert isinstance(gm.get_submodule(offset.args[0].target), Scale)
