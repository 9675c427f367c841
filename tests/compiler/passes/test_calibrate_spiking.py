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
from ann2snn.compiler.passes.calibrate_spiking import (
    LayerUnderCalibration,
    channel_means,
    fit_weights,
    membrane_at,
    reference_rates,
    window_rates,
)
from ann2snn.errors import ConversionWarning
from ann2snn.runtime.layers import AddBias
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neurons import IFNeuron
from tests import networks

T = 16


def neuron_rates(snn: SpikingNetwork, x: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Each neuron's rate (spikes per step, per image) when x is simulated for `steps` steps, over the steps the
    network's read-out counts, by neuron layer."""
    rates = {}

    def record(name, neuron, args):
        folded = args[0]
        currents = folded.reshape((steps, -1) + tuple(folded.shape[1:]))
        neuron.reset()
        neuron.load_state(neuron.initial_state(currents[0]))
        rates[name] = neuron.multi_step_forward(currents, 0)[snn.readout_start(steps):].mean(0)
        neuron.reset()

    hooks = [neuron.register_forward_pre_hook(lambda m, args, name=name: record(name, m, args))
             for name, neuron in snn.neurons.items()]
    try:
        snn.run_all_steps(x, steps)
    finally:
        for hook in hooks:
            hook.remove()
    return rates


def rate_errors(snn: SpikingNetwork, x: torch.Tensor) -> torch.Tensor:
    """Per layer and channel, how far the mean rate is from the clipped ANN activation's."""
    references = reference_rates(snn.qann, x)
    rates = neuron_rates(snn, x, T)
    return torch.cat([(channel_means(rates[name]) - references[name]).abs() for name in references])


def neuron_rate_errors(snn: SpikingNetwork, x: torch.Tensor) -> float:
    """The mean square difference between each neuron's rate and the clipped ANN activation it stands for, per
    image, summed over layers."""
    references = reference_rates(snn.qann, x, per_neuron=True)
    rates = neuron_rates(snn, x, T)
    return sum(float(((rates[name] - reference) ** 2).mean()) for name, reference in references.items())


@pytest.fixture(scope="module")
def model():
    return networks.build(3)


# DataMovementNet (chunk, shuffle) misses the 3x reduction: open, see issue 19
@pytest.mark.parametrize("readout_delay", [0.0, 0.5])
@pytest.mark.parametrize("network", [networks.MixNet, networks.ResidualNet])
def test_light_calibration_matches_each_layers_mean_rate_to_the_ann(network, readout_delay) -> None:
    model = networks.build(1, network)
    batches = networks.calibration()
    x = torch.cat(batches)
    settings = {"T": T, "readout_delay": readout_delay}
    before = rate_errors(ann2snn.convert(model, batches, snn_calibration="none", **settings), x)
    after = rate_errors(ann2snn.convert(model, batches, snn_calibration="bias", snn_calibration_images=len(x),
                                        **settings), x)
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
    snn = ann2snn.convert(model, batches, T=T, snn_calibration="none", threshold_levels="bits", readout_delay=0.0)
    reference = ann2snn.convert_qann(ann2snn.quantize(model, batches), T=T, readout_delay=0.0)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(snn(x), reference(x), rtol=0, atol=0)
    gm = copy.deepcopy(snn.body)
    assert calibrate_spiking(gm, x, snn.qann, T, method="none") is gm


def test_thresholds_are_chosen_for_the_steps_of_rate_coded_neurons(model) -> None:
    batches = networks.calibration()
    for T_steps, bits in ((7, 3), (15, 4)):
        by_steps = ann2snn.quantize(model, batches, ann2snn.ConversionConfig.from_dict(
            {"T": T_steps, "qbits": 2, "threshold_levels": "steps", "per_channel": False}))
        by_bits = ann2snn.quantize(model, batches, bits)
        def thresholds(qann):
            return {name: float(buffer) for name, buffer in qann.named_buffers() if name.endswith("theta")}
        assert thresholds(by_steps) == thresholds(by_bits)
        assert by_steps.get_submodule("relu").levels == 3
    signed = ann2snn.ConversionConfig.from_dict({"T": 7, "neuron": "signed"})
    assert signed.threshold_level_count is None


def test_rates_are_fitted_where_the_read_out_counts(model) -> None:
    """Fitted over the second half, a layer's rates there match the ANN's; over all steps they do not (the
    first steps, while the layers before settle, are off), and the network differs from one fitted over all."""
    batches = networks.calibration()
    x = torch.cat(batches)
    delayed = ann2snn.convert(model, batches, T=T, readout_delay=0.5, snn_calibration_images=len(x))
    assert delayed.readout_start(T) == T // 2 and delayed.readout_start(7) == 3
    windowed = rate_errors(delayed, x)
    delayed.readout_delay = 0.0  # the same network, its rates measured over every step
    assert windowed.max() < 0.05 and rate_errors(delayed, x).mean() > 1.5 * windowed.mean()
    undelayed = ann2snn.convert(model, batches, T=T, readout_delay=0.0, snn_calibration_images=len(x))
    assert not torch.equal(undelayed.body.conv3.bias, delayed.body.conv3.bias)


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


def test_window_model_counts_the_spikes_an_if_neuron_sends() -> None:
    """Currents below one threshold per step keep the membrane within 0 .. threshold, where the weight
    calibration's model of the read-out window is exact: floor((membrane at its start + current) / threshold)."""
    torch.manual_seed(0)
    threshold = torch.tensor([0.5, 1.0, 2.0])
    neuron = IFNeuron(threshold.reshape(3, 1, 1))
    currents = torch.rand(T, 4, 3, 5, 5) * threshold.reshape(3, 1, 1)
    for counted_from in (0, 5, T // 2):
        neuron.reset()
        neuron.load_state(neuron.initial_state(currents[0]))
        fired = neuron.multi_step_forward(currents, 0)[counted_from:].mean(0)
        window = T - counted_from
        start = membrane_at(neuron, currents, counted_from)
        modelled = window_rates(neuron, start, currents[counted_from:].mean(0), window)
        torch.testing.assert_close(modelled, fired, rtol=0, atol=1e-6)
        assert 0 < fired.mean() < 1


def test_the_refitted_layer_sends_the_currents_the_simulation_goes_on_with() -> None:
    """The currents' change is computed from the change of the layer's parameters alone (one pass, the layer
    being linear): what follows must equal the refitted layer's output plus what else reached the neuron."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
    inputs = (torch.rand(T, 4, 2, 6, 6) < 0.3).float()
    residual = torch.randn(T, 4, 3, 6, 6) * 0.1
    with torch.no_grad():
        currents = layer(inputs.flatten(0, 1)).reshape(residual.shape) + residual
    calibration = LayerUnderCalibration(IFNeuron(torch.full((3, 1, 1), 0.5)), currents, torch.rand(4, 3, 6, 6),
                                        T // 2, layer, inputs)
    before = layer.weight.detach().clone()
    fit_weights(calibration)
    assert not torch.equal(layer.weight, before) and layer.bias is not None
    with torch.no_grad():
        expected = layer(inputs.flatten(0, 1)).reshape(residual.shape) + residual
    torch.testing.assert_close(calibration.currents, expected, rtol=0, atol=1e-5)


def test_weight_calibration_refits_the_layers_feeding_a_neuron_alone(model) -> None:
    batches = networks.calibration()
    light = ann2snn.convert(model, batches, T=T, snn_calibration="bias")
    advanced = ann2snn.convert(model, batches, T=T, snn_calibration="weights")

    def weights(snn):
        return {name: p for part in (snn.prefix, snn.body) for name, p in part.named_parameters()
                if name.endswith("weight")}

    changed = {name for name, weight in weights(advanced).items() if not torch.equal(weight, weights(light)[name])}
    # the feeding layers of test_currents_go_into_feeding_biases_or_injections; the multiplication before
    # relu6 has none, and fc2 feeds no neuron
    assert changed == {"conv1.weight", "conv3.weight", "conv4.weight", "fc1.weight"}
    injections = [name for part in (advanced.prefix, advanced.body) for name, m in part.named_modules()
                  if isinstance(m, AddBias)]
    assert injections == ["relu6_calibration"]


def test_weight_calibration_brings_each_neuron_closer_to_the_ann() -> None:
    """Light calibration fits channel means; refitting the weights on the rates the SNN delivers fits each
    image's neurons (on the calibration images it saw, summed over layers: measured 0.0163 against 0.0174, 0.94x;
    the earlier 100 steps at 1e-3 gave 0.91x on one machine and 0.95x on another, so the bound leaves room for
    float-level differences and still fails a fit that does not help)."""
    model = networks.build(1, networks.MixNet)
    batches = networks.calibration()
    x = torch.cat(batches)
    settings = {"T": T, "snn_calibration_images": len(x)}
    light = neuron_rate_errors(ann2snn.convert(model, batches, snn_calibration="bias", **settings), x)
    advanced = neuron_rate_errors(ann2snn.convert(model, batches, snn_calibration="weights", **settings), x)
    assert advanced < 0.97 * light, (advanced, light)
