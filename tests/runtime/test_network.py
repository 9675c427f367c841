"""SpikingNetwork: chunked simulation, streaming, several T per run, and exact equivalence of signed SNNs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.runtime import network
from ann2snn.runtime.neurons import IFNeuron, SignedNeuron
from tests.helpers import assert_rel_close
from tests.networks import build, calibration, cnn


@pytest.fixture(scope="module")
def snns():
    """One converted network per neuron kind, 2 bits: the signed one per layer, the if one with the default 0/1
    recipe (thresholds per channel for 16 steps, SNN calibration, the read-out over the second half)."""
    model = build()
    return {kind: ann2snn.convert(model, calibration(), qbits=2, T=16, neuron=kind) for kind in ("if", "signed")}


@pytest.mark.parametrize("kind", ["if", "signed"])
def test_simulate_equals_single_step_loop(snns, kind: str) -> None:
    snn = snns[kind]
    assert snn.coding == ("rate" if kind == "if" else "accumulate")
    assert all(isinstance(n, IFNeuron if kind == "if" else SignedNeuron) for n in snn.neurons.values())
    T = 16
    x = torch.randn(3, 3, 8, 8)
    simulated = snn.simulate(x, [T]).outputs[T]
    snn.reset()
    steps = [snn.step(snn.encode_step(x, t)) for t in range(T)]
    start = snn.readout_start(T)
    assert start == (T // 2 if kind == "if" else 0)
    looped = sum(steps[start:])
    if kind == "if":
        looped = looped / (T - start)
    assert float(simulated.abs().max()) > 0
    assert_rel_close(simulated, looped)
    # forward is the same simulation
    assert_rel_close(snn(x), simulated)


@pytest.mark.parametrize("kind", ["if", "signed"])
def test_chunk_sizes_give_identical_results(snns, kind: str) -> None:
    snn = snns[kind]
    T = 16
    x = torch.randn(4, 3, 8, 8)
    results = {c: snn.simulate(x, [T], chunk_size=c) for c in (1, 3, T)}
    for c in (1, 3):
        assert_rel_close(results[c].outputs[T], results[T].outputs[T], rel=1e-6)
        for name, count in results[T].spikes[T].items():
            torch.testing.assert_close(results[c].spikes[T][name], count, rtol=0, atol=0)
    assert results[3].steps_simulated == T


@pytest.mark.parametrize("kind", ["if", "signed"])
def test_several_T_in_one_run(snns, kind: str) -> None:
    snn = snns[kind]
    x = torch.randn(3, 3, 8, 8)
    together = snn.simulate(x, [16, 4, 8])
    assert sorted(together.outputs) == [4, 8, 16]
    for T in (4, 8, 16):
        alone = snn.simulate(x, [T])
        assert_rel_close(together.outputs[T], alone.outputs[T], rel=1e-6)
        for name, count in alone.spikes[T].items():
            torch.testing.assert_close(together.spikes[T][name], count, rtol=0, atol=0)
    # spike counts only grow with T
    for name in together.spikes[4]:
        assert (together.spikes[8][name] >= together.spikes[4][name]).all()


@pytest.mark.parametrize("layout", ["channels-last on CPU", "NCHW"])
def test_simulation_layout(layout: str, monkeypatch) -> None:
    """On CPU the body runs channels-last (oneDNN convolves without reorders): after a simulation the
    convolution weights and the membranes are channels-last, and the signed network still reproduces its
    QANN in either layout; where no layout is set for the device, everything stays NCHW."""
    if layout == "NCHW":
        monkeypatch.setattr(network, "SIMULATION_MEMORY_FORMAT", {})
    expected_format = torch.channels_last if layout != "NCHW" else torch.contiguous_format
    snn = ann2snn.convert(build(2), calibration(2), qbits=3, T=64, neuron="signed")
    x = torch.randn(5, 3, 8, 8)
    result = snn.simulate(x, [64], stop_when_quiet=True)
    assert_rel_close(result.outputs[64], snn.qann(x))
    convolutions = [m for m in snn.body.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=expected_format) for m in convolutions)
    membranes = [n.v for n in snn.neurons.values() if n.v.dim() == 4]
    assert membranes and all(v.is_contiguous(memory_format=expected_format) for v in membranes)
    assert x.is_contiguous(), "the caller's tensor is left as it was"


@pytest.mark.parametrize("qbits, k", [(1, 1), (2, 1), (4, 1), (4, 4), (8, 1), (8, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_signed_snn_equals_qann(qbits: int, k: int, seed: int) -> None:
    per_channel = seed == 1
    T = 1200
    snn = ann2snn.convert(build(seed), calibration(seed), qbits=qbits, T=T, neuron="signed",
                          per_channel=per_channel, max_spikes_per_step=k, threshold_rule="max" if seed else "mse")
    x = torch.randn(4, 3, 8, 8)
    result = snn.simulate(x, [T], stop_when_quiet=True, chunk_size=16)
    assert int(result.steps_used.max()) < T  # it settled
    expected = snn.qann(x).detach()
    assert float(expected.std(0).mean()) > 0.1 * float(expected.abs().mean())  # input-dependent
    assert_rel_close(result.outputs[T], expected)
    # every neuron layer was active
    assert all(float(count.sum()) > 0 for count in result.spikes[T].values())


def test_stop_when_quiet_same_output_and_steps_used() -> None:
    snn = ann2snn.convert(build(2), calibration(2), qbits=3, T=200, neuron="signed")
    x = torch.randn(5, 3, 8, 8)
    full = snn.simulate(x, [200])
    quiet = snn.simulate(x, [50, 200], stop_when_quiet=True)
    assert_rel_close(quiet.outputs[200], full.outputs[200], rel=1e-6)
    used = quiet.steps_used
    assert used.shape == (5,) and (used >= 1).all() and (used <= 200).all()
    # it stopped early: at most one chunk (default 4 steps) after the last sample went quiet
    assert int(used.max()) <= quiet.steps_simulated < min(200, int(used.max()) + 4)
    assert int(used.max()) <= 50
    assert_rel_close(quiet.outputs[50], full.outputs[200], rel=1e-6)
    # each sample's output is final after its steps_used steps
    for i in range(5):
        alone = snn.simulate(x[i:i + 1], [int(used[i])]).outputs[int(used[i])]
        assert_rel_close(alone[0], full.outputs[200][i], rel=1e-6)


def test_stop_when_quiet_needs_accumulate_coding(snns) -> None:
    with pytest.raises(ValueError, match="stop_when_quiet"):
        snns["if"].simulate(torch.randn(1, 3, 8, 8), stop_when_quiet=True)


@pytest.mark.parametrize("qbits", [1, 2, 3])
def test_if_network_with_one_hidden_layer_is_exact_at_T_equal_levels(qbits: int) -> None:
    # with a constant input current an IF neuron starting at half threshold has fired exactly
    # floor(T z / theta + 1/2) (clipped to [0, T]) times after T steps: at T = L the QCFS level
    torch.manual_seed(qbits)
    model = cnn(3, [5], 5 * 36, 4, padding=0, batchnorm=False).eval()
    L = 2 ** qbits - 1
    snn = ann2snn.convert(model, calibration(), qbits=qbits, T=L, neuron="if", threshold_rule="max",
                          threshold_levels="bits", per_channel=False, snn_calibration="none", readout_delay=0.0)
    x = torch.randn(6, 3, 8, 8)
    assert_rel_close(snn(x), snn.qann(x))


def test_invalid_arguments(snns) -> None:
    snn = snns["signed"]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="time steps"):
            snn.simulate(torch.randn(1, 3, 8, 8), [bad])
    with pytest.raises(ValueError, match="coding"):
        ann2snn.SpikingNetwork(snn.body, 4, "temporal")
    with pytest.raises(ValueError, match="a read-out delay needs rate coding: accumulate coding sums every step"):
        ann2snn.SpikingNetwork(snn.body, 4, "accumulate", readout_delay=0.5)
    for bad in (1.0, -0.5, "half"):
        with pytest.raises(ValueError, match="fraction of T in"):
            ann2snn.SpikingNetwork(snns["if"].body, 4, "rate", readout_delay=bad)
    with pytest.raises(ValueError):
        ann2snn.convert(build(), calibration(), qbits=2, T=0)
