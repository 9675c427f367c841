from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from ann2snn.zoo import MODELS, build_model

EXPECTED_REGISTRY = {
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet20_b",
    "resnet32_b",
    "resnet44_b",
    "resnet56_b",
    "mobilenet_v2_cifar",
    "mobilenet_v2_cifar_s2",
    "shufflenet_v2_x0_5_cifar",
    "shufflenet_v2_x1_0_cifar",
    "vgg11_bn_cifar",
    "vgg16_bn_cifar",
}


def test_registry_names() -> None:
    assert set(MODELS) == EXPECTED_REGISTRY


@pytest.mark.parametrize("name", sorted(EXPECTED_REGISTRY))
def test_registry_model_runs_and_traces(name: str) -> None:
    model = build_model(name).eval()
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        logits = model(images)
        traced = torch.fx.symbolic_trace(model)
        traced_logits = traced(images)

    assert logits.shape == (2, 10)
    torch.testing.assert_close(traced_logits, logits)


@pytest.mark.parametrize("name", sorted(EXPECTED_REGISTRY))
def test_registry_model_num_classes(name: str) -> None:
    model = build_model(name, num_classes=100).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_cifar_resnet_sizes_match_the_paper() -> None:
    # He et al. (2016), table 6: 0.27M, 0.46M, 0.66M and 0.85M parameters.
    expected_millions = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85}
    for name, millions in expected_millions.items():
        parameters = sum(parameter.numel() for parameter in build_model(name).parameters())
        assert round(parameters / 1e6, 2) == millions, name


def test_mobilenet_v2_cifar_width_mult() -> None:
    narrow = build_model("mobilenet_v2_cifar", width_mult=0.5).eval()
    with torch.no_grad():
        assert narrow(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    narrow_parameters = sum(parameter.numel() for parameter in narrow.parameters())
    full_parameters = sum(parameter.numel() for parameter in build_model("mobilenet_v2_cifar").parameters())
    assert narrow_parameters < full_parameters


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11_bn"])
def test_torchvision_models_build_without_weights(name: str) -> None:
    model = build_model(f"torchvision:{name}", num_classes=7).eval()
    assert isinstance(model, nn.Module)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(KeyError) as raised:
        build_model("resnet21")
    message = str(raised.value)
    assert "resnet21" in message
    for name in EXPECTED_REGISTRY:
        assert name in message
    assert "torchvision:" in message


def test_unknown_torchvision_name() -> None:
    with pytest.raises(KeyError, match="no_such_net"):
        build_model("torchvision:no_such_net")
