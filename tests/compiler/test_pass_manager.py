"""Pipeline: passes run in order and a failure names the pass it happened in."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn import ConversionError
from ann2snn.compiler.convert import prepare_pipeline
from ann2snn.compiler.pass_manager import Pipeline


def test_passes_run_in_order() -> None:
    calls = []
    pipeline = Pipeline([("double", lambda x: calls.append("double") or x * 2),
                         ("inc", lambda x: calls.append("inc") or x + 1)])
    assert pipeline.names == ["double", "inc"]
    assert pipeline.run(5) == 11
    assert calls == ["double", "inc"]


def test_failing_pass_is_named() -> None:
    def broken(_):
        raise KeyError("missing thing")

    ran = []
    pipeline = Pipeline([("first", lambda x: x), ("broken_pass", broken), ("never", lambda x: ran.append(x))])
    with pytest.raises(ConversionError, match=r"^\[pass broken_pass\] failed: KeyError: 'missing thing'") as info:
        pipeline.run(1)
    assert isinstance(info.value.__cause__, KeyError)
    assert ran == []


def test_conversion_error_keeps_message_and_gets_pass_name() -> None:
    def refuse(_):
        raise ConversionError("node 'x' is bad")

    with pytest.raises(ConversionError, match=r"^\[pass refuse\] node 'x' is bad$"):
        Pipeline([("refuse", refuse)]).run(None)


def test_prepare_pipeline_order() -> None:
    assert prepare_pipeline().names == ["trace", "normalize_activations", "remove_identities", "fold_batchnorm",
                                        "check_supported"]


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
