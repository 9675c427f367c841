"""tools/bench.py: the SpikingJelly-compatible rewrite computes what the model computes, and a minimal run
prints every section (the timings themselves are not tested: they live in the benchmark's output)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ann2snn.zoo import build_model

pytest.importorskip("spikingjelly")
_spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[2] / "tools" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench"] = bench
_spec.loader.exec_module(bench)


def test_spikingjelly_model_computes_what_the_model_computes() -> None:
    model = build_model("resnet20").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    rewritten = bench.spikingjelly_model(model, x)
    assert not [n for n in rewritten.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    assert any(isinstance(m, nn.ReLU) for m in rewritten.modules())
    torch.testing.assert_close(rewritten(x), model(x), rtol=1e-4, atol=1e-4)


def test_spikingjelly_converts_and_simulates_the_rewritten_resnet20() -> None:
    model = build_model("resnet20").eval()
    jelly = bench.SpikingJelly()
    net = jelly.convert(model, [torch.randn(8, 3, 32, 32)])
    assert jelly.simulate(net, torch.randn(2, 3, 32, 32), 3).shape == (2, 10)


@pytest.mark.shared
@pytest.mark.slow
def test_minimal_benchmark_run_prints_every_section(tmp_path, capsys) -> None:
    report = tmp_path / "bench.md"
    bench.main(["--models", "resnet20", "--T-list", "2", "--batches", "2", "--repeats", "1", "--threads", "1",
                "--markdown", str(report)])
    text = report.read_text()
    for section in ("## Simulation", "SNN / (T x ANN in SNN layout)", "SpikingJelly / ours", "## Conversion",
                    "## Peak memory", "## Adaptive time"):
        assert section in text
    assert text in capsys.readouterr().out
