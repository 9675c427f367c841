from __future__ import annotations

import pytest
import torch
from torch import nn

from ann2snn.evaluation.synops import SynapticOperationCounter, fan_out
from ann2snn.runtime.layers import ChannelAffine, Scale


def brute_force_fan_out(layer: nn.Module, sample_shape: tuple[int, ...], weight_name: str = "weight") -> torch.Tensor:
    """Per input entry: how many outputs a one-hot input reaches, through the non-zero weights only."""
    masked = {weight_name: (getattr(layer, weight_name) != 0).float()}
    counts = torch.zeros(sample_shape).flatten()
    for index in range(counts.numel()):
        one_hot = torch.zeros(counts.numel())
        one_hot[index] = 1
        output = torch.func.functional_call(layer, masked, (one_hot.reshape(1, *sample_shape),))
        counts[index] = output.sum()
    return counts.reshape(sample_shape)


def without_bias(layer: nn.Module) -> nn.Module:
    layer.bias = None
    return layer


@pytest.mark.parametrize("layer, sample_shape", [
    (without_bias(nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 7, 7)),
    (without_bias(nn.Conv2d(4, 4, 3, padding=1, groups=4)), (4, 5, 5)),
    (without_bias(nn.Conv2d(2, 3, (3, 2), dilation=2, padding=(2, 0))), (2, 6, 6)),
    (without_bias(nn.Conv1d(2, 3, 3, padding=1)), (2, 6)),
    (without_bias(nn.Linear(6, 4)), (6,)),
    (without_bias(nn.Linear(6, 4)), (3, 6)),
])
def test_fan_out_matches_brute_force_and_ignores_zero_weights(layer: nn.Module, sample_shape: tuple[int, ...]) -> None:
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.1] = 0.0
    torch.testing.assert_close(fan_out(layer, sample_shape), brute_force_fan_out(layer, sample_shape))


def test_fan_out_is_exact_at_borders() -> None:
    # A 3x3 kernel with padding 1 on a 4x4 map: a corner feeds 4 positions, an edge 6, the inside 9.
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    fan = fan_out(conv, (1, 4, 4))[0]
    assert fan[0, 0] == 4 * 2 and fan[0, 1] == 6 * 2 and fan[1, 1] == 9 * 2


def test_one_to_one_synapses_have_fan_out_one() -> None:
    factor = torch.tensor([0.5, 0.0, 2.0]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(fan_out(Scale(factor), (3, 2, 2)), (factor != 0).float()[0].expand(3, 2, 2))
    affine = ChannelAffine(torch.tensor([1.0, 3.0]), torch.zeros(2))
    torch.testing.assert_close(fan_out(affine, (2, 4)), torch.ones(2, 4))


def test_fan_out_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="ReLU is not a synaptic layer"):
        fan_out(nn.ReLU(), (3,))


def test_event_driven_counting_per_time_step() -> None:
    linear = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        linear.weight[:, 0] = 0.0  # input 0 reaches nobody: its spikes cost nothing
    window = [0, 2]
    spikes = torch.tensor([[1.0, 1, 0, 0], [2, 0, 1, 0],    # step 0, samples 0 and 1
                           [0, 0, 0, 1], [1, 1, 1, 1]])     # step 1
    with SynapticOperationCounter(linear, event_driven=True, steps=4, window=lambda: tuple(window)) as counter:
        linear(spikes)
        window[:] = [2, 1]
        # step 2: graded events (non-integer: multiplied into the weights) and a silent row
        linear(torch.tensor([[0.5, 1.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        window[:] = [3, 1]
        linear(torch.tensor([[0.5, 0.1, -0.2, 0.3]]))  # step 3: an analog row costs the dense count
    # Each spike or event on inputs 1..3 reaches 3 outputs.
    assert counter.accumulates.tolist() == [3 * (1 + 1), 3 * (1 + 3), 0, 0]
    assert counter.multiply_accumulates.tolist() == [0, 0, 3, 9]


def test_dense_counting_counts_every_synapse_whatever_the_input() -> None:
    conv = nn.Conv2d(3, 8, 3, bias=False)  # no padding: every output sees a full 3x3x3 window
    with SynapticOperationCounter(conv, event_driven=False) as counter:
        conv(torch.zeros(5, 3, 10, 10))
    assert counter.multiply_accumulates.tolist() == [5 * 8 * 8 * 8 * 3 * 3 * 3]
    assert counter.accumulates.tolist() == [0]


def test_counters_remove_their_hooks_and_probing_is_not_counted() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with SynapticOperationCounter(model, event_driven=False) as first, \
            SynapticOperationCounter(model, event_driven=False) as second:
        model(torch.ones(1, 4))
    assert first.multiply_accumulates.tolist() == second.multiply_accumulates.tolist() == [16 + 8]
    assert all(not layer._forward_hooks for layer in model)
