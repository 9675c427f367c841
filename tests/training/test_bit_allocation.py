"""Automatic per-layer precision (bit_allocation) and the per-layer bits of the command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.cli.main import main
from ann2snn.compiler.qbits import quantizer_bits
from ann2snn.training.bit_allocation import allocate_bits, mean_bits, read_qbits_config
from tests.helpers import digits_args, digits_checkpoint, randomize_bn


class TwoPaths(nn.Module):
    """Two parallel activations of different sizes; only the first matters for the output, the second reaches it
    through tiny weights."""

    def __init__(self) -> None:
        super().__init__()
        self.to_a, self.to_b = nn.Linear(6, 16), nn.Linear(6, 48)
        self.from_a, self.from_b = nn.Linear(16, 4), nn.Linear(48, 4)
        with torch.no_grad():
            self.from_a.weight.mul_(4.0)
            self.from_b.weight.mul_(1e-3)

    def forward(self, x):
        return self.from_a(F.relu(self.to_a(x))) + self.from_b(F.relu(self.to_b(x)))


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1, self.fc2 = nn.Linear(6 * 4, 12), nn.Linear(12, 5)
        with torch.no_grad():
            self.fc2.weight.mul_(8.0)  # confident outputs, so that quantization moves the distribution measurably

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def kl_from(model: nn.Module, network: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean over images of KL(softmax(model) || softmax(network)), computed directly."""
    total = images = 0.0
    with torch.no_grad():
        for x in batches:
            log_p, log_q = model(x).double().log_softmax(-1), network(x).double().log_softmax(-1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            images += x.shape[0]
    return total / images


def test_sensitivity_is_the_kl_of_the_qann_with_that_activation_alone_lowered() -> None:
    model = randomize_bn(Chain()).eval()
    calibration = [torch.randn(10, 3, 6, 6) for _ in range(3)]
    allocation = allocate_bits(model, calibration, 8, min_bits=2, max_bits=4, probe_images=15)
    assert allocation.probe_images == 15
    probe = [calibration[0], calibration[1][:5]]
    names = list(quantizer_bits(ann2snn.quantize(model, calibration, 4)))
    assert list(allocation.sensitivity) == names
    assert allocation.baseline_kl == pytest.approx(kl_from(model, ann2snn.quantize(model, calibration, 4), probe),
                                                   rel=1e-3)
    for name in names:
        assert allocation.sensitivity[name][4] == allocation.baseline_kl
        for bits in (2, 3):
            qann = ann2snn.quantize(model, calibration, {"default": 4, name: bits})
            assert allocation.sensitivity[name][bits] == pytest.approx(kl_from(model, qann, probe), rel=1e-3)
        assert allocation.sensitivity[name][2] > allocation.sensitivity[name][4]
    # a budget at the top changes nothing
    assert allocation.bits == dict.fromkeys(names, 4)


def test_bits_go_where_they_matter_within_the_budget_weighted_by_neurons() -> None:
    model = TwoPaths().eval()
    calibration = [torch.randn(64, 6) for _ in range(2)]
    allocation = allocate_bits(model, calibration, 4.0, min_bits=2, max_bits=8, probe_images=64)
    a, b = list(allocation.bits)
    assert allocation.neurons == {a: 16, b: 48}
    # the budget: 16 * bits_a + 48 * bits_b <= 4 * 64; the output depends on b's 48 neurons very little
    assert allocation.bits == {a: 8, b: 2}
    assert allocation.mean_bits == mean_bits(allocation.bits, allocation.neurons) == (16 * 8 + 48 * 2) / 64
    qann = ann2snn.quantize(model, calibration, allocation.bits)
    assert quantizer_bits(qann) == allocation.bits


def test_pinned_bits_count_in_the_mean_and_no_budget_is_left_unspent() -> None:
    model = randomize_bn(Chain()).eval()
    calibration = [torch.randn(10, 3, 6, 6) for _ in range(2)]
    allocation = allocate_bits(model, calibration, 5.5, pinned={"first": 8}, min_bits=2, max_bits=6, probe_images=20)
    first = next(iter(allocation.bits))
    assert allocation.bits[first] == 8 and allocation.pinned == {first: 8}
    assert first not in allocation.sensitivity
    assert all(2 <= bits <= 6 for name, bits in allocation.bits.items() if name != first)
    assert allocation.mean_bits <= 5.5
    for name, bits in allocation.bits.items():
        if name != first and bits < 6:
            assert mean_bits({**allocation.bits, name: bits + 1}, allocation.neurons) > 5.5, f"{name} could have more"
    document = json.loads(json.dumps(allocation.to_json()))
    assert document["bits"] == allocation.bits and document["budget"] == 5.5


def test_impossible_budgets_and_bad_arguments() -> None:
    model = randomize_bn(Chain()).eval()
    calibration = [torch.randn(10, 3, 6, 6)]
    with pytest.raises(ValueError, match="cannot be met.*needs"):
        allocate_bits(model, calibration, 2.5, pinned={"first": 8, "last": 8}, min_bits=2, max_bits=8)
    with pytest.raises(ValueError, match="drop the 'default' entry"):
        allocate_bits(model, calibration, 4, pinned={"default": 4})
    with pytest.raises(ValueError, match="budget must be a number of bits per neuron in \\[1, 8\\]"):
        allocate_bits(model, calibration, 9)
    with pytest.raises(ValueError, match="min_bits"):
        allocate_bits(model, calibration, 4, min_bits=5, max_bits=4)
    with pytest.raises(ValueError, match="no activation called 'fc9'"):
        allocate_bits(model, calibration, 4, pinned={"fc9": 3})
    with pytest.raises(ValueError, match="yielded no batches"):
        allocate_bits(model, [], 4)


def test_qbits_config_files(tmp_path: Path) -> None:
    path = tmp_path / "bits.json"
    path.write_text('{"default": 4, "first": 8, "layer3.2.relu_18": 6}')
    assert read_qbits_config(path) == {"default": 4, "first": 8, "layer3.2.relu_18": 6}
    for text, message in (("{4", "not valid JSON"), ("[4]", "expected a JSON object"),
                          ('{"first": 12}', "'first' must be an integer in 1..8")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path.name}.*{message}"):
            read_qbits_config(path)


# Command line -----------------------------------------------------------------------------------------------


def test_command_line_per_layer_bits_and_budget(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    config = tmp_path / "bits.json"
    config.write_text('{"default": 6, "5": 2}')
    assert main(digits_args(checkpoint, "--out", tmp_path / "mixed", "--qbits-config", config, "--qbits", "3",
                            "--qbits-first-last", "8")) == 0, capsys.readouterr().err
    document = json.loads((tmp_path / "mixed" / "report.json").read_text())
    assert document["config"]["qbits"] == "mixed"
    assert document["config"]["qbits_per_layer"] == {"2": 8, "5": 2, "9": 8}
    assert "mixed-bit QANN" in (tmp_path / "mixed" / "report.md").read_text()

    # the first activation holds most of this network's neurons: pinned at 8 bits, it leaves the others ~1 bit of budget
    assert main(digits_args(checkpoint, "--out", tmp_path / "budget", "--qbits-budget", "7",
                            "--qbits-first-last", "8")) == 0, capsys.readouterr().err
    allocation = json.loads((tmp_path / "budget" / "report.json").read_text())["config"]["qbits_allocation"]
    assert allocation["budget"] == 7 and 6.7 < allocation["mean_bits"] <= 7 and allocation["bits"]["5"] < 8
    assert allocation["pinned"] == {"2": 8, "9": 8} and allocation["bits"]["2"] == 8
    capsys.readouterr()

    assert main(digits_args(checkpoint, "--out", tmp_path / "bad", "--qbits-budget", "3", "--qbits", "4")) == 2
    assert "drop --qbits" in capsys.readouterr().err
    assert main(digits_args(checkpoint, "--out", tmp_path / "bad", "--qbits-budget", "9")) == 2
    assert "[1, 8]" in capsys.readouterr().err
