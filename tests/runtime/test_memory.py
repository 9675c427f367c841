"""Memory planning: the chunk of time steps is chosen to fit a limit, a batch that cannot fit is refused
before anything is simulated, results do not depend on the chunking, and the report has the peak."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.runtime.memory import plan_chunk_size, simulation_footprint
from tests.helpers import digits_args, digits_checkpoint, randomize_bn, run_cli


def network(T: int = 64) -> ann2snn.SpikingNetwork:
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(16, 10))).eval()
    return ann2snn.convert(model, [torch.randn(16, 3, 16, 16)], qbits=3, T=T)


def test_footprint_is_per_sample_and_plans_fit_the_limit() -> None:
    snn = network()
    x = torch.randn(8, 3, 16, 16)
    footprint = simulation_footprint(snn, x)
    # one 16x16x16 float activation per sample and step at least; membranes of two such layers as state
    assert footprint.per_step >= 16 * 16 * 16 * 4 and footprint.state >= 2 * 16 * 16 * 16 * 4
    limit = footprint.bytes_for(8, 5) + 1
    chunk = plan_chunk_size(footprint, 8, limit, preferred=64)
    assert chunk == 5 and footprint.bytes_for(8, chunk) <= limit
    assert plan_chunk_size(footprint, 8, 10 * limit, preferred=3) == 3
    with pytest.raises(ValueError, match="use batches of at most"):
        plan_chunk_size(footprint, 8, footprint.bytes_for(4, 1), preferred=64)


def test_chunking_does_not_change_the_results_and_the_peak_is_reported() -> None:
    snn = network()
    x, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    free = ann2snn.evaluate(snn, [(x, labels)], [16, 64])
    footprint = simulation_footprint(snn, x)
    tight = ann2snn.evaluate(snn, [(x, labels)], [16, 64], max_memory=footprint.bytes_for(8, 2))
    assert tight.timing["chunk_size"] == 2 < free.timing["chunk_size"]
    assert tight.accuracy_snn == free.accuracy_snn and tight.spikes_per_image == free.spikes_per_image
    assert tight.timing["peak_memory_mb"] is not None and tight.timing["peak_memory_mb"] > 0


def test_a_batch_too_large_for_the_limit_fails_before_any_output(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", tmp_path / "out", "--max-memory", "0.001"))
    assert code == 1 and "more than the memory limit of 0.0 MiB" in err and "--batch-size" in err
    assert not (tmp_path / "out").exists()
