"""Converted torchvision models and the CIFAR ResNet-20 approach their references as T grows: signed
neurons reach the QANN exactly, rate-coded ones the clipped (unquantized) ANN."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ann2snn
from ann2snn.evaluation.convergence import clipped_reference, convergence, relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from convergence import MODELS, random_model  # noqa: E402

T_LIST = [8, 32, 128]


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request):
    torch.manual_seed(0)
    name = request.param
    shape = MODELS[name]
    model = random_model(name)
    calib = [torch.randn((8,) + shape) for _ in range(2)]
    x = torch.randn((2,) + shape)
    return name, model, calib, x


def test_signed_neurons_reach_the_qann_exactly(converted) -> None:
    # in float64, so that no pre-activation lies within rounding distance of a level boundary (in
    # float32 a rare tie flips one level, and random networks amplify it)
    name, model, calib, x = converted
    snn = ann2snn.convert(model, calib, qbits=4, T=128, neuron="signed").double()
    errors = convergence(snn, x.double(), T_LIST)
    assert errors[128]["qann"] < 1e-5, (name, errors)
    assert errors[8]["qann"] > 1e-3, "a network exact after 8 steps would not test settling"


@pytest.mark.parametrize("neuron", ["if", "signed-rate"])
def test_rate_coded_neurons_approach_the_clipped_ann(converted, neuron: str) -> None:
    name, model, calib, x = converted
    # The rate code itself, without the recipe fitted to one T (the SNN calibration leaves the random
    # MobileNetV2 within 6e-5 of the clipped ANN from T = 8 on, where nothing is left to fall with T)
    snn = ann2snn.convert(model, calib, qbits=4, T=128, neuron=neuron, threshold_levels="bits", per_channel=False,
                          snn_calibration="none", readout_delay=0.0)
    errors = convergence(snn, x, T_LIST)
    clipped = [errors[T]["clipped"] for T in T_LIST]
    assert clipped[2] < 0.6 * clipped[0] and clipped[2] < 0.06, (name, neuron, errors)


def test_clipped_reference_removes_quantization_only() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU()).eval()
    qann = ann2snn.quantize(model, [torch.randn(32, 6)], 2)
    theta = qann.get_submodule("1").theta
    x = torch.randn(16, 6)
    expected = torch.clamp(model[0](x), 0.0, float(theta))
    assert relative_error(clipped_reference(qann)(x), expected) < 1e-5
    assert relative_error(qann(x), expected) > 1e-2
