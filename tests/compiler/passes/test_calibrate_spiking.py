"""Pass 11 (calibrate_spiking): after light calibration each neuron layer's mean rate matches, per channel, the
clipped ANN activation it stands for; the currents land in the feeding layers' biases or in AddBias
injections, and the graph computes what the calibration simulated."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

import ann2snn
from ann2snn.compiler.passes import calibrate_spiking
from ann2snn.compiler.passes.calibrate_spiking import fired_rates, reference_rates
from ann2snn.errors import ConversionWarning
from ann2snn.runtime.layers import AddBias
from ann2snn.runtime.network import SpikingNetwork
from tests import networks

T = 16


def layer_rates(snn: SpikingNetwork, x: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Each neuron layer's channel-mean rate (spikes per step) when x is simulated for `steps` steps."""
    rates = {}

    def record(name, neuron, args):
        folded = args[0]
        rates[name] = fired_rates(neuron, folded.reshape((steps, -1) + tuple(folded.shape[1:])))

    hooks = [neuron.register_forward_pre_hook(lambda m, args, name=name: record(name, m, args))
             for name, neuron in snn.neurons.items()]
    try:
        snn.run_all_steps(x, steps)
    finally:
        for hook in hooks:
            hook.remove()
    return rates


def rate_errors(snn: SpikingNetwork, x: torch.Tensor) -> torch.Tensor:
    references = reference_rates(snn.qann, x)
    rates = layer_rates(snn, x, T)
    return torch.cat([(rates[name] - references[name]).abs() for name in references])


@pytest.fixture(scope="module")
def model():
    return networks.build(3)


# DataMovementNet (chunk, shuffle) misses the 3x reduction: open, see issue 19
@pytest.mark.parametrize("network", [networks.MixNet, networks.ResidualNet])
def test_light_calibration_matches_each_layers_mean_rate_to_the_ann(network) -> None:
    model = networks.build(1, network)
    batches = networks.calibration()
    x = torch.cat(batches)
    before = rate_errors(ann2snn.convert(model, batches, T=T, snn_calibration="none"), x)
    after = rate_errors(ann2snn.convert(model, batches, T=T, snn_calibration="bias", snn_calibration_images=len(x)),
                        x)
    # Corrected layer by layer, each channel's mean rate is within a few hundredths of a spike per step of the
    # ANN's (a first-order step onto a staircase: the rate moves in steps of 1/T per neuron)
    assert after.max() < 0.05, after.max()
    assert after.mean() < before.mean() / 3, (after.mean(), before.mean())


def test_currents_go_into_feeding_biases_or_injections(model) -> None:
    batches = networks.calibration()
    plain = ann2snn.convert(model, batches, T=T, snn_calibration="none")
    calibrated = ann2snn.convert(model, batches, T=T, snn_calibration="bias")

    def injections(snn):
        return [name for part in (snn.prefix, snn.body) for name, m in part.named_modules() if isinstance(m, AddBias)]

    def biases(snn):
        return {name: p for part in (snn.prefix, snn.body) for name, p in part.named_parameters()
                if name.endswith("bias")}

    # MixNet's `relu6(dw(x) * 2)` is fed by a multiplication, which has no bias: it gets an injection. The
    # other neurons are fed by conv1 (in the static prefix), conv3 (through the residual add), conv4 and fc1.
    assert injections(plain) == [] and injections(calibrated) == ["relu6_calibration"]
    changed = {name for name, bias in biases(calibrated).items() if not torch.equal(bias, biases(plain)[name])}
    assert changed == {"conv1.bias", "conv3.bias", "conv4.bias", "fc1.bias"}


def test_no_calibration_leaves_the_graph_as_balancing_made_it(model) -> None:
    batches = networks.calibration()
    snn = ann2snn.convert(model, batches, T=T, snn_calibration="none", threshold_levels="bits")
    assert ann2snn.ConversionConfig().calibration.method == "none"  # opt-in: the default network is unchanged
    reference = ann2snn.convert_qann(ann2snn.quantize(model, batches), T=T)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(snn(x), reference(x), rtol=0, atol=0)
    gm = copy.deepcopy(snn.body)
    assert calibrate_spiking(gm, x, snn.qann, T, method="none") is gm


def test_thresholds_are_chosen_for_the_steps_of_rate_coded_neurons(model) -> None:
    batches = networks.calibration()
    for T_steps, bits in ((7, 3), (15, 4)):
        by_steps = ann2snn.quantize(model, batches, ann2snn.ConversionConfig.from_dict(
            {"T": T_steps, "qbits": 2, "threshold_levels": "steps"}))
        by_bits = ann2snn.quantize(model, batches, bits)
        def thresholds(qann):
            return {name: float(buffer) for name, buffer in qann.named_buffers() if name.endswith("theta")}
        assert thresholds(by_steps) == thresholds(by_bits)
        assert by_steps.get_submodule("relu").levels == 3
    signed = ann2snn.ConversionConfig.from_dict({"T": 7, "neuron": "signed"})
    assert signed.threshold_levels is None


def test_unknown_method_is_refused_by_name(model) -> None:
    with pytest.raises(ValueError, match="unknown SNN calibration 'fancy'"):
        ann2snn.ConversionConfig.from_dict({"snn_calibration": "fancy"})
    with pytest.raises(ValueError, match="unknown SNN calibration 'fancy'"):
        calibrate_spiking(copy.deepcopy(ann2snn.convert(model, networks.calibration(), T=T).body),
                          torch.randn(2, 3, 8, 8), None, T, method="fancy")


def test_a_simulation_too_large_to_hold_is_skipped_with_a_warning(model, monkeypatch) -> None:
    module = importlib.import_module("ann2snn.compiler.passes.calibrate_spiking")
    monkeypatch.setattr(module, "CALIBRATION_WORKING_SET", 1024)
    batches = networks.calibration()
    with pytest.warns(ConversionWarning, match="SNN calibration skipped"):
        calibrated = ann2snn.convert(model, batches, T=T, snn_calibration="bias")
    plain = ann2snn.convert(model, batches, T=T)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(calibrated(x), plain(x), rtol=0, atol=0)
