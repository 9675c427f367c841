"""The one step protocol: every temporal module's multi-step update (time folded into the batch, in chunks)
equals stepping its declared `single_step_forward` from its declared `initial_state`, bit for bit; the
coding's frames are its per-step frame; saved networks from before coding objects still load."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.runtime.coding import ACCUMULATE, RATE, coding
from ann2snn.runtime.encoding import InputEncoder
from ann2snn.runtime.layers import AddBias, SpikingMaxPool, TemporalModule, declares_step
from ann2snn.runtime.neurons import AdaptiveNeuron, IFNeuron, LIFNeuron, SignedNeuron
from tests.helpers import run_in_chunks
from tests.networks import build, calibration

STEPS, BATCH = 11, 3
CHUNKS = (1, 4, 6)  # 11 steps: windows of different lengths, the state carried between them


def threshold() -> torch.Tensor:
    return torch.rand(1, 4, 1, 1, generator=torch.Generator().manual_seed(1)) + 0.4


MODULES = {
    "if": lambda: IFNeuron(threshold()),
    "if, bursts of 3": lambda: IFNeuron(threshold(), max_spikes_per_step=3),
    "lif": lambda: LIFNeuron(threshold(), decay=0.9),
    "signed": lambda: SignedNeuron(threshold(), levels=3),
    "signed, bursts of 2": lambda: SignedNeuron(threshold(), levels=3, max_spikes_per_step=2),
    "signed-rate": lambda: SignedNeuron(threshold(), levels=None),
    "adaptive": lambda: AdaptiveNeuron(threshold(), adapt_increase=0.3, adapt_decay=0.7),
    "bias, rate": lambda: AddBias(torch.tensor([1.0, -2.0, 0.5, 0.25]), RATE),
    "bias, accumulate": lambda: AddBias(torch.tensor([1.0, -2.0, 0.5, 0.25]), ACCUMULATE),
    "max pool": lambda: SpikingMaxPool(nn.MaxPool2d(2, ceil_mode=True)),
    "regular encoder": lambda: InputEncoder("regular", [0.5] * 4, [0.25] * 4),
    "poisson encoder": lambda: InputEncoder("poisson", [0.5] * 4, [0.25] * 4, seed=3),
}


def inputs(name: str, layout) -> torch.Tensor:
    """[steps, batch, 4, 5, 5] inputs; signed integer spike trains for the max pool, whose sums are then
    exact in any order."""
    generator = torch.Generator().manual_seed(len(name))
    if name == "max pool":
        x = torch.randint(-1, 2, (STEPS, BATCH, 4, 5, 5), generator=generator).float()
    else:
        x = torch.randn(STEPS, BATCH, 4, 5, 5, generator=generator) * 1.5
    return x.flatten(0, 1).contiguous(memory_format=layout).unflatten(0, (STEPS, BATCH))


def declared_steps(module: TemporalModule, x: torch.Tensor) -> torch.Tensor:
    module.reset()
    module.load_state(module.initial_state(x[0]))
    return torch.stack([module.single_step_forward(x_t, t) for t, x_t in enumerate(x)])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("name", MODULES)
def test_multi_step_forward_equals_the_declared_step(name: str, layout) -> None:
    module = MODULES[name]()
    assert declares_step(module)
    x = inputs(name, layout)
    expected = declared_steps(module, x)
    expected_state = module.state()
    assert tuple(module.initial_state(x[0])) == module.state_names
    for chunk in CHUNKS:
        out = run_in_chunks(module, x, chunk)
        assert torch.equal(out, expected), f"chunks of {chunk}"
        for state_name, value in module.state().items():
            assert torch.equal(value.expand_as(expected_state[state_name]), expected_state[state_name]), state_name
    if name != "bias, rate":
        assert not torch.equal(expected[1:], expected[:1].expand_as(expected[1:])), "the output depends on time"


@pytest.mark.parametrize("name", [name for name in MODULES if "encoder" not in name and "bias" not in name])
def test_reset_clears_the_declared_state(name: str) -> None:
    module = MODULES[name]()
    x = inputs(name, torch.contiguous_format)
    first = run_in_chunks(module, x, 4)
    assert all(value is not None for value in module.state().values())
    module.reset()
    assert all(value is None for value in module.state().values())
    assert torch.equal(run_in_chunks(module, x, 4), first)


@pytest.mark.parametrize("name", ["signed", "max pool", "bias, accumulate", "poisson encoder"])
def test_the_declared_step_traces_with_a_tensor_step_index(name: str) -> None:
    """The ONNX exporter calls the declared step with t an int64 0-d tensor: the same outputs."""
    module = MODULES[name]()
    x = inputs(name, torch.contiguous_format)
    expected = declared_steps(module, x)
    module.reset()
    module.load_state(module.initial_state(x[0]))
    traced = torch.stack([module.single_step_forward(x_t, torch.tensor(t)) for t, x_t in enumerate(x)])
    assert torch.equal(traced, expected)


@pytest.mark.parametrize("name", ["rate", "accumulate"])
def test_coding_frames_are_its_per_step_frames(name: str) -> None:
    strategy = coding(name)
    value = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    for t0 in (0, 3):
        frames = strategy.frames(value, t0, 5).unflatten(0, (5, 2))
        for i in range(5):
            assert torch.equal(frames[i], strategy.frame(value, t0 + i))
            assert torch.equal(strategy.frame(value, torch.tensor(t0 + i)), strategy.frame(value, t0 + i))
        assert strategy.injected_steps(t0, 5) == sum(bool(frames[i].abs().sum() > 0) for i in range(5))
    assert strategy.frames(value, 0, 5).is_contiguous(memory_format=torch.channels_last)
    assert strategy.read_out(torch.full((2,), 6.0), 3).tolist() == ([2.0, 2.0] if name == "rate" else [6.0, 6.0])
    assert strategy.prefix_runs(8) == (8 if name == "rate" else 1)
    assert strategy == name and str(strategy) == name and hash(strategy) == hash(name)
    assert pickle.loads(pickle.dumps(strategy)) is strategy


def test_unknown_coding_is_refused() -> None:
    with pytest.raises(ValueError, match=r"coding must be one of \('rate', 'accumulate'\), got 'temporal'"):
        coding("temporal")


@pytest.mark.parametrize("neuron", ["if", "signed"])
def test_networks_saved_with_coding_names_load_and_simulate_the_same(neuron: str) -> None:
    """snn.pt files written before codings were objects hold the name in the network and `once` in every
    AddBias: they load with the coding objects, and simulate exactly as before."""
    torch.manual_seed(0)
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=8, neuron=neuron)
    x = torch.randn(4, 3, 8, 8)
    expected = snn.simulate(x, [4, 8])
    old = copy.deepcopy(snn)
    old.__dict__["coding"] = old.coding.name
    old.__dict__.pop("_kernels")
    biases = [module for module in old.modules() if isinstance(module, AddBias)]
    assert biases or neuron == "if"
    for bias in biases:
        bias.__dict__["once"] = bias.__dict__.pop("coding").inject_once
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.coding is snn.coding and loaded.kernels == snn.kernels
    assert all(bias.coding is snn.coding for bias in loaded.modules() if isinstance(bias, AddBias))
    result = loaded.simulate(x, [4, 8])
    for T in (4, 8):
        assert torch.equal(result.outputs[T], expected.outputs[T])
        assert all(torch.equal(result.spikes[T][name], expected.spikes[T][name]) for name in expected.spikes[T])
