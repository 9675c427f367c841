"""Fuzz test (hypothesis): random small architectures with random weights, data and conversion settings
go through convert, evaluate, save/load and ONNX export. Every run must end in a clean ConversionError
(for the architectures that contain something unconvertible, and only for those) or in results that agree
with their references:

* the QANN: a signed-neuron SNN of the same QANN (bursts of up to L spikes, float64) settles on the
  QANN's output exactly;
* the simulator itself: one chunk of all T steps, one step per chunk and `snn.step` streaming give the
  same outputs (float64);
* evaluate: its accuracies and agreement are those of the outputs computed by hand, and a memory limit
  sized for k steps makes it simulate k steps per chunk;
* save/load: bit-identical outputs; ONNX: onnxruntime running the exported t-step model.

The example counts are bounded for CI (derandomized: the same examples every run). For a longer, random
search set ANN2SNN_FUZZ_EXAMPLES, e.g. ANN2SNN_FUZZ_EXAMPLES=500.
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ann2snn
from ann2snn.compiler.observers import THRESHOLD_RULES
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.errors import ConversionError
from ann2snn.runtime.memory import simulation_footprint
from ann2snn.runtime.neuron_kinds import NEURON_KINDS
from tests.helpers import randomize_bn

LONG_RUN = "ANN2SNN_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("ANN2SNN_FUZZ_EXAMPLES", 30))
EXPORT_EXAMPLES = int(os.environ.get("ANN2SNN_FUZZ_EXAMPLES", 4))  # an export takes seconds
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG_RUN,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ACTIVATIONS = ("relu", "relu6", "inplace", "method", "hardtanh", "clamp")
# What each unconvertible op is called in the error that refuses it.
UNSUPPORTED = {"silu": "SiLU", "sigmoid": "sigmoid", "product": "mul", "branch": "could not trace"}


def activate(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.relu6(x)
    if name == "inplace":
        return F.relu(x, inplace=True)
    if name == "method":
        return x.relu()
    if name == "hardtanh":
        return F.hardtanh(x, 0.0, 2.5)
    return torch.clamp(x, min=0)


class ConvBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int, depthwise: bool,
                 batchnorm: bool, activation: str):
        super().__init__()
        groups = channels_in if depthwise and channels_out % channels_in == 0 else 1
        self.conv = nn.Conv2d(channels_in, channels_out, kernel, stride, padding=kernel // 2, groups=groups)
        self.bn = nn.BatchNorm2d(channels_out) if batchnorm else nn.Identity()
        self.activation = activation

    def forward(self, x):
        return activate(self.activation, self.bn(self.conv(x)))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.activation = activation

    def forward(self, x):
        return activate(self.activation, self.bn(self.conv(x)) + x)


class ConcatBlock(nn.Module):
    def __init__(self, channels_in: int, left: int, right: int, activation: str):
        super().__init__()
        self.left = nn.Conv2d(channels_in, left, 1)
        self.right = nn.Conv2d(channels_in, right, 3, padding=1)
        self.activation = activation

    def forward(self, x):
        return activate(self.activation, torch.cat([self.left(x), self.right(x)], dim=1))


class PoolBlock(nn.Module):
    def __init__(self, kind: str, ceil_mode: bool):
        super().__init__()
        self.pool = (nn.MaxPool2d if kind == "max" else nn.AvgPool2d)(2, ceil_mode=ceil_mode)

    def forward(self, x):
        return self.pool(x)


class UnsupportedBlock(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.silu = nn.SiLU()

    def forward(self, x):
        if self.kind == "silu":
            return self.silu(x)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        if self.kind == "product":
            return x * F.relu(x)
        return x if x.sum() > 0 else -x  # "branch": control flow on a tensor value


@dataclass
class Architecture:
    channels: int
    size: int
    blocks: list[tuple] = field(default_factory=list)
    head: str = "pool"
    classes: int = 3
    unsupported: str | None = None


class FuzzNet(nn.Module):
    def __init__(self, architecture: Architecture):
        super().__init__()
        channels, layers = architecture.channels, []
        for kind, *options in architecture.blocks:
            if kind == "conv":
                layers.append(ConvBlock(channels, *options))
                channels = options[0]
            elif kind == "residual":
                layers.append(ResidualBlock(channels, *options))
            elif kind == "concat":
                layers.append(ConcatBlock(channels, *options))
                channels = options[0] + options[1]
            elif kind == "pool":
                layers.append(PoolBlock(*options))
            elif kind == "dropout":
                layers.append(nn.Dropout(0.3))
            else:
                layers.append(UnsupportedBlock(*options))
        self.blocks = nn.Sequential(*layers)
        self.head_kind = architecture.head
        features = channels if architecture.head == "pool" else channels * _final_size(architecture) ** 2
        self.hidden = nn.Linear(features, 8)
        self.out = nn.Linear(8, architecture.classes)

    def forward(self, x):
        x = self.blocks(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1) if self.head_kind == "pool" else torch.flatten(x, 1)
        return self.out(F.relu(self.hidden(x)))


def _final_size(architecture: Architecture) -> int:
    size = architecture.size
    for kind, *options in architecture.blocks:
        if kind == "conv":
            size = (size - 1) // options[2] + 1  # padding kernel // 2 keeps the size at stride 1
        elif kind == "pool":
            size = -(-size // 2) if options[1] else size // 2
    return size


@st.composite
def architectures(draw) -> Architecture:
    architecture = Architecture(channels=draw(st.integers(1, 3)), size=draw(st.integers(3, 8)),
                                head=draw(st.sampled_from(["pool", "flatten"])), classes=draw(st.integers(2, 6)))
    channels = architecture.channels
    for _ in range(draw(st.integers(1, 4))):
        size = _final_size(architecture)
        kinds = ["conv", "residual", "concat", "dropout"] + (["pool"] if size >= 2 else [])
        kind = draw(st.sampled_from(kinds))
        activation = draw(st.sampled_from(ACTIVATIONS))
        if kind == "conv":
            channels_out = draw(st.sampled_from([channels, 2 * channels, 4]))
            stride = draw(st.sampled_from([1, 2])) if size >= 2 else 1
            block = ("conv", channels_out, draw(st.sampled_from([1, 3])), stride, draw(st.booleans()),
                     draw(st.booleans()), activation)
            channels = channels_out
        elif kind == "residual":
            block = ("residual", activation)
        elif kind == "concat":
            left, right = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            block = ("concat", left, right, activation)
            channels = left + right
        elif kind == "pool":
            block = ("pool", draw(st.sampled_from(["max", "avg"])), draw(st.booleans()))
        else:
            block = ("dropout",)
        architecture.blocks.append(block)
    if draw(st.integers(0, 3)) == 0:
        architecture.unsupported = draw(st.sampled_from(sorted(UNSUPPORTED)))
        position = draw(st.integers(0, len(architecture.blocks)))
        architecture.blocks.insert(position, ("unsupported", architecture.unsupported))
    return architecture


@st.composite
def conversion_settings(draw) -> dict:
    neuron = draw(st.sampled_from(tuple(NEURON_KINDS)))
    options = {
        "qbits": draw(st.integers(1, 8)),
        "T": draw(st.integers(1, 12)),
        "neuron": neuron,
        "threshold_rule": draw(st.sampled_from(tuple(THRESHOLD_RULES))),
        "percentile": draw(st.floats(90.0, 100.0)),
        "per_channel": draw(st.booleans()),
        "max_spikes_per_step": draw(st.integers(1, 3)),
        "chunk_size": draw(st.none() | st.integers(1, 5)),
    }
    if neuron == "lif":
        options["neuron_options"] = {"decay": draw(st.floats(0.5, 1.0)), "compensate_leak": draw(st.booleans())}
    return options


def build(architecture: Architecture, seed: int) -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    """The model with random He-scaled weights and BatchNorm statistics, calibration batches of random
    scale, and test inputs."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FuzzNet(architecture)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.uniform_(module.bias, -0.3, 0.3)
    model = randomize_bn(model).eval()
    shape = (architecture.channels, architecture.size, architecture.size)
    scale = float(torch.empty(1).uniform_(0.2, 3.0, generator=generator))
    calibration = [scale * torch.randn(6, *shape, generator=generator) for _ in range(2)]
    return model, calibration, scale * torch.randn(5, *shape, generator=generator)


def assert_signed_network_settles_on_the_qann(snn: ann2snn.SpikingNetwork, x: torch.Tensor) -> None:
    # float64 from the QANN on, so that the folded weights hold no float32 rounding of their own
    qann = copy.deepcopy(snn.qann).double()
    levels = max(quantizer.levels for quantizer in qann.modules() if isinstance(quantizer, QCFSQuantizer))
    exact = ann2snn.convert_qann(qann, T=4096, neuron="signed", max_spikes_per_step=levels)
    result = exact.simulate(x.double(), [4096], stop_when_quiet=True)
    expected = qann(x.double())
    assert int(result.steps_used.max()) < 4096, "the signed network never fell quiet"
    torch.testing.assert_close(result.outputs[4096], expected, rtol=1e-9,
                               atol=1e-9 * (1.0 + float(expected.abs().max())))


def assert_time_stepping_is_consistent(snn: ann2snn.SpikingNetwork, x: torch.Tensor) -> None:
    network, x = copy.deepcopy(snn).double(), x.double()
    T = network.T
    whole = network.simulate(x, [T], chunk_size=T).outputs[T]
    stepwise = network.simulate(x, [T], chunk_size=1).outputs[T]
    network.reset()
    steps = [network.step(network.encode_step(x, t)) for t in range(T)]
    start = network.readout_start(T)  # the read-out averages the steps from there on (rate coding)
    streamed = sum(steps[start:])
    streamed = streamed / (T - start) if network.coding == "rate" else streamed
    tolerance = {"rtol": 1e-9, "atol": 1e-9 * (1.0 + float(whole.abs().max()))}
    torch.testing.assert_close(stepwise, whole, **tolerance)
    torch.testing.assert_close(streamed, whole, **tolerance)


def assert_evaluation_matches(snn: ann2snn.SpikingNetwork, model: nn.Module, x: torch.Tensor, chunk: int) -> None:
    labels = snn.qann(x).argmax(-1)
    T_list = sorted({1, snn.T})
    footprint = simulation_footprint(snn, x)
    report = ann2snn.evaluate(snn, [(x, labels)], T_list, ann=model, max_memory=footprint.bytes_for(len(x), chunk))
    preferred = snn.chunk_size or snn.default_chunk(len(x))
    assert report.timing["chunk_size"] == min(chunk, preferred)
    outputs = snn.simulate(x, T_list, chunk_size=report.timing["chunk_size"]).outputs
    assert report.images == len(x) and report.accuracy_qann == 1.0
    assert report.accuracy_ann == int((model(x).argmax(-1) == labels).sum()) / len(x)
    for T in T_list:
        accuracy = int((outputs[T].argmax(-1) == labels).sum()) / len(x)
        assert report.accuracy_snn[T] == accuracy == report.agreement_snn_qann[T]
        assert report.spikes_per_image[T] >= 0
    assert all(0.0 <= layer.never_fired_fraction <= 1.0 for layer in report.layers)


def assert_save_load_round_trip(snn: ann2snn.SpikingNetwork, model: nn.Module, x: torch.Tensor) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = ann2snn.save(snn, Path(directory) / "snn.pt", ann=model)
        loaded = ann2snn.io.saved_network.load_saved(path)
    assert torch.equal(loaded.snn(x), snn(x))
    assert torch.equal(loaded.snn.qann(x), snn.qann(x))
    assert torch.equal(loaded.ann(x), model(x))


@FUZZ
@given(architecture=architectures(), options=conversion_settings(), seed=st.integers(0, 2 ** 16),
       chunk=st.integers(1, 4))
@torch.no_grad()
def test_random_networks_convert_correctly_or_fail_cleanly(architecture: Architecture, options: dict, seed: int,
                                                          chunk: int) -> None:
    model, calibration, x = build(architecture, seed)
    if architecture.unsupported is not None:
        with pytest.raises(ConversionError) as refused:
            ann2snn.convert(model, calibration, **options)
        assert UNSUPPORTED[architecture.unsupported] in str(refused.value)
        return

    snn = ann2snn.convert(model, calibration, **options)
    output = snn(x)
    assert output.shape == (len(x), architecture.classes) and bool(torch.isfinite(output).all())
    assert_signed_network_settles_on_the_qann(snn, x)
    assert_time_stepping_is_consistent(snn, x)
    assert_evaluation_matches(snn, model, x, chunk)
    assert_save_load_round_trip(snn, model, x)


@settings(FUZZ, max_examples=EXPORT_EXAMPLES)
@given(architecture=architectures().filter(lambda architecture: architecture.unsupported is None),
       options=conversion_settings(), seed=st.integers(0, 2 ** 16))
@torch.no_grad()
def test_random_networks_export_to_onnx_that_onnxruntime_agrees_with(architecture: Architecture, options: dict,
                                                                    seed: int) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from ann2snn.interop.onnx import export_onnx

    model, calibration, x = build(architecture, seed)
    snn = ann2snn.convert(model, calibration, **options)
    x = torch.cat([x, x[:3] * 0.5])
    with tempfile.TemporaryDirectory() as directory:
        path = export_onnx(snn, Path(directory) / "snn.onnx", "t-step")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = session.run(["output"], {"input": x.numpy()})[0]
    expected = snn(x).numpy()
    # float32 in another runtime: a pre-activation on a threshold or level boundary may round to the other
    # side and move one spike, so one sample in eight may differ; a wrong model (a missing bias, a wrong T,
    # a misplaced scale) differs on all of them.
    agreeing = np.isclose(exported, expected, rtol=1e-4, atol=1e-4 * (1.0 + np.abs(expected).max())).all(axis=1)
    assert agreeing.sum() >= len(x) - 1, f"{len(x) - agreeing.sum()} of {len(x)} samples differ"
