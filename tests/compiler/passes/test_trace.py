"""Pass 1 (trace): FX tracing with module paths, source lines and readable tracing errors."""
from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ann2snn import ConversionError
from ann2snn.compiler.passes import trace
from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer
from ann2snn.errors import describe_node


def _line_of(function, needle: str) -> int:
    lines, first = inspect.getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if needle in line)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))  # block relu


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.act = ClippedReLU(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.block(x))
        return self.head(torch.flatten(x, 1))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent branch
            return x
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 3, 1), Gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x) + 1


class TopLevelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        for _ in range(int(x.max())):  # data-dependent loop at the top level
            x = x + 1
        return x


def test_trace_matches_eager_and_records_module_paths() -> None:
    model = Net().eval()
    gm = trace(model)
    assert isinstance(gm, fx.GraphModule)

    nodes = {node.name: node for node in gm.graph.nodes}
    assert nodes["block_conv"].op == "call_module" and nodes["block_conv"].target == "block.conv"
    assert nodes["block_conv"].meta["module_path"] == "block.conv"
    assert nodes["relu"].op == "call_function" and nodes["relu"].target is F.relu
    assert nodes["relu"].meta["module_path"] == "block"
    assert nodes["head"].meta["module_path"] == "head"
    # top-level functional code lies in no submodule
    assert "module_path" not in nodes["flatten"].meta
    # the library's own layers are leaves (not traced through)
    assert nodes["act"].op == "call_module" and isinstance(gm.get_submodule("act"), ClippedReLU)

    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_trace_records_user_source_lines() -> None:
    gm = trace(Net().eval())
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    # the recorded stack does hold the user's line ...
    assert "# block relu" in relu.stack_trace
    # ... and the node description should point at it
    description = describe_node(gm, relu)
    assert f"{__file__}:{_line_of(Block.forward, '# block relu')}" in description
    assert "inside 'block'" in description and "node 'relu'" in description


def test_quantizer_is_a_leaf() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), QCFSQuantizer(3))
    gm = trace(model)
    ops = [(n.op, n.target) for n in gm.graph.nodes]
    assert ops == [("placeholder", "input"), ("call_module", "0"), ("call_module", "1"), ("output", "output")]


def test_data_dependent_branch_names_submodule_and_source_line() -> None:
    line = _line_of(Gate.forward, "# data-dependent branch")
    with pytest.raises(ConversionError, match=r"module 'stage\.1' \(Gate\)") as info:
        trace(Gated().eval())
    assert f"{__file__}:{line}" in str(info.value)
    assert "if x.sum() > 0" in str(info.value)


def test_data_dependent_loop_at_top_level() -> None:
    line = _line_of(TopLevelBranch.forward, "# data-dependent loop")
    with pytest.raises(ConversionError, match=re.escape(f"{__file__}:{line}")) as info:
        trace(TopLevelBranch().eval())
    assert "top-level TopLevelBranch" in str(info.value)
