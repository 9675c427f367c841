"""The pass manager: passes run in order, the graph checks run after each, changes are recorded and a
failure names the pass it happened in."""
from __future__ import annotations

import operator
from functools import partial

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn import ConversionError
from ann2snn.compiler.convert import prepare_pipeline
from ann2snn.compiler.pass_manager import PassManager, run_passes
from ann2snn.errors import InputError


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x) + 1


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(Affine())


def _double_output(gm: fx.GraphModule) -> fx.GraphModule:
    (output,) = [node for node in gm.graph.nodes if node.op == "output"]
    with gm.graph.inserting_before(output):
        doubled = gm.graph.call_function(operator.mul, (output.args[0], 2))
    output.replace_input_with(output.args[0], doubled)
    return gm


def test_passes_run_in_order() -> None:
    calls = []
    manager = PassManager([("first", lambda gm: calls.append("first") or gm),
                           ("second", lambda gm: calls.append("second") or gm)])
    assert manager.names == ["first", "second"]
    gm = _graph()
    assert manager.run(gm) is gm
    assert calls == ["first", "second"]


def test_checks_run_after_every_pass() -> None:
    """A pass only edits the graph: the manager regenerates the code, drops dead nodes and the submodules
    no node calls any more, and lints, before the next pass sees the graph."""
    def drop_linear(gm: fx.GraphModule) -> fx.GraphModule:
        (linear,) = [node for node in gm.graph.nodes if node.op == "call_module"]
        linear.replace_all_uses_with(linear.args[0])  # left in the graph, dead
        return gm

    seen = []
    gm = PassManager([("double", _double_output), ("drop_linear", drop_linear),
                      ("look", lambda gm: seen.append([node.op for node in gm.graph.nodes]) or gm)]).run(_graph())
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), (x + 1) * 2)
    assert seen == [["placeholder", "call_function", "call_function", "output"]]
    assert not hasattr(gm, "linear")


def test_a_pass_that_breaks_the_graph_is_named() -> None:
    def dangling(gm: fx.GraphModule) -> fx.GraphModule:
        (linear,) = [node for node in gm.graph.nodes if node.op == "call_module"]
        gm.graph.erase_node(next(iter(linear.users)))  # the output still reads it
        return gm

    with pytest.raises(ConversionError, match=r"^\[pass dangling\] failed: "):
        PassManager([("dangling", dangling)]).run(_graph())
    with pytest.raises(ConversionError, match=r"^\[pass forgetful\] returned a NoneType, not a GraphModule"):
        PassManager([("forgetful", lambda gm: None)]).run(_graph())


def test_the_result_records_which_passes_changed_the_graph() -> None:
    def new_weights(gm: fx.GraphModule) -> fx.GraphModule:
        gm.linear.weight.data.zero_()
        return gm

    def swap_module(gm: fx.GraphModule) -> fx.GraphModule:
        gm.add_submodule("linear", nn.Sequential(nn.Linear(3, 3)))
        return gm

    result = PassManager([("nothing", lambda gm: gm), ("weights", new_weights), ("double", _double_output),
                          ("swap", swap_module)])(_graph())
    assert result.changed == {"nothing": False, "weights": False, "double": True, "swap": True}
    assert [record.name for record in result.records] == ["nothing", "weights", "double", "swap"]
    assert isinstance(result.graph_module, fx.GraphModule)


def test_prepare_pipeline_records_changes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    assert prepare_pipeline()(model).changed == {
        "trace": True, "normalize_activations": True, "remove_identities": False, "fold_batchnorm": False,
        "check_supported": False}


def test_run_passes_names_each_pass_by_its_function() -> None:
    def broken(gm, factor):
        raise KeyError(factor)

    with pytest.raises(ConversionError, match=r"^\[pass broken\] failed: KeyError: 3"):
        run_passes(_graph(), _double_output, partial(broken, factor=3))
    x = torch.randn(2, 3)
    gm = run_passes(Affine(), fx.symbolic_trace, _double_output)
    torch.testing.assert_close(gm(x), (gm.linear(x) + 1) * 2)


def test_failing_pass_is_named() -> None:
    def broken(_):
        raise KeyError("missing thing")

    ran = []
    manager = PassManager([("first", lambda gm: gm), ("broken_pass", broken), ("never", lambda gm: ran.append(gm))])
    with pytest.raises(ConversionError, match=r"^\[pass broken_pass\] failed: KeyError: 'missing thing'") as info:
        manager.run(_graph())
    assert isinstance(info.value.__cause__, KeyError)
    assert ran == []


def test_conversion_error_keeps_message_and_gets_pass_name() -> None:
    def refuse(_):
        raise ConversionError("node 'x' is bad")

    with pytest.raises(ConversionError, match=r"^\[pass refuse\] node 'x' is bad$"):
        PassManager([("refuse", refuse)]).run(_graph())


def test_input_errors_pass_through_unwrapped() -> None:
    def bad_data(_):
        raise InputError("calibration batch 0 contains NaN")

    with pytest.raises(InputError, match=r"^calibration batch 0 contains NaN$"):
        PassManager([("bad_data", bad_data)]).run(_graph())


def test_prepare_pipeline_order() -> None:
    assert prepare_pipeline().names == ["trace", "normalize_activations", "remove_identities", "fold_batchnorm",
                                        "check_supported"]
    assert prepare_pipeline(fold_batchnorm=False).names == ["trace", "normalize_activations", "remove_identities",
                                                            "check_supported"]
    assert prepare_pipeline(check_supported=False).names == ["trace", "normalize_activations", "remove_identities",
                                                             "fold_batchnorm"]


def test_prepare_pipeline_options() -> None:
    """Without folding the BatchNorm stays (fine-tuning trains it); without the check an unsupported op stays
    in the graph (`ann2snn inspect` lists it)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    kept = prepare_pipeline(fold_batchnorm=False, check_supported=False).run(model)
    assert [type(m).__name__ for m in kept.children()] == ["Conv2d", "BatchNorm2d", "ClippedReLU"]
    gelu = prepare_pipeline(check_supported=False).run(Gelu().eval())
    assert [node.target for node in gelu.graph.nodes if node.op == "call_function"] == [F.gelu]


class Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.gelu(self.conv(x))


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.mean() > 0 else -x


def test_api_errors_name_the_pass() -> None:
    calib = [torch.randn(2, 3, 6, 6)]
    with pytest.raises(ConversionError, match=r"(?s)^\[pass check_supported\] 1 node\(s\).*node 'gelu'"):
        ann2snn.quantize(Gelu().eval(), calib, 2)
    with pytest.raises(ConversionError, match=r"^\[pass trace\] torch.fx could not trace the top-level Branchy"), \
            pytest.warns(UserWarning, match="training mode"):
        ann2snn.convert(Branchy(), calib, qbits=2)
    # a calibration loader yielding nothing fails before any pass runs
    with pytest.raises(ValueError, match="no batches"):
        ann2snn.quantize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).eval(), [], 2)


def test_prepare_pipeline_output_matches_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 16, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    model.eval()
    gm = prepare_pipeline().run(model)
    types = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert types == ["Conv2d", "ClippedReLU", "Flatten", "Linear"]
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
