"""Pruning before conversion: the zeros survive BatchNorm folding and threshold balancing, the SNN still
reproduces its QANN, and the synaptic-operation count shows the saving."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.training.pruning import prune
from tests.helpers import digits_args, digits_checkpoint, randomize_bn, run_cli


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(Net()).eval()


def batches(count: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=generator) for _ in range(count)]


def synops(snn: ann2snn.SpikingNetwork, x: torch.Tensor, T: int) -> float:
    labels = torch.zeros(len(x), dtype=torch.long)
    return ann2snn.evaluate(snn, [(x, labels)], [T]).synops_per_image[T]


def test_magnitude_pruning_is_global_and_its_zeros_reach_the_folded_snn() -> None:
    model = build()
    pruned, summary = prune(model, 0.6)
    assert summary.mode == "magnitude" and abs(summary.sparsity - 0.6) < 0.01
    # global: layers are pruned unevenly (the layers' weight scales differ), not 60 % each
    per_layer = [float((layer.weight == 0).float().mean()) for layer in (pruned.conv1, pruned.conv2, pruned.fc)]
    assert max(per_layer) - min(per_layer) > 0.05
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), build().state_dict().values())), \
        "the model given was changed"
    snn = ann2snn.convert(pruned, batches(), qbits=3, T=64, neuron="signed")
    assert float((snn.qann.get_submodule("conv2").weight == 0).float().mean()) == pytest.approx(per_layer[1])


def test_pruned_snn_equals_its_qann_and_costs_fewer_synaptic_operations() -> None:
    x = batches(1, seed=7)[0]
    dense = ann2snn.convert(build(), batches(), qbits=3, T=64, neuron="signed")
    pruned_model, _ = prune(build(), 0.5)
    pruned = ann2snn.convert(pruned_model, batches(), qbits=3, T=64, neuron="signed")
    result = pruned.simulate(x, [64], stop_when_quiet=True)
    expected = pruned.qann(x).detach()
    assert float((result.outputs[64] - expected).norm() / expected.norm()) < 1e-5
    dense_ops, pruned_ops = synops(dense, x, 64), synops(pruned, x, 64)
    assert 0 < pruned_ops < 0.8 * dense_ops, (dense_ops, pruned_ops)


def test_channel_pruning_silences_whole_channels() -> None:
    model = build()
    pruned, summary = prune(model, 0.25, mode="channel")
    assert summary.removed_channels == 2 * 4 and summary.channels == 32
    removed = ~pruned.conv1.weight.flatten(1).any(1)
    assert int(removed.sum()) == 4
    assert torch.all(pruned.conv1.bias[removed] == 0) and torch.all(pruned.bn1.bias[removed] == 0)
    x = batches(1, seed=3)[0]
    snn = ann2snn.convert(pruned, batches(), qbits=3, T=16, neuron="if")
    per_channel = torch.zeros(16)
    first = snn.neurons["relu"]  # after conv1: spikes [steps * batch, 16, 8, 8]

    def count(_, __, spikes: torch.Tensor) -> None:
        per_channel.add_(spikes.sum((0, 2, 3)))

    hook = first.register_forward_hook(count)
    snn.simulate(x, [16])
    hook.remove()
    assert torch.all(per_channel[removed] == 0)
    assert float(per_channel.sum()) > 0


def test_fine_tuning_keeps_pruned_weights_at_zero() -> None:
    model = build()
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(4)]
    without, _ = prune(model, 0.5)
    tuned, summary = prune(model, 0.5, finetune_loader=data, finetune_epochs=1, progress=False)
    assert summary.finetune_epochs == 1
    zeros = without.conv2.weight == 0
    assert torch.all(tuned.conv2.weight[zeros] == 0)
    assert not torch.equal(tuned.conv2.weight[~zeros], without.conv2.weight[~zeros]), "fine-tuning changed nothing"
    assert sorted(tuned.state_dict()) == sorted(model.state_dict()), "pruning masks or renamed parameters left behind"


@pytest.mark.parametrize("amount, mode, message", [
    (0.0, "magnitude", "fraction in \\(0, 1\\)"), (1.0, "magnitude", "fraction in \\(0, 1\\)"),
    (0.5, "filters", "unknown pruning mode 'filters'")])
def test_bad_arguments(amount: float, mode: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prune(build(), amount, mode)


def test_fine_tuning_needs_data() -> None:
    with pytest.raises(ValueError, match="finetune_loader"):
        prune(build(), 0.5, finetune_epochs=1)


def test_command_line_reports_the_pruning(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", tmp_path / "dense"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", tmp_path / "pruned", "--prune", "0.7"))
    assert code == 0, err
    dense = json.loads((tmp_path / "dense" / "report.json").read_text())
    pruned = json.loads((tmp_path / "pruned" / "report.json").read_text())
    assert pruned["config"]["pruning"]["mode"] == "magnitude"
    assert abs(pruned["config"]["pruning"]["sparsity"] - 0.7) < 0.01
    assert pruned["synops_per_image"]["4"] < dense["synops_per_image"]["4"]
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", tmp_path / "bad", "--prune-mode", "channel"))
    assert code == 2 and "need --prune FRACTION" in err and not (tmp_path / "bad").exists()
