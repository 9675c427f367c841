"""The op table: roles by module class, function and method; the node-argument accessor; one entry adds an op."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ann2snn import ConversionError
from ann2snn.compiler.convert import prepare_pipeline
from ann2snn.compiler.ops import NOT_RELU, OPS, Op, Role, is_shape_value, node_arg, relu_upper, role_of
from ann2snn.compiler.passes import trace
from ann2snn.compiler.quantizer import ClippedReLU


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu6 = nn.ReLU6()
        self.drop = nn.Dropout(0.1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.drop(self.relu6(self.bn(self.conv(x))))
        x = F.hardtanh(x, -1.0, 1.0) + x.clamp(min=0, max=2) + F.hardtanh(x, 0.0, 3.0)
        x = F.avg_pool2d(self.pool(x), 2).flatten(1) * 0.5
        return self.fc(x[:, : x.size(1) // 2 * 2])


def _roles(gm: fx.GraphModule) -> dict[str, Role | None]:
    return {node.name: role_of(gm, node) for node in gm.graph.nodes if node.op not in ("placeholder", "output")}


def test_roles_of_modules_functions_and_methods() -> None:
    gm = fx.symbolic_trace(Mixed())
    assert _roles(gm) == {
        "conv": Role.WEIGHTED, "bn": Role.NORMALIZATION, "relu6": Role.ACTIVATION, "drop": Role.IDENTITY,
        "hardtanh": None,  # clips at -1: not ReLU-like
        "clamp": Role.ACTIVATION, "add": Role.ADD, "hardtanh_1": Role.ACTIVATION, "add_1": Role.ADD,
        "pool": Role.MAX_POOLING, "avg_pool2d": Role.AVG_POOLING, "flatten": Role.RESHAPING, "mul": Role.MUL,
        "size": Role.SHAPE, "floordiv": Role.INTEGER_ARITHMETIC, "mul_1": Role.MUL, "getitem": Role.INDEXING,
        "fc": Role.WEIGHTED}
    uppers = {node.name: relu_upper(gm, node) for node in gm.graph.nodes}
    assert (uppers["relu6"], uppers["clamp"], uppers["hardtanh_1"]) == (6.0, 2.0, 3.0)
    assert uppers["hardtanh"] is NOT_RELU and uppers["conv"] is NOT_RELU


def test_a_module_subclass_takes_its_nearest_entry() -> None:
    class MyReLU6(nn.ReLU6):
        pass

    gm = trace(nn.Sequential(nn.Hardtanh(0.0, 2.0), MyReLU6(), nn.Hardtanh()), leaf_types=(MyReLU6,))
    assert [relu_upper(gm, node) for node in gm.graph.nodes if node.op == "call_module"] == [2.0, 6.0, NOT_RELU]


def test_sizes_and_arithmetic_on_them_are_shape_values() -> None:
    gm = fx.symbolic_trace(Mixed())
    nodes = {node.name: node for node in gm.graph.nodes}
    assert is_shape_value(nodes["size"]) and is_shape_value(nodes["floordiv"]) and is_shape_value(nodes["mul_1"])
    assert not is_shape_value(nodes["mul"]) and not is_shape_value(nodes["flatten"]) and is_shape_value(3)


def test_node_arg_reads_positional_keyword_or_default() -> None:
    class Calls(nn.Module):
        def forward(self, x):
            return torch.clamp(x, 0, 3) + torch.clamp(x, min=0) + x.clamp(0)

    calls = [node for node in fx.symbolic_trace(Calls()).graph.nodes if "clamp" in node.name]
    assert [node_arg(node, 1, "min") for node in calls] == [0, 0, 0]
    assert [node_arg(node, 2, "max", "none") for node in calls] == [3, "none", "none"]


class Leaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.LeakyReLU(0.0)

    def forward(self, x):
        return self.act(self.conv(x))


def test_one_entry_adds_an_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LeakyReLU of slope 0 is a ReLU once the table says so: normalised, and then supported."""
    with pytest.raises(ConversionError, match=r"node 'act' \[call_module act \(LeakyReLU\)\]"):
        prepare_pipeline().run(Leaky().eval())
    monkeypatch.setitem(OPS, nn.LeakyReLU, Op(Role.ACTIVATION,
                                              upper=lambda module: None if module.negative_slope == 0 else NOT_RELU))
    gm = prepare_pipeline().run(Leaky().eval())
    assert isinstance(gm.act, ClippedReLU) and gm.act.upper is None


class Moves(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        c = torch.split(a, 1, -1)[0]
        d = torch.transpose(b, 2, 3).permute(0, 1, 3, 2).contiguous()
        e = d.unbind(dim=1)[0].unsqueeze(1)
        return c.expand(-1, -1, -1, 4) + e.repeat(1, 2, 1, 1)[:, :2] + x.mean([2, 3], keepdim=True)[:, :2]


def test_data_movement_roles_and_the_dimensions_they_act_on() -> None:
    """What check_supported compares with the batch dimension: the dimensions each op moves, splits, replicates
    or reduces (negative ones as written, counted from the end)."""
    gm = fx.symbolic_trace(Moves())
    ops = {node.name: OPS[node.target] for node in gm.graph.nodes if node.op in ("call_function", "call_method")
           and node.target in OPS and OPS[node.target].dims is not None}
    nodes = {node.name: node for node in gm.graph.nodes}
    assert {name: (op.role, op.dims(nodes[name])) for name, op in ops.items()} == {
        "chunk": (Role.SPLITTING, (1,)), "split": (Role.SPLITTING, (-1,)), "transpose": (Role.PERMUTING, (2, 3)),
        "permute": (Role.PERMUTING, (2, 3)), "unbind": (Role.SPLITTING, (1,)), "expand": (Role.REPLICATING, (3,)),
        "repeat": (Role.REPLICATING, (1,)), "mean": (Role.MEAN, (2, 3))}
    assert role_of(gm, nodes["contiguous"]) is Role.RESHAPING  # kept: a view after a transpose needs it


def test_every_role_is_used_and_every_entry_is_well_formed() -> None:
    assert {op.role for op in OPS.values()} == set(Role)
    for target, op in OPS.items():
        assert isinstance(target, (type, str)) or callable(target), target
        assert (op.upper is not None) == (op.role is Role.ACTIVATION), target
        assert not op.on_sizes or getattr(operator, getattr(target, "__name__", ""), None) is target, target
        assert (op.dims is not None) == (op.role in (Role.PERMUTING, Role.SPLITTING, Role.REPLICATING,
                                                     Role.MEAN)), target
