"""ONNX export: onnxruntime (CPU, standard operators only) reproduces PyTorch for every neuron model, in
the three formats: the single-step model looped T times equals `snn.step` (states and spike counts
identical), the T-step model equals `snn(x)`, the QANN model equals the PyTorch QANN. Spike-encoded inputs
(regular, and Poisson with its integer hash) export too: the step index is an input of every step.

On arbitrary float weights, onnxruntime's and PyTorch's convolutions sum in different orders, so a
membrane within rounding distance of its threshold can fire in one runtime and not in the other, and the
difference then travels on through the network. The small random networks here happen to have no such
tie; on ResNet-20 and MobileNetV2 (tens of thousands of neurons) there are always a few, so those
networks (spiking and quantized) and their inputs are first rounded to a grid of multiples of 2**-6, on which every
partial sum is exact in float32 whatever the order: then identity can be demanded there too."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.cli.main import main
from ann2snn.errors import ConversionError
from ann2snn.interop.onnx import FILE_NAMES, FORMATS, onnx_models
from ann2snn.io.model_loading import Preprocessing, load_model
from ann2snn.io.output_directory import MARKER
from ann2snn.runtime.layers import TemporalModule
from ann2snn.zoo import build_model
from tests.helpers import assert_rel_close, randomize_bn, shared_cifar10_images
from tests.networks import DataMovementNet, build, calibration

STANDARD_DOMAINS = {"", "ai.onnx"}


def session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from all_nodes(subgraph)


def assert_standard(model: onnx.ModelProto) -> None:
    """Checker-clean, opset >= 17, standard operators only, static shapes but for the batch dimension."""
    onnx.checker.check_model(model, full_check=True)
    assert {entry.domain for entry in model.opset_import} <= STANDARD_DOMAINS and not model.functions
    assert min(entry.version for entry in model.opset_import) >= 17
    assert {node.domain for node in all_nodes(model.graph)} <= STANDARD_DOMAINS
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name in ("t", "t.next"):
            assert len(dims) == 0
            continue
        assert dims[0].dim_param == "batch", value.name
        assert all(dim.dim_value > 0 for dim in dims[1:]), value.name


def assert_single_step_equals_step(model: onnx.ModelProto, snn: ann2snn.SpikingNetwork, x: torch.Tensor,
                                   T: int) -> None:
    """The single-step model, its states fed back T times (zeros at first), against snn.step."""
    runner = session(model)
    output_names = [value.name for value in runner.get_outputs()]
    states = {value.name: np.zeros([len(x)] + value.shape[1:], np.float32)
              for value in runner.get_inputs() if value.name not in ("input", "t")}
    t = np.array(0, np.int64)
    snn.reset()
    for step in range(T):
        frame = snn.encode_step(x, step)
        expected = snn.step(frame)
        outputs = dict(zip(output_names, runner.run(None, {"input": frame.numpy(), "t": t, **states})))
        assert_rel_close(torch.from_numpy(outputs["output"]), expected)
        t, states = outputs["t.next"], {name: outputs[name + ".next"] for name in states}
    assert int(t) == T
    for name, neuron in snn.neurons.items():
        assert float(neuron.spike_count.sum()) > 0, f"{name} never fired: the comparison would prove little"
        torch.testing.assert_close(torch.from_numpy(states[f"{name}.spike_count"]), neuron.spike_count, rtol=0, atol=0)
        assert_rel_close(torch.from_numpy(states[f"{name}.v"]), neuron.v)  # the same up to summation order


def assert_t_step_equals_simulation(model: onnx.ModelProto, snn: ann2snn.SpikingNetwork, x: torch.Tensor,
                                    T: int) -> None:
    runner = session(model)
    result = snn.simulate(x, [T])
    outputs = dict(zip([value.name for value in runner.get_outputs()], runner.run(None, {"input": x.numpy()})))
    if len(x) > 1:
        assert float(result.outputs[T].std(0).mean()) > 0, "the output does not depend on the input"
    assert_rel_close(torch.from_numpy(outputs.pop("output")), result.outputs[T])
    assert set(outputs) == {f"{name}.spike_count" for name in snn.neurons}
    for name, count in result.spikes[T].items():
        torch.testing.assert_close(torch.from_numpy(outputs[f"{name}.spike_count"]), count, rtol=0, atol=0)


@torch.no_grad()
def assert_qann_equal(model: onnx.ModelProto, qann: nn.Module, x: torch.Tensor) -> None:
    assert_rel_close(torch.from_numpy(session(model).run(None, {"input": x.numpy()})[0]), qann(x))


# ---------------------------------------------------------------------------------------------------
# Random networks: conv/BN, depthwise, residual add, max and average pooling, cat, pad, slicing, linear


CONFIGS = {
    "if": dict(neuron="if"),
    "if, every step read out": dict(neuron="if", readout_delay=0.0),
    "lif, per channel": dict(neuron="lif", per_channel=True),
    "signed": dict(neuron="signed"),
    "signed-rate, per channel": dict(neuron="signed-rate", per_channel=True),
    "if, bursts of 3, per channel": dict(neuron="if", max_spikes_per_step=3, per_channel=True),
    "signed, bursts of 2": dict(neuron="signed", max_spikes_per_step=2),
    "adaptive, per channel": dict(neuron="adaptive", per_channel=True,
                                  neuron_options={"adapt_increase": 0.3, "adapt_decay": 0.7}),
    "adaptive, bursts of 2": dict(neuron="adaptive", max_spikes_per_step=2),
    "if, regular encoding": dict(neuron="if", encoding="regular", input_mean=[0.5] * 3, input_std=[0.5] * 3),
    "signed-rate, poisson encoding": dict(neuron="signed-rate", encoding="poisson", encoding_seed=7,
                                          input_mean=[0.5] * 3, input_std=[0.5] * 3),
}
WITH_QANN = {"if", "signed-rate, per channel"}  # the QANN does not depend on the neuron: once per threshold kind


@pytest.mark.parametrize("name", CONFIGS)
def test_onnxruntime_reproduces_pytorch_on_random_networks(name: str) -> None:
    T, export_T = 8, 5
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=T, **CONFIGS[name])
    x = torch.randn(3, 3, 8, 8)  # the export traced a batch of 2: the batch dimension is dynamic
    snn.reset()
    snn.step(x)
    before = {key: value.clone() for key, value in snn.neurons["relu"].__dict__.items() if torch.is_tensor(value)}
    formats = FORMATS if name in WITH_QANN else ("single-step", "t-step")
    models = onnx_models(snn, formats)
    after = {key: value for key, value in snn.neurons["relu"].__dict__.items() if torch.is_tensor(value)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        "exporting changed the network's simulation state"
    for model in models.values():
        assert_standard(model)

    assert_single_step_equals_step(models["single-step"], snn, x, T)
    assert_t_step_equals_simulation(models["t-step"], snn, x, T)
    metadata = {prop.key: prop.value for prop in models["t-step"].metadata_props}
    assert metadata["ann2snn.readout_start"] == str(snn.readout_start(T))
    expected_start = {"if": T // 2, "if, every step read out": 0}
    if name in expected_start:
        assert snn.readout_start(T) == expected_start[name]
    if name == "if":  # a T other than the network's (its read-out starts at step 2), and a batch of one
        assert_t_step_equals_simulation(onnx_models(snn, ("t-step",), T=export_T)["t-step"], snn, x[:1], export_T)
    if "qann" in models:
        assert_qann_equal(models["qann"], snn.qann, x)


@pytest.mark.parametrize("neuron", ["if", "signed"])
def test_data_movement_exports(neuron: str) -> None:
    """Chunk, channel shuffle (view, transpose, contiguous), split, permute, unbind, expand and repeat."""
    T = 6
    snn = ann2snn.convert(build(network=DataMovementNet), calibration(), qbits=2, T=T, neuron=neuron)
    models = onnx_models(snn, FORMATS)
    for model in models.values():
        assert_standard(model)
    x = torch.randn(3, 3, 8, 8)
    assert_single_step_equals_step(models["single-step"], snn, x, T)
    assert_t_step_equals_simulation(models["t-step"], snn, x, T)
    assert_qann_equal(models["qann"], snn.qann, x)


def test_state_names_and_model_metadata() -> None:
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4, neuron="signed")
    model = onnx_models(snn, ("single-step",))["single-step"]
    inputs = [value.name for value in model.graph.input]
    assert inputs[:2] == ["input", "t"]
    expected = {f"{layer}.{state}" for layer in snn.neurons for state in ("v", "count", "spike_count")}
    expected |= {f"{pool}.{state}" for pool in ("pool", "max_pool2d") for state in ("running_sum", "running_max")}
    assert set(inputs[2:]) == expected
    expected_outputs = ["output", "t.next"] + [name + ".next" for name in inputs[2:]]
    assert [value.name for value in model.graph.output] == expected_outputs
    properties = {entry.key: entry.value for entry in model.metadata_props}
    assert properties["ann2snn.format"] == "single-step" and properties["ann2snn.coding"] == "accumulate"


# ---------------------------------------------------------------------------------------------------
# ResNet-20 (the shared, trained one) and MobileNetV2


def on_dyadic_grid(snn: ann2snn.SpikingNetwork, bits: int = 6) -> ann2snn.SpikingNetwork:
    """Every parameter and buffer of the spiking graph rounded to a multiple of 2**-bits (thresholds to
    at least one step): sums of such values are exact in float32 whatever the order of summation."""
    step = 2.0 ** -bits
    with torch.no_grad():
        for part in (snn.prefix, snn.body):
            for tensor in [*part.parameters(), *part.buffers()]:
                if tensor.is_floating_point():
                    tensor.copy_(torch.round(tensor / step) * step)
        for neuron in snn.neurons.values():
            neuron.v_threshold.clamp_(min=step)
    return snn


def qann_on_dyadic_grid(qann: nn.Module, bits: int = 6) -> nn.Module:
    """The QANN's weights rounded to multiples of 2**-bits and each quantizer's step theta / L to a power
    of two, so that its sums, divisions by the step and floors are exact in float32 in any order."""
    with torch.no_grad():
        for name, tensor in [*qann.named_parameters(), *qann.named_buffers()]:
            if name.endswith("theta"):
                levels = qann.get_submodule(name.rpartition(".")[0]).levels
                tensor.copy_(levels * torch.exp2(torch.round(torch.log2(tensor / levels))))
            elif tensor.is_floating_point():
                tensor.copy_(to_grid(tensor, bits))
    return qann


def to_grid(x: torch.Tensor, bits: int = 6) -> torch.Tensor:
    return torch.round(x * 2 ** bits) / 2 ** bits


@pytest.fixture(scope="module")
def resnet20(shared):
    model = load_model(shared / "models" / "resnet20-cifar10.th").model
    calibration = shared_cifar10_images(shared, "train-calib-512.txt", 128)
    return model, [calibration], shared_cifar10_images(shared, "test-1000.txt", 8)


@pytest.mark.shared
@pytest.mark.slow
def test_resnet20_qann_with_its_trained_weights(resnet20) -> None:
    model, calibration_batches, x = resnet20
    qann = qann_on_dyadic_grid(ann2snn.quantize(model, calibration_batches, 4, per_channel=True,
                                                threshold_rule="percentile"))
    snn = ann2snn.convert_qann(qann, T=4, neuron="signed-rate")
    model = onnx_models(snn, ("qann",), input_shape=(3, 32, 32))["qann"]
    assert_standard(model)
    x = to_grid(x)
    assert float(qann(x).detach().std(0).mean()) > 0.1, "the rounded QANN no longer depends on its input"
    assert_qann_equal(model, qann, x)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("neuron", ["signed-rate", "signed"])
def test_resnet20_snn(resnet20, neuron: str) -> None:
    model, calibration_batches, x = resnet20
    T = 8
    snn = on_dyadic_grid(ann2snn.convert(model, calibration_batches, qbits=4, T=T, neuron=neuron, per_channel=True,
                                         threshold_rule="percentile",
                                         max_spikes_per_step=1 if neuron != "signed" else 4))
    models = onnx_models(snn, ("single-step", "t-step"))
    x = to_grid(x[:4])
    assert_single_step_equals_step(models["single-step"], snn, x, T)
    assert_t_step_equals_simulation(models["t-step"], snn, x, T)


@pytest.mark.slow
@pytest.mark.parametrize("neuron", ["if", "lif"])
def test_mobilenet_v2(neuron: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(build_model("mobilenet_v2_cifar", width_mult=0.5)).eval()
    T = 4
    # in 4 steps this deep random network's spikes reach its output only in the last steps: average all of them;
    # the bias calibration gives the graph the weight calibration gives, in a quarter of the time
    snn = on_dyadic_grid(ann2snn.convert(model, [torch.randn(32, 3, 32, 32)], qbits=3, T=T, neuron=neuron,
                                         threshold_rule="max", readout_delay=0.0, snn_calibration="bias"))
    formats = FORMATS if neuron == "if" else ("single-step", "t-step")
    models = onnx_models(snn, formats)
    x = to_grid(torch.randn(2, 3, 32, 32))
    assert_single_step_equals_step(models["single-step"], snn, x, T)
    assert_t_step_equals_simulation(models["t-step"], snn, x, T)
    if "qann" in models:
        assert_qann_equal(models["qann"], snn.qann, x)


# ---------------------------------------------------------------------------------------------------
# Command line and errors


def test_cli_export_writes_every_format(tmp_path, capsys) -> None:
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4, neuron="signed-rate")
    ann2snn.save(snn, tmp_path / "snn.pt", {"preprocessing": Preprocessing(image_size=[3, 8, 8]).to_dict()})
    assert main(["export", str(tmp_path)]) == 0
    # no temporary files left; the marker lists what ann2snn wrote
    assert {path.name for path in tmp_path.iterdir()} == {"snn.pt", MARKER, *FILE_NAMES.values()}
    out = capsys.readouterr().out
    assert all(f"Wrote {tmp_path / name}" in out for name in FILE_NAMES.values())
    x = torch.randn(2, 3, 8, 8)
    models = {f: onnx.load(tmp_path / name) for f, name in FILE_NAMES.items()}
    for model in models.values():
        assert_standard(model)
    assert_t_step_equals_simulation(models["t-step"], snn, x, 4)
    assert_qann_equal(models["qann"], snn.qann, x)


def test_cli_export_errors(tmp_path, capsys) -> None:
    assert main(["export", str(tmp_path)]) == 1
    assert "holds no snn.pt" in capsys.readouterr().err
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4)
    ann2snn.save(snn, tmp_path / "snn.pt")
    assert main(["export", str(tmp_path), "--format", "t-step"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_api_errors() -> None:
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4)
    with pytest.raises(ValueError, match="unknown ONNX format"):
        onnx_models(snn, ("t-step", "tflite"))
    with pytest.raises(ValueError, match="time steps"):
        onnx_models(snn, ("t-step",), T=0)
    with pytest.raises(TypeError, match="SpikingNetwork"):
        onnx_models(snn.qann)


def test_reloaded_network_needs_the_input_shape(tmp_path) -> None:
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4)
    reloaded = ann2snn.load(ann2snn.save(snn, tmp_path / "snn.pt"))
    with pytest.raises(ValueError, match="input_shape"):
        onnx_models(reloaded, ("t-step",))


class Delay(TemporalModule):
    """A temporal module the exporter has no step handler for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_unsupported_temporal_module_is_named() -> None:
    snn = ann2snn.convert(build(), calibration(), qbits=2, T=4)
    snn.body.add_submodule("relu6", Delay())
    with pytest.raises(ConversionError, match=r"relu6.*Delay.*no step handler"):
        onnx_models(snn, ("single-step",))
