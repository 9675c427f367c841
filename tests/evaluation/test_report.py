from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ann2snn
from ann2snn.evaluation.report import (
    ACCURACY_PLOT,
    REPORT_JSON,
    REPORT_MD,
    SPIKES_PLOT,
    markdown,
    summary,
    write_report,
)


def evaluated_document(with_ann: bool = True) -> dict:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 4)).eval()
    inputs = torch.randn(32, 3, 2, 2)
    data = TensorDataset(inputs, model(inputs).argmax(-1).detach())
    snn = ann2snn.convert(model, DataLoader(data, batch_size=16), T=8)
    report = ann2snn.evaluate(snn, DataLoader(data, batch_size=16), [2, 4, 8], ann=model if with_ann else None)
    return {**report.to_json(),
            "model": {"checkpoint": "tiny.pt", "arch": "tiny_mlp", "arch_kwargs": {}, "arch_source": "argument"},
            "data": {"evaluation": {"spec": "synthetic", "images": 32, "available": 64, "seed": 0}}}


def assert_real_figure(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 800 and image.height >= 600
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10, "the figure is blank"


def test_write_report_files(tmp_path: Path) -> None:
    document = evaluated_document()
    backend = matplotlib.get_backend()
    written = write_report(document, tmp_path)

    assert [path.name for path in written] == [REPORT_JSON, REPORT_MD, ACCURACY_PLOT, SPIKES_PLOT]
    assert json.loads((tmp_path / REPORT_JSON).read_text()) == json.loads(json.dumps(document))
    assert (tmp_path / REPORT_MD).read_text() == markdown(document)
    assert_real_figure(tmp_path / ACCURACY_PLOT)
    assert_real_figure(tmp_path / SPIKES_PLOT)
    assert matplotlib.get_backend() == backend, "writing figures must not switch the user's backend"


def test_markdown_tables() -> None:
    document = evaluated_document()
    text = markdown(document)
    accuracy = document["accuracy"]

    assert text.startswith("# tiny_mlp → SNN: if neurons, 4-bit QANN, rate coding, threshold rule mse")
    assert "| Network | T | Top-1 | Agrees with QANN |" in text
    assert f"| ANN | – | {100 * accuracy['ann']:.2f} % |" in text
    assert f"| QANN | – | {100 * accuracy['qann']:.2f} % |" in text
    for T in ("2", "4", "8"):
        assert f"| SNN | {T} | {100 * accuracy['snn'][T]:.2f} % |" in text
    for layer in document["spikes"]["per_layer"]:
        assert f"| {layer['name']} | {layer['neurons']} |" in text
    assert "E_MAC = 4.6 pJ, E_AC = 0.9 pJ" in text
    assert "32 images of 64, a stratified subset drawn with seed 0" in text
    assert f"]({ACCURACY_PLOT})" in text and f"]({SPIKES_PLOT})" in text


def test_summary_fits_one_screen() -> None:
    text = summary(evaluated_document())
    lines = text.splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 120
    assert any(line.split()[:1] == ["QANN"] for line in lines)
    assert sum(line.split()[:1] == ["SNN"] for line in lines) == 3


def test_report_without_an_ann(tmp_path: Path) -> None:
    document = evaluated_document(with_ann=False)
    assert document["accuracy"]["ann"] is None
    write_report(document, tmp_path)
    assert "| ANN | – | – |" in (tmp_path / REPORT_MD).read_text()
    assert_real_figure(tmp_path / ACCURACY_PLOT)


@pytest.mark.parametrize("value, text", [(36_957_504, "36.96 M"), (512, "512"), (1.5e9, "1.50 G"), (None, "–")])
def test_number_formatting(value: float | None, text: str) -> None:
    from ann2snn.evaluation.report import si_prefixed

    assert si_prefixed(value) == text
