"""Pass 4 (fold_batchnorm): BN folds into conv/linear; otherwise it becomes a ChannelAffine."""
from __future__ import annotations

import functools
from functools import partial

import pytest
import torch
from torch import nn

from ann2snn import ConversionError
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import fold_batchnorm, trace
from ann2snn.runtime.layers import ChannelAffine
from tests.helpers import BATCHNORMS, assert_rel_close, randomize_bn

randomize_bn_wide = functools.partial(randomize_bn, mean=1.0, var=(0.3, 3.0), weight=(-1.5, 1.5), bias=(-1.0, 1.0))


class ConvChain(nn.Module):
    """conv+BN, grouped conv+BN, depthwise conv+BN (no bias), conv1d+BN1d, linear+BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn_grouped = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(8, 4, 3)
        self.bn1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 14, 6)
        self.bn_fc = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_grouped(self.grouped(x)))
        x = self.bn_depthwise(self.depthwise(x)).relu()
        x = self.bn1d(self.conv1d(x.flatten(2)))
        return self.bn_fc(self.fc(x.flatten(1)))


def test_bn_folds_into_conv_grouped_depthwise_and_linear() -> None:
    model = randomize_bn_wide(ConvChain()).eval()
    gm = run_passes(model, partial(trace, example_input=torch.randn(1, 3, 4, 4)), fold_batchnorm)

    assert not any(isinstance(m, BATCHNORMS + (ChannelAffine,)) for m in gm.modules())
    modules = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == [nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Conv1d, nn.Linear]
    assert gm.get_submodule("depthwise").groups == 8 and gm.get_submodule("grouped").groups == 2
    assert gm.get_submodule("depthwise").bias is not None  # the BN shift became a bias
    # the original model is not modified
    assert model.depthwise.bias is None

    for _ in range(3):
        x = torch.randn(4, 3, 4, 4)
        assert_rel_close(gm(x), model(x))


class BnAfterAdd(nn.Module):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(5, affine=affine)
        self.shared = nn.Conv2d(5, 5, 1)
        self.bn_shared_input = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.a(x) + self.b(x)))
        z = self.shared(y)
        # z has two users, so this BN cannot be folded into `shared`
        return self.bn_shared_input(z) + z


@pytest.mark.parametrize("affine", [True, False])
def test_unfoldable_bn_becomes_channel_affine(affine: bool) -> None:
    model = randomize_bn_wide(BnAfterAdd(affine)).eval()
    gm = run_passes(model, trace, fold_batchnorm)

    assert not any(isinstance(m, BATCHNORMS) for m in gm.modules())
    affine_nodes = [n for n in gm.graph.nodes
                    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ChannelAffine)]
    assert [n.target for n in affine_nodes] == ["bn", "bn_shared_input"]
    # conv weights unchanged when nothing is folded
    torch.testing.assert_close(gm.get_submodule("shared").weight, model.shared.weight, rtol=0, atol=0)
    # the affine op equals the BN's eval formula
    bn = model.bn
    gamma = bn.weight if affine else torch.ones(5)
    beta = bn.bias if affine else torch.zeros(5)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(gm.get_submodule("bn").weight, scale.detach())
    torch.testing.assert_close(gm.get_submodule("bn").bias, (beta - bn.running_mean * scale).detach())

    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        assert_rel_close(gm(x), model(x))


def test_bn1d_on_linear_output_after_add_becomes_affine() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.bn = nn.Linear(4, 6), nn.Linear(4, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc1(x) - self.fc2(x))

    model = randomize_bn_wide(M()).eval()
    gm = run_passes(model, trace, fold_batchnorm)
    assert isinstance(gm.get_submodule("bn"), ChannelAffine)
    x = torch.randn(8, 4)
    assert_rel_close(gm(x), model(x))


class Nested(nn.Module):
    def __init__(self, track: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU())

    def forward(self, x):
        return self.features(x)


def test_training_mode_bn_raises_naming_the_node() -> None:
    model = Nested()
    gm = trace(model)  # still in training mode
    assert gm.get_submodule("features.1").training
    with pytest.raises(ConversionError, match=r"node 'features_1' \[call_module features\.1 \(BatchNorm2d\)\]"):
        fold_batchnorm(gm)


def test_bn_without_running_stats_raises_naming_the_node() -> None:
    gm = trace(Nested(track=False).eval())
    with pytest.raises(ConversionError, match=r"node 'features_1'.*track_running_stats=False"):
        fold_batchnorm(gm)


class LinearOn3d(nn.Module):
    """Linear over the last dim of [N, C, L] followed by BatchNorm1d(C), which normalises dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_bn1d_after_linear_on_3d_input() -> None:
    model = randomize_bn_wide(LinearOn3d()).eval()
    gm = run_passes(model, trace, fold_batchnorm)
    x = torch.randn(3, 4, 6)
    assert_rel_close(gm(x), model(x))
