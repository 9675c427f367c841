"""Spiking neurons: IF rate convergence and the signed neuron's exact QCFS level."""
from __future__ import annotations

import pytest
import torch

from ann2snn import neurons
from ann2snn.neurons import IFNeuron, SignedNeuron


def run_steps(neuron, currents: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feed one current per time step (window of one step each); return the spikes of each step."""
    out = []
    for t, current in enumerate(currents):
        neuron.set_window(t, 1)
        out.append(neuron(current))
    return out


def run_folded(neuron, currents: torch.Tensor, t0: int = 0) -> torch.Tensor:
    """Feed [steps, batch, ...] currents in one multi-step call; return spikes [steps, batch, ...]."""
    steps = currents.shape[0]
    neuron.set_window(t0, steps)
    return neuron(currents.flatten(0, 1)).reshape(currents.shape)


@pytest.mark.parametrize("per_channel", [False, True])
def test_if_rate_converges_to_clipped_ratio(per_channel: bool) -> None:
    torch.manual_seed(0)
    th = torch.rand(1, 6) + 0.5 if per_channel else torch.tensor(0.8)
    z = (torch.rand(4, 6) * 1.6 - 0.3) * th  # below 0, inside [0, th] and above th
    neuron = IFNeuron(th)
    steps = 1000
    spikes = run_folded(neuron, z.expand(steps, 4, 6))
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    rate = spikes.mean(0)
    expected = torch.clamp(z / th, 0, 1)
    assert float((rate - expected).abs().max()) <= 1 / steps
    # the bookkeeping counts every spike of every sample
    torch.testing.assert_close(neuron.spike_count, spikes.sum(0).sum(1))


def test_if_chunked_equals_single_steps() -> None:
    torch.manual_seed(1)
    th = torch.tensor(1.3)
    currents = torch.randn(37, 3, 5)
    single = torch.stack(run_steps(IFNeuron(th), list(currents)))
    neuron, chunks, t = IFNeuron(th), [], 0
    for size in (1, 5, 7, 24):
        chunks.append(run_folded(neuron, currents[t:t + size], t))
        t += size
    torch.testing.assert_close(torch.cat(chunks), single, rtol=0, atol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_if_max_spikes_per_step(k: int) -> None:
    torch.manual_seed(2)
    th = torch.tensor(0.5)
    z = torch.rand(3, 8) * 2.5  # up to 5 thresholds per step
    neuron = IFNeuron(th, max_spikes_per_step=k)
    spikes = run_folded(neuron, z.expand(400, 3, 8))
    assert spikes.min() >= 0 and spikes.max() <= k
    assert spikes.max() == k
    assert float((spikes.mean(0) - torch.clamp(z / th, 0, k)).abs().max()) <= 1 / 400


def _random_split(z: torch.Tensor, parts: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`parts` currents (some negative) that sum to z."""
    pieces = [torch.randn(z.shape, generator=generator) * z.abs().mean() * 2 for _ in range(parts - 1)]
    pieces.append(z - sum(pieces))
    return pieces


@pytest.mark.parametrize("levels", [1, 3, 15])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_neuron_settles_on_qcfs_level(levels: int, k: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(levels * 10 + k)
    th = torch.tensor(0.7, dtype=dtype)
    z = ((torch.rand(16, 32, generator=generator) * 1.4 - 0.2) * levels * th).to(dtype)
    currents = [c.to(dtype) for c in _random_split(z, 6, generator)]
    assert any(bool((c < 0).any()) for c in currents)
    currents += [torch.zeros_like(z)] * (2 * levels + 6)

    neuron = SignedNeuron(th, levels, max_spikes_per_step=k)
    running = torch.zeros_like(z)
    for t, current in enumerate(currents):
        neuron.set_window(t, 1)
        s = neuron(current)
        assert s.abs().max() <= k
        running += s
        assert running.min() >= 0 and running.max() <= levels
        torch.testing.assert_close(neuron.count, running, rtol=0, atol=0)
    expected = torch.clamp(torch.floor(z / th + 0.5), 0, levels)
    torch.testing.assert_close(neuron.count, expected, rtol=0, atol=0)
    assert s.abs().max() == 0  # settled
    assert 0 < float(expected.mean()) < levels  # the test exercises both clips and the inside


def test_signed_neuron_per_channel_threshold_folded_steps() -> None:
    generator = torch.Generator().manual_seed(5)
    th = torch.rand(1, 4, 1, 1, generator=generator) + 0.2
    levels = 7
    z = torch.randn(2, 4, 3, 3, generator=generator) * 3
    currents = torch.stack(_random_split(z, 4, generator) + [torch.zeros_like(z)] * 12)
    neuron = SignedNeuron(th, levels)
    spikes = run_folded(neuron, currents)
    torch.testing.assert_close(neuron.count, torch.clamp(torch.floor(z / th + 0.5), 0, levels), rtol=0, atol=0)
    torch.testing.assert_close(spikes.sum(0), neuron.count, rtol=0, atol=0)
    torch.testing.assert_close(neuron.spike_count, spikes.abs().sum(0).flatten(1).sum(1))


@pytest.mark.parametrize("cls", [IFNeuron, SignedNeuron])
def test_reset_clears_state(cls) -> None:
    torch.manual_seed(3)
    make = (lambda: cls(torch.tensor(0.4))) if cls is IFNeuron else (lambda: cls(torch.tensor(0.4), 5))
    currents = torch.randn(9, 2, 3)
    neuron = make()
    first = run_folded(neuron, currents)
    assert neuron.v is not None and neuron.spike_count is not None
    neuron.reset()
    assert neuron.v is None and neuron.spike_count is None and neuron.activity is None
    if cls is SignedNeuron:
        assert neuron.count is None
    again = run_folded(neuron, currents)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(again, run_folded(make(), currents), rtol=0, atol=0)
    # without reset the state carries over and the response differs
    assert not torch.equal(run_folded(neuron, currents), first)


def test_invalid_max_spikes_per_step() -> None:
    with pytest.raises(ValueError, match="max_spikes_per_step"):
        IFNeuron(torch.tensor(1.0), max_spikes_per_step=0)


@pytest.mark.parametrize("cls", [IFNeuron, SignedNeuron])
def test_a_fused_kernel_that_fails_falls_back_to_the_same_spikes(cls, monkeypatch) -> None:
    """A layer large enough for a fused kernel, whose compilation fails: the eager steps give the spikes
    they give without fusion, and the failure is a warning."""
    torch.manual_seed(0)
    threshold = torch.rand(1, 8, 1, 1) + 0.5
    make = (lambda: IFNeuron(threshold)) if cls is IFNeuron else (lambda: SignedNeuron(threshold, levels=7))
    currents = torch.randn(6, 4, 8, 32, 32)  # 8192 neurons per sample, 32768 per step
    monkeypatch.setenv(neurons.FUSED_ENV_VAR, "0")
    expected = run_folded(make(), currents)

    def failing_compilation(key):
        def compiled(*args):
            raise RuntimeError("compilation failed")
        return compiled

    monkeypatch.setenv(neurons.FUSED_ENV_VAR, "1")
    monkeypatch.setattr(neurons, "_fusion_unavailable", lambda device: None)
    monkeypatch.setattr(neurons, "_compiled_step", failing_compilation)
    with pytest.warns(RuntimeWarning, match="fused neuron kernel unavailable"):
        assert torch.equal(run_folded(make(), currents), expected)
