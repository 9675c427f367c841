"""Pass 2 (normalize_activations): every ReLU form becomes one ClippedReLU module per call site."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import normalize_activations, trace
from ann2snn.compiler.quantizer import ClippedReLU


def _normalize(model: nn.Module):
    return run_passes(model.eval(), trace, normalize_activations)


def _clipped_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ClippedReLU)]


# (name, activation applied to a conv output, expected upper clip)
FORMS = [
    ("module_relu", lambda m, x: m.relu_module(x), None),
    ("F.relu", lambda m, x: F.relu(x), None),
    ("F.relu_inplace", lambda m, x: F.relu(x, inplace=True), None),
    ("torch.relu", lambda m, x: torch.relu(x), None),
    ("method_relu", lambda m, x: x.relu(), None),
    ("method_relu_", lambda m, x: x.relu_(), None),
    ("F.relu6", lambda m, x: F.relu6(x), 6.0),
    ("module_relu6", lambda m, x: m.relu6_module(x), 6.0),
    ("F.hardtanh_0_6", lambda m, x: F.hardtanh(x, 0, 6), 6.0),
    ("module_hardtanh_0_2.5", lambda m, x: m.hardtanh_module(x), 2.5),
    ("torch.clamp_min0", lambda m, x: torch.clamp(x, min=0), None),
    ("method_clamp_0_4", lambda m, x: x.clamp(0, 4), 4.0),
    ("torch.clip_0_3", lambda m, x: torch.clip(x, 0.0, 3.0), 3.0),
    ("torch.clamp_min_0", lambda m, x: torch.clamp_min(x, 0), None),
    ("method_clamp_max_kw", lambda m, x: x.clamp(min=0, max=1.5), 1.5),
]


class AllForms(nn.Module):
    """A chain conv -> activation -> conv -> activation ... using one form per stage."""

    def __init__(self, forms) -> None:
        super().__init__()
        self.forms = [f for _, f, _ in forms]
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in forms)
        self.relu_module = nn.ReLU()
        self.relu6_module = nn.ReLU6()
        self.hardtanh_module = nn.Hardtanh(0.0, 2.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, form in zip(self.convs, self.forms):
            x = form(self, conv(x) * 3.0)  # * 3 so that the upper clips are reached
        return x


def test_every_relu_form_becomes_one_clipped_relu() -> None:
    model = AllForms(FORMS).eval()
    gm = _normalize(model)

    clipped = _clipped_nodes(gm)
    assert [gm.get_submodule(n.target).upper for n in clipped] == [upper for _, _, upper in FORMS]
    # one distinct module per call site, each fed directly by its own conv stage
    assert len({n.target for n in clipped}) == len(FORMS)
    assert len({id(gm.get_submodule(n.target)) for n in clipped}) == len(FORMS)
    for node in clipped:
        assert node.args[0].op == "call_function" and node.args[0].target is operator.mul
    # nothing else ReLU-like is left
    kinds = {(n.op, n.target if n.op != "call_module" else type(gm.get_submodule(n.target)))
             for n in gm.graph.nodes}
    assert kinds == {("placeholder", "x"), ("output", "output"), ("call_module", nn.Conv2d),
                     ("call_function", operator.mul), ("call_module", ClippedReLU)}

    for _ in range(3):
        x = torch.randn(4, 3, 6, 6)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class SharedRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x) * 4)) * 4)


def test_shared_module_becomes_one_module_per_call_site() -> None:
    model = SharedRelu().eval()
    gm = _normalize(model)
    clipped = _clipped_nodes(gm)
    assert len(clipped) == 2
    first, second = (gm.get_submodule(n.target) for n in clipped)
    assert first is not second
    assert first.upper == second.upper == 6.0
    assert clipped[0].target == "relu" and clipped[1].target != "relu"
    assert not any(isinstance(m, nn.ReLU6) for m in gm.modules())
    x = torch.randn(3, 3, 5, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_torchvision_basic_block_shared_relu_and_iadd() -> None:
    torch.manual_seed(1)
    block = BasicBlock(6, 6).eval()
    gm = _normalize(block)
    clipped = _clipped_nodes(gm)
    assert len(clipped) == 2
    assert gm.get_submodule(clipped[0].target) is not gm.get_submodule(clipped[1].target)
    # the residual `out += identity` becomes an out-of-place add feeding the second activation
    assert not any(n.target is operator.iadd for n in gm.graph.nodes)
    adds = [n for n in gm.graph.nodes if n.target is operator.add]
    assert len(adds) == 1 and clipped[1].args[0] is adds[0]
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(gm(x), block(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form, target", [
    (lambda x: torch.clamp(x, min=0.5), torch.clamp),
    (lambda x: torch.clamp(x, min=-1), torch.clamp),
    (lambda x: x.clamp(-1, 4), "clamp"),
    (lambda x: x.clamp(max=4), "clamp"),
    (lambda x: F.hardtanh(x), F.hardtanh),
    (lambda x: F.hardtanh(x, 0.0, 0.0), F.hardtanh),
    (lambda x: torch.clamp_min(x, 0.1), torch.clamp_min),
])
def test_non_relu_clamps_are_left_alone(form, target) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return form(self.conv(x))

    model = M().eval()
    gm = _normalize(model)
    assert not _clipped_nodes(gm)
    assert [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")] == [target]
    x = torch.randn(2, 3, 4, 4) * 3
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class InPlaceStatement(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x.relu_()  # result discarded: the activation happens through the mutation
        return x


def test_inplace_activation_statement_is_kept() -> None:
    model = InPlaceStatement().eval()
    gm = _normalize(model)
    assert len(_clipped_nodes(gm)) == 1
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), model(x))
