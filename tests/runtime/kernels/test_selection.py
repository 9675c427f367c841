"""The network's `kernels` setting: checked, passed on to the neurons when simulating, and every setting
gives the same outputs and spike counts bit for bit."""
from __future__ import annotations

import pytest
import torch

import ann2snn
from ann2snn.runtime import kernels
from tests.networks import build, calibration


@pytest.mark.parametrize("neuron", ["if", "signed", "adaptive"])
def test_every_kernel_setting_gives_the_same_simulation(neuron: str) -> None:
    torch.manual_seed(0)
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=8, neuron=neuron)
    assert snn.kernels == kernels.DEFAULT_KERNELS
    x = torch.randn(4, 3, 8, 8)
    results = {}
    for setting in kernels.KERNELS:
        snn.kernels = setting
        results[setting] = snn.simulate(x, [3, 8])
        assert all(neuron.kernels == setting for neuron in snn.neurons.values()), "passed on to the neurons"
    reference = results["eager"]
    for setting, result in results.items():
        for T in (3, 8):
            assert torch.equal(result.outputs[T], reference.outputs[T]), setting
            assert all(torch.equal(result.spikes[T][name], reference.spikes[T][name]) for name in reference.spikes[T])


def test_streaming_steps_use_the_setting_too() -> None:
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4)
    snn.kernels = "eager"
    snn.reset()
    snn.step(torch.randn(2, 3, 8, 8))
    assert all(neuron.kernels == "eager" for neuron in snn.neurons.values())


def test_unknown_setting_is_refused() -> None:
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4)
    with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'native', 'compiled', 'eager'\), "
                                         r"got 'fast'"):
        snn.kernels = "fast"
    assert snn.kernels == kernels.DEFAULT_KERNELS
