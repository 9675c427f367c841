"""Pass 5 (check_supported): one ConversionError listing every node a spiking network cannot compute."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann2snn import ConversionError
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import check_supported, fold_batchnorm, normalize_activations, remove_identities, trace
from tests.networks import DataMovementNet, build


def prepared(model: nn.Module, example: torch.Tensor | None = None):
    """The graph check_supported sees in the pipeline (with shapes when `example` is given)."""
    traced = trace(model.eval(), example_input=example)
    return run_passes(traced, normalize_activations, remove_identities, fold_batchnorm)


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = torch.softmax(x, dim=1)
        x = F.relu(x * x)
        return self.fc(x.flatten(1))


def test_all_offending_nodes_in_one_error() -> None:
    gm = prepared(Unsupported())
    with pytest.raises(ConversionError, match=r"node 'act' \[call_module act \(SiLU\)\]") as info:
        check_supported(gm)
    message = str(info.value)
    assert message.startswith("4 node(s) cannot be converted")
    for name in ("gelu", "softmax", "mul"):
        assert re.search(rf"node '{name}' ", message), name
    assert "product of two tensors" in message
    # supported nodes are not listed
    for name in ("conv1", "conv2", "relu", "fc", "flatten"):
        assert f"node '{name}'" not in message


class Supported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.bn_after_add = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.pad = nn.ZeroPad2d(1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16 + 8, 5)
        with torch.no_grad():
            for bn in (self.bn, self.dw_bn, self.bn_after_add):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.conv(x)))
        y = self.dw_bn(self.dw(x)).clamp(0, 4)
        x = self.bn_after_add(x + y)
        x = torch.relu(x - 0.5 * y / 2)
        a = self.pool(x)                                  # 8x4x4
        b = F.max_pool2d(x[:, :, ::2, ::2] * 2, 1)       # 8x4x4
        c = self.avg(F.pad(x, (1, 1, 1, 1)))              # 8x5x5
        c = F.avg_pool2d(self.pad(c)[:, :, 1:, 1:], 3, 2)  # 8x3x3
        cat = torch.cat([a, b], dim=1)                    # 16x4x4
        g = cat.mean(dim=(2, 3))
        h = self.gap(c).view(c.size(0), -1)
        return self.fc(torch.cat([g, h.flatten(1)], 1))


@pytest.mark.parametrize("network", [Supported, DataMovementNet])
def test_supported_model_passes_unchanged(network: type[nn.Module]) -> None:
    model = build(network=network)
    x = torch.randn(2, 3, 8, 8)
    gm = prepared(model, x[:1])
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    checked = run_passes(gm, check_supported)
    assert [(n.op, n.target, n.args) for n in checked.graph.nodes] == before
    torch.testing.assert_close(checked(x), model(x), rtol=1e-5, atol=1e-5)


class Weird(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.register_buffer("offset", torch.ones(1, 4, 1, 1))

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.kind == "get_attr":
            return x + self.offset
        if self.kind == "batch_index":
            return x[1:]
        if self.kind == "mean_all":
            return x.mean()
        if self.kind == "mean_batch":
            return torch.mean(x, 0)
        if self.kind == "pad_value":
            return F.pad(x, (1, 1), value=1.0)
        if self.kind == "indices":
            return self.pool(x)[0]
        if self.kind == "tensor_div":
            return x / (x + 1)
        if self.kind == "transpose_batch":
            return x.transpose(0, 1)
        if self.kind == "negative_transpose_batch":
            return torch.transpose(x, -4, 2)
        if self.kind == "permute_batch":
            return x.permute(1, 0, 2, 3)
        if self.kind == "chunk_batch":  # chunk's default dimension is 0
            return x.chunk(2)[0]
        if self.kind == "split_batch":
            return torch.split(x, 1, 0)[0]
        if self.kind == "unbind_batch":
            return x.unbind()[0]
        if self.kind == "repeat_batch":
            return x.repeat(2, 1, 1, 1)
        if self.kind == "expand_leading":
            return x.expand(x.size(0), -1, -1, -1, -1)
        if self.kind == "new_leading_index":
            return x[None]
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind, node, reason", [
    ("get_attr", "offset", "tensor attribute"),
    ("batch_index", "getitem", "batch dimension"),
    ("mean_all", "mean", "over all dimensions"),
    ("mean_batch", "mean", "batch dimension"),
    ("pad_value", "pad", "non-zero value 1.0"),
    ("indices", "pool", "returns indices"),
    ("tensor_div", "truediv", "product of two tensors"),
    ("transpose_batch", "transpose", "permutation of dimensions over dimension 0, the batch dimension"),
    ("negative_transpose_batch", "transpose", "over dimension 0, the batch dimension"),
    ("permute_batch", "permute", "over dimension 0"),
    ("chunk_batch", "chunk", "splitting into parts over dimension 0"),
    ("split_batch", "split", "over dimension 0"),
    ("unbind_batch", "unbind", "over dimension 0"),
    ("repeat_batch", "repeat", "expand or repeat over dimension 0"),
    ("expand_leading", "expand", "adds leading dimensions"),
    ("new_leading_index", "getitem", "batch dimension"),
])
def test_unsupported_ops_are_named(kind: str, node: str, reason: str) -> None:
    gm = prepared(Weird(kind), torch.randn(1, 3, 4, 4))
    with pytest.raises(ConversionError, match=rf"node '{node}' .*: [^\n]*{reason}"):
        check_supported(gm)


class Reciprocal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return 1.0 / torch.relu(self.conv(x))


def test_a_negative_dimension_needs_the_rank() -> None:
    """Without shapes (no example input), dimension -4 may be the batch dimension: refused, not guessed."""
    with pytest.raises(ConversionError, match="negative dimension of a tensor whose rank is unknown"):
        check_supported(prepared(Weird("negative_transpose_batch")))


def test_the_parts_of_a_split_are_not_batch_indexing() -> None:
    """Indexing the tuple of chunk/split/unbind picks a part; it was reported as "indexing that selects along
    the batch dimension"."""
    check_supported(prepared(build(network=DataMovementNet)))


def test_constant_divided_by_tensor_is_rejected() -> None:
    gm = prepared(Reciprocal())
    with pytest.raises(ConversionError, match=r"node 'truediv'"):
        check_supported(gm)
