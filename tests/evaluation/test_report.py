from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.container import ErrorbarContainer
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ann2snn
from ann2snn.evaluation.report import (
    ACCURACY_PLOT,
    REPORT_JSON,
    REPORT_MD,
    SPIKES_PLOT,
    accuracy_figure,
    markdown,
    spikes_figure,
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
    accuracy, intervals = document["accuracy"], document["accuracy_ci95"]

    def cell(value: float, bounds: list[float]) -> str:
        return f"{100 * value:.2f} % ({100 * bounds[0]:.1f}–{100 * bounds[1]:.1f})"

    assert text.startswith("# tiny_mlp → SNN: if neurons, 4-bit QANN, rate coding, threshold rule mse")
    assert "| Network | T | Top-1 (95 % CI) | Agrees with QANN |" in text
    assert f"| ANN | – | {cell(accuracy['ann'], intervals['ann'])} |" in text
    assert f"| QANN | – | {cell(accuracy['qann'], intervals['qann'])} |" in text
    for T in ("2", "4", "8"):
        assert f"| SNN | {T} | {cell(accuracy['snn'][T], intervals['snn'][T])} |" in text
    assert "Top-1 in brackets: the 95 % Wilson score interval of the accuracy on 32 images" in text
    for layer in document["spikes"]["per_layer"]:
        assert f"| {layer['name']} | {layer['neurons']} |" in text
    assert "E_MAC = 4.6 pJ, E_AC = 0.9 pJ" in text
    assert "32 images of 64, a stratified subset drawn with seed 0" in text
    assert f"]({ACCURACY_PLOT})" in text and f"]({SPIKES_PLOT})" in text


def test_every_accuracy_carries_its_wilson_interval() -> None:
    # the labels are the ANN's own predictions: 32 of 32 correct, whose interval is [n / (n + z^2), 1]
    document = evaluated_document()
    assert document["accuracy"]["ann"] == 1.0
    assert document["accuracy_ci95"]["ann"] == pytest.approx([32 / (32 + 1.959964 ** 2), 1.0], abs=1e-6)
    assert set(document["accuracy_ci95"]["snn"]) == set(document["accuracy"]["snn"]) == {"2", "4", "8"}
    for T, bounds in document["accuracy_ci95"]["snn"].items():
        assert bounds[0] <= document["accuracy"]["snn"][T] <= bounds[1]
    assert "| ANN | – | 100.00 % (89.3–100.0) |" in markdown(document)
    summary_rows = [line.split()[:5] for line in summary(document).splitlines()]
    assert ["ANN", "–", "100.00", "%", "(89.3–100.0)"] in summary_rows


def test_memory_line_tells_the_planned_working_set_from_the_measured_peak() -> None:
    # reported as "Memory: peak 783 MiB ..., limit 30 MiB", which reads as a limit broken
    document = evaluated_document()
    document["timing"].update(peak_memory_mb=783.2, peak_memory_measure="peak resident memory of the process",
                              memory_limit_mb=30.0, chunk_size=4)
    line = "Memory: simulation working set planned within 30 MiB (chunks of 4 time steps); whole-run peak 783 MiB " \
           "(peak resident memory of the process)"
    assert line in summary(document).splitlines()
    assert line + "." in markdown(document)


def test_accuracy_figure_has_error_bars_and_two_visible_reference_lines() -> None:
    # reported: no error bars, and equal ANN and QANN lines drawn over each other; the title named neither the
    # neuron kind nor the bits
    document = evaluated_document()
    document["accuracy"]["qann"] = document["accuracy"]["ann"]
    document["accuracy_ci95"]["qann"] = document["accuracy_ci95"]["ann"]
    axes = accuracy_figure(document).axes[0]

    error_bars = [container for container in axes.containers if isinstance(container, ErrorbarContainer)]
    assert len(error_bars) == 1 and error_bars[0].has_yerr
    segments = error_bars[0].lines[2][0].get_segments()
    for segment, T in zip(segments, ("2", "4", "8")):
        assert [y for _, y in segment] == pytest.approx([100 * bound for bound in document["accuracy_ci95"]["snn"][T]])
    lines = {line.get_label().split()[0]: line for line in axes.get_lines() if line.get_label()[:1] in "AQ"}
    ann, qann = lines["ANN"], lines["QANN"]
    assert ann.get_ydata()[0] == qann.get_ydata()[0]
    assert ann.get_linestyle() != qann.get_linestyle() and ann.get_linewidth() > qann.get_linewidth() + 0.5
    assert ann.get_zorder() < qann.get_zorder(), "the thinner line must be drawn on top of the wider one"
    assert ann.get_label() == "ANN 100.0 % (89.3–100.0)" and qann.get_label() == "QANN 100.0 % (89.3–100.0)"
    labels = [text.get_text() for text in axes.texts]
    assert "ANN 100.0 %" in labels and "QANN 100.0 %" in labels
    assert "if neurons, 4-bit" in axes.get_title() and "rate coding" in axes.get_title()


@pytest.mark.parametrize("neuron, qbits, named", [
    ("signed", 3, "signed neurons, 3-bit"),
    ("if", {"default": 4, "first": 8}, "if neurons, 4–8-bit (per layer)"),
])
def test_figure_titles_name_the_neuron_kind_and_the_bits(neuron: str, qbits, named: str) -> None:
    document = evaluated_document()
    document["config"].update(neuron=neuron, qbits=qbits)
    assert named in accuracy_figure(document).axes[0].get_title()
    assert named in spikes_figure(document).axes[0].get_title()
    assert f"SNN: {named} QANN" in summary(document).splitlines()[0]


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
