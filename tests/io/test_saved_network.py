from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.io.saved_network import FORMAT, is_saved_network, load_saved


class TinyNet(nn.Module):
    """A model class that exists only in this test module: a loader that needed it would fail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.head(torch.flatten(x, 1))


@pytest.fixture
def converted() -> tuple[TinyNet, ann2snn.SpikingNetwork]:
    model = TinyNet().eval()
    return model, ann2snn.convert(model, [torch.randn(16, 3, 8, 8)], T=8)


def test_round_trip_keeps_outputs_config_metadata_and_ann(tmp_path: Path, converted) -> None:
    model, snn = converted
    x = torch.randn(4, 3, 8, 8)
    expected = snn.simulate(x, [4, 8]).outputs
    path = ann2snn.save(snn, tmp_path / "snn.pt", {"preprocessing": {"mean": [0.5]}, "note": "tiny"}, ann=model)

    saved = load_saved(path)
    assert saved.metadata == {"preprocessing": {"mean": [0.5]}, "note": "tiny"}
    assert saved.snn.config == snn.config and saved.snn.T == 8 and saved.snn.coding == "rate"
    for T, output in saved.snn.simulate(x, [4, 8]).outputs.items():
        torch.testing.assert_close(output, expected[T], rtol=0, atol=0)
    torch.testing.assert_close(saved.ann(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(saved.snn.qann(x), snn.qann(x), rtol=0, atol=0)
    assert isinstance(ann2snn.load(path), ann2snn.SpikingNetwork)


def test_saving_leaves_the_network_alone_and_stores_no_simulation_state(tmp_path: Path, converted) -> None:
    _, snn = converted
    snn.simulate(torch.randn(2, 3, 8, 8), [8])
    ann2snn.save(snn, tmp_path / "snn.pt")
    assert any(neuron.v is not None for neuron in snn.neurons.values())
    assert all(neuron.v is None for neuron in ann2snn.load(tmp_path / "snn.pt").neurons.values())


def test_loads_without_the_model_code(tmp_path: Path, converted) -> None:
    model, snn = converted
    x = torch.randn(2, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    torch.save(snn(x), tmp_path / "expected.pt")
    ann2snn.save(snn, tmp_path / "snn.pt", ann=model)
    script = textwrap.dedent(f"""
        import sys
        import torch
        import ann2snn.io.saved_network

        class NoModelCode:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("models", "tests", "test_serialization"):
                    raise ImportError(f"{{name}} is not available here")

        sys.meta_path.insert(0, NoModelCode())
        saved = ann2snn.io.saved_network.load_saved({str(tmp_path / "snn.pt")!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        assert torch.equal(saved.snn(x), torch.load({str(tmp_path / "expected.pt")!r}))
        saved.ann(x)
    """)
    # A fresh interpreter outside the repository, where importing model code fails.
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr


def test_foreign_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    state_dict = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), state_dict)
    pickled_module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled_module)
    text = tmp_path / "notes.txt"
    text.write_text("not torch")
    for path in (state_dict, pickled_module, text):
        assert not is_saved_network(path)
        with pytest.raises(ValueError, match=f"not a spiking network saved by ann2snn.save .*'{FORMAT}'"):
            ann2snn.load(path)
    with pytest.raises(FileNotFoundError):
        ann2snn.load(tmp_path / "missing.pt")


def test_newer_format_versions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"format": FORMAT, "version": 99, "metadata": {}, "modules": torch.zeros(1, dtype=torch.uint8)}, path)
    with pytest.raises(ValueError, match="format version 99"):
        ann2snn.load(path)


def test_writing_is_atomic(tmp_path: Path, converted, monkeypatch: pytest.MonkeyPatch) -> None:
    _, snn = converted
    path = ann2snn.save(snn, tmp_path / "snn.pt", {"generation": 1})

    def interrupted(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        ann2snn.save(snn, path, {"generation": 2})
    monkeypatch.undo()
    assert load_saved(path).metadata == {"generation": 1}
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["snn.pt"]


def test_save_refuses_other_modules(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expected a SpikingNetwork"):
        ann2snn.save(nn.Linear(2, 2), tmp_path / "x.pt")
