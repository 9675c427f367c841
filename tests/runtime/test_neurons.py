"""Spiking neurons: IF rate convergence, the signed neuron's exact QCFS level, the adaptive neuron's rate code."""
from __future__ import annotations

import json

import pytest
import torch

import ann2snn
from ann2snn.runtime import kernels as step_kernels
from ann2snn.runtime import neurons
from ann2snn.runtime.kernels.compiled import CompiledSteps
from ann2snn.runtime.neurons import AdaptiveNeuron, IFNeuron, SignedNeuron
from tests.helpers import assert_one_line_error, digits_args, digits_checkpoint, run_cli
from tests.networks import build, calibration


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
@pytest.mark.parametrize("symmetric", [False, True])
def test_signed_neuron_settles_on_qcfs_level(levels: int, k: int, dtype: torch.dtype, symmetric: bool) -> None:
    generator = torch.Generator().manual_seed(levels * 10 + k)
    th = torch.tensor(0.7, dtype=dtype)
    lowest = -levels if symmetric else 0
    z = ((torch.rand(16, 32, generator=generator) * 1.4 - 0.2) * (levels - lowest) + lowest) * th
    z = z.to(dtype)
    currents = [c.to(dtype) for c in _random_split(z, 6, generator)]
    assert any(bool((c < 0).any()) for c in currents)
    currents += [torch.zeros_like(z)] * (2 * (levels - lowest) + 6)

    neuron = SignedNeuron(th, levels, max_spikes_per_step=k, symmetric=symmetric)
    running = torch.zeros_like(z)
    for t, current in enumerate(currents):
        neuron.set_window(t, 1)
        s = neuron(current)
        assert s.abs().max() <= k
        running += s
        assert running.min() >= lowest and running.max() <= levels
        torch.testing.assert_close(neuron.count, running, rtol=0, atol=0)
    expected = torch.clamp(torch.floor(z / th + 0.5), lowest, levels)
    torch.testing.assert_close(neuron.count, expected, rtol=0, atol=0)
    assert s.abs().max() == 0  # settled
    # the test exercises both clips and the inside
    assert (expected == lowest).any() and (expected == levels).any() and lowest < float(expected.mean()) < levels


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


def with_kernels(neuron, kernels: str):
    neuron.kernels = kernels
    return neuron


def large_layer_neuron(cls, threshold: torch.Tensor):
    if cls is SignedNeuron:
        return SignedNeuron(threshold, levels=7)
    return AdaptiveNeuron(threshold, adapt_increase=0.3, adapt_decay=0.7) if cls is AdaptiveNeuron else cls(threshold)


@pytest.mark.parametrize("cls", [IFNeuron, SignedNeuron, AdaptiveNeuron])
def test_a_fused_kernel_that_fails_falls_back_to_the_same_spikes(cls, monkeypatch) -> None:
    """A layer large enough for a fused kernel, whose compilation fails: the eager steps give the spikes
    they give without fusion, and the failure is a warning."""
    torch.manual_seed(0)
    threshold = torch.rand(1, 8, 1, 1) + 0.5
    make = lambda kernels: with_kernels(large_layer_neuron(cls, threshold), kernels)  # noqa: E731
    currents = torch.randn(6, 4, 8, 32, 32)  # 8192 neurons per sample, 32768 per step
    expected = run_folded(make("eager"), currents)

    class FailingCompilations(CompiledSteps):
        def get(self, step, key):
            def compiled(*args):
                raise RuntimeError("compilation failed")
            return compiled

    monkeypatch.setattr(step_kernels, "unavailable", lambda device_type: None)
    # (its own cache: the failure it records must not disable later tests' kernels)
    monkeypatch.setattr(step_kernels, "COMPILED_STEPS", FailingCompilations())
    with pytest.warns(RuntimeWarning, match="fused neuron kernel unavailable"):
        assert torch.equal(run_folded(make("compiled"), currents), expected)


# ---------------------------------------------------------------------------------------------------
# Adaptive threshold


@pytest.mark.parametrize("k", [1, 3])
def test_adaptive_neuron_without_increase_is_the_if_neuron(k: int) -> None:
    torch.manual_seed(4)
    threshold = torch.rand(1, 5) + 0.3
    currents = torch.randn(50, 4, 5) * threshold * 1.5
    adaptive = AdaptiveNeuron(threshold, max_spikes_per_step=k, adapt_increase=0.0, adapt_decay=0.8)
    reference = IFNeuron(threshold, max_spikes_per_step=k)
    assert torch.equal(run_folded(adaptive, currents), run_folded(reference, currents))
    assert torch.equal(adaptive.v, reference.v) and torch.equal(adaptive.spike_count, reference.spike_count)


@pytest.mark.parametrize("increase, decay", [(0.1, 0.5), (0.5, 0.9)])
def test_adaptive_neuron_keeps_the_if_rate_with_fewer_spikes(increase: float, decay: float) -> None:
    """Constant input z below the threshold: every spike carries the threshold it crossed, so the output's
    time average is z / v_threshold up to the membrane left at the end, which the highest threshold
    bounds: |rate - z / v_threshold| <= (a_max + 1/2) / T, a_max = increase / (1 - decay)."""
    generator = torch.Generator().manual_seed(5)
    threshold = torch.rand(1, 6, generator=generator) + 0.5
    z = (torch.rand(40, 6, generator=generator) * 1.1 - 0.1) * threshold  # a few negative
    T = 500
    adaptive, reference = AdaptiveNeuron(threshold, adapt_increase=increase, adapt_decay=decay), IFNeuron(threshold)
    output = run_folded(adaptive, z.expand(T, *z.shape))
    if_spikes = run_folded(reference, z.expand(T, *z.shape))
    largest_adaptation = increase / (1 - decay)
    expected = torch.clamp(z / threshold, 0, 1)
    assert float((output.mean(0) - expected).abs().max()) <= (largest_adaptation + 0.5) / T
    assert float((output.mean(0) - if_spikes.mean(0)).abs().max()) <= (largest_adaptation + 1) / T
    # spikes are events: binary, each sending at least one threshold; the counts count the events
    events = (output != 0).to(output.dtype)
    assert float(output[output != 0].min()) >= 1.0 and float(output.max()) > 1.0
    torch.testing.assert_close(adaptive.spike_count, events.sum(0).sum(1), rtol=0, atol=0)
    torch.testing.assert_close(adaptive.activity, events.sum(2)[-T:], rtol=0, atol=0)
    fewer = 1 - float(adaptive.spike_count.sum() / reference.spike_count.sum())
    assert fewer > (0.05 if increase < 0.5 else 0.3)


def test_adaptive_neuron_chunks_and_bursts() -> None:
    torch.manual_seed(6)
    threshold = torch.tensor(0.6)
    currents = torch.rand(40, 3, 7) * 2.5
    single = torch.stack(run_steps(AdaptiveNeuron(threshold, max_spikes_per_step=3), list(currents)))
    neuron, chunks, t = AdaptiveNeuron(threshold, max_spikes_per_step=3), [], 0
    for size in (1, 9, 30):
        chunks.append(run_folded(neuron, currents[t:t + size], t))
        t += size
    assert torch.equal(torch.cat(chunks), single)
    assert float(neuron.spike_count.sum()) > float(neuron.v.numel() * 40)  # bursts of several spikes happened


def test_adaptive_options_are_checked() -> None:
    with pytest.raises(ValueError, match="adapt_increase must be >= 0, got -0.1"):
        AdaptiveNeuron(torch.tensor(1.0), adapt_increase=-0.1)
    for decay in (1.0, -0.5):
        with pytest.raises(ValueError, match=rf"adapt_decay must be in \[0, 1\), got {decay}"):
            AdaptiveNeuron(torch.tensor(1.0), adapt_decay=decay)


def test_adaptive_network_against_the_if_network() -> None:
    """A converted CNN: the adaptive network spends fewer spikes and stays near the IF network. It does not
    converge to it: a spike carries up to 1 + increase / (1 - decay) thresholds, so a neuron driven above
    its threshold passes more than the IF neuron's clipped rate of one threshold per step. Measured
    (8 images, relative to the QANN's largest output, increase 0.1, decay 0.5): 0.27 at T=64 and at
    T=1024, 3.7 % fewer spikes; increase 0 gives the IF network exactly."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    # uncalibrated, as convert_qann's networks below (the SNN calibration would fit each to its own neurons)
    reference = ann2snn.convert(build(), calibration(), qbits=3, T=64, snn_calibration="none")
    with torch.no_grad():
        scale = float(reference.qann(x).abs().max())
    expected = reference.simulate(x, [64])
    adaptive = ann2snn.convert_qann(reference.qann, T=64, neuron="adaptive",
                                    neuron_options={"adapt_increase": 0.1, "adapt_decay": 0.5})
    result = adaptive.simulate(x, [64])
    assert float((result.outputs[64] - expected.outputs[64]).abs().max()) / scale <= 0.4
    spikes = {name: float(sum(count.sum() for count in run.spikes[64].values())) for name, run in
              (("adaptive", result), ("if", expected))}
    assert spikes["adaptive"] < 0.98 * spikes["if"]
    assert adaptive.config["neuron_options"] == {"adapt_increase": 0.1, "adapt_decay": 0.5}
    without_increase = ann2snn.convert_qann(reference.qann, T=64, neuron="adaptive",
                                            neuron_options={"adapt_increase": 0.0})
    assert torch.equal(without_increase.simulate(x, [64]).outputs[64], expected.outputs[64])


def test_adaptive_fused_kernel_gives_the_eager_spikes(monkeypatch) -> None:
    """The compiled step of a large layer runs the same float operations as the eager one: the same output,
    membrane, adaptation and spike counts bit for bit."""
    reason = step_kernels.unavailable("cpu")
    if reason is not None:
        pytest.skip(f"no fused kernels here: {reason}")
    compiled_steps = CompiledSteps()  # a kernel another test marked as failed is tried again
    monkeypatch.setattr(step_kernels, "COMPILED_STEPS", compiled_steps)
    torch.manual_seed(7)
    threshold = torch.rand(1, 8, 1, 1) + 0.5
    currents = torch.randn(6, 4, 8, 32, 32)  # 8192 neurons per sample, 32768 per step: above FUSED_MIN_ELEMENTS
    runs = {}
    for kernels in ("eager", "auto"):
        neuron = with_kernels(large_layer_neuron(AdaptiveNeuron, threshold), kernels)
        runs[kernels] = run_folded(neuron, currents), neuron
    assert any(key[0] is neurons.adaptive_integrate_and_fire for key in compiled_steps.compiled_keys()), \
        "the fused kernel was not used"
    (eager, reference), (fused, neuron) = runs["eager"], runs["auto"]
    assert torch.equal(fused, eager)
    for name in ("v", "adaptation", "spike_count"):
        assert torch.equal(getattr(neuron, name), getattr(reference, name)), name


def test_cli_adaptive_neuron(capsys, tmp_path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    out = tmp_path / "adaptive"
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--neuron", "adaptive", "--adapt-increase", "0.2",
                                                "--out", out))
    assert code == 0, err
    config = json.loads((out / "report.json").read_text())["config"]
    assert config["neuron"] == "adaptive"
    assert config["neuron_options"] == {"adapt_increase": 0.2, "adapt_decay": neurons.DEFAULT_ADAPT_DECAY}
    assert all(isinstance(neuron, AdaptiveNeuron) and neuron.adapt_increase == 0.2
               for neuron in ann2snn.load(out / "snn.pt").neurons.values())

    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--adapt-decay", "0.5", "--out", tmp_path / "if"))
    assert_one_line_error(code, err, 2, "--neuron adaptive", "not of --neuron if")
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--neuron", "adaptive", "--adapt-decay", "1",
                                                "--out", tmp_path / "bad"))
    assert_one_line_error(code, err, 2, "--adapt-decay", "a decay factor in [0, 1)", "'1'")
