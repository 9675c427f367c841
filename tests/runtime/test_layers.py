"""The spiking network's synaptic helpers: exact max pooling of spike trains and bias injection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann2snn.runtime.coding import ACCUMULATE, RATE
from ann2snn.runtime.layers import AddBias, SpikingMaxPool
from tests.helpers import run_in_chunks


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_spiking_max_pool_sums_to_max_of_sums_at_every_step(chunk: int) -> None:
    # signed spike trains (as signed neurons emit them), any prefix of time
    spikes = torch.randint(-1, 2, (16, 2, 3, 6, 6)).float()
    pool = SpikingMaxPool(nn.MaxPool2d(2, ceil_mode=True))
    out = run_in_chunks(pool, spikes, chunk)
    for t in range(1, 17):
        expected = F.max_pool2d(spikes[:t].sum(0), 2, ceil_mode=True)
        assert torch.equal(out[:t].sum(0), expected)


def test_rate_coded_max_pool_is_exact_where_max_over_spikes_overcounts() -> None:
    # binary spike trains of different rates: the time average of the pooled output must be the max
    # of the input rates; taking the max over spikes at each step overestimates it
    torch.manual_seed(0)
    T = 64
    rates = torch.rand(1, 4, 8, 8)
    spikes = (torch.rand(T, 1, 4, 8, 8) < rates).float()
    pool = SpikingMaxPool(nn.MaxPool2d(2))
    mean_out = run_in_chunks(pool, spikes, 8).mean(0)
    target = F.max_pool2d(spikes.mean(0), 2)
    naive = F.max_pool2d(spikes.flatten(0, 1), 2).reshape(T, 1, 4, 4, 4).mean(0)
    assert torch.allclose(mean_out, target, atol=1e-6)
    assert float((naive - target).mean()) > 0.05  # max over spikes fires too often


@pytest.mark.parametrize("coding", [RATE, ACCUMULATE])
def test_add_bias_injects_every_step_or_once(coding) -> None:
    bias = torch.tensor([1.0, -2.0, 0.5])
    injection = AddBias(bias, coding)
    zeros = torch.zeros(6, 2, 3, 4, 4)
    out = run_in_chunks(injection, zeros, 4)
    per_step = out.sum((1, 3, 4)) / (2 * 16)
    expected = bias.expand(6, 3).clone()
    if coding.inject_once:
        expected[1:] = 0
    assert torch.allclose(per_step, expected)
