"""Activation–rate analysis: how closely each spiking layer reproduces the ANN activation it stands for, and
where the difference comes from.

For every activation, on the same images, four values per neuron:

* a: the ANN activation (the QANN's own graph with every quantizer back to its float activation, so BatchNorm
  is folded exactly as in the SNN);
* c = clamp(a, 0, theta): the activation clipped at the layer's threshold;
* q: the QANN activation (the quantizers of every layer up to this one in place);
* s_T: the SNN's decoded activation after T steps: spikes × the value of one spike (the neuron's
  v_threshold), divided by T for rate coding.

a - s_T = (a - c) + (c - q) + (q - s_T): the clipping error, the quantization error (this layer's rounding and
what the quantization of earlier layers changed in its input) and the remaining SNN error (unevenness of
spike timing, and what earlier layers' spiking error changed in its input). Each is reported as its L2 norm
relative to that of a, with the Pearson correlation between a and s_T.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from tqdm import tqdm

from ann2snn.compiler.qbits import quantizer_bits
from ann2snn.compiler.quantizer import float_network
from ann2snn.distributed import reduce_over_processes, require_on_every_process
from ann2snn.evaluation.report import network_text, save_figure, text_table
from ann2snn.io.atomic import atomic_write
from ann2snn.io.batches import device_of, model_inputs
from ann2snn.runtime.coding import coding
from ann2snn.runtime.network import SpikingNetwork, check_steps
from ann2snn.runtime.neuron_kinds import neuron_kind

ANALYSIS_FORMAT = "ann2snn-analysis"
ANALYSIS_VERSION = 1
ANALYSIS_JSON = "analysis.json"
SCATTER_PLOT = "activation_vs_rate.png"
ERROR_PLOT = "error_vs_T.png"
SOURCES_PLOT = "error_sources.png"
DEFAULT_SCATTER_POINTS = 2000
# Per layer and batch, how many neurons are kept for the scatter plot.
_POINTS_PER_BATCH = 256


@dataclass
class LayerAnalysis:
    """One activation over the analysed images. Errors are L2 norms relative to the ANN activation's."""

    name: str
    bits: int
    neurons: int
    mean_threshold: float
    clipped_fraction: float
    clipping_error: float | None
    quantization_error: float | None
    snn_error: dict[int, float | None]
    total_error: dict[int, float | None]
    clipped_error: dict[int, float | None]
    correlation: dict[int, float | None]
    scatter: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        by_T = ("snn_error", "total_error", "clipped_error", "correlation")
        return {key: ({str(T): value for T, value in getattr(self, key).items()} if key in by_T else getattr(self, key))
                for key in ("name", "bits", "neurons", "mean_threshold", "clipped_fraction", "clipping_error",
                            "quantization_error", *by_T)}


@dataclass
class Analysis:
    images: int
    T_list: list[int]
    scatter_T: int
    config: dict[str, Any]
    layers: list[LayerAnalysis]

    def to_json(self) -> dict[str, Any]:
        return {"format": ANALYSIS_FORMAT, "version": ANALYSIS_VERSION, "images": self.images,
                "T_list": list(self.T_list), "scatter_T": self.scatter_T, "config": dict(self.config),
                "definitions": {
                    "a": "ANN activation", "c": "clamp(a, 0, theta)", "q": "QANN activation",
                    "s_T": "SNN spikes in T steps x spike value (/ T for rate coding)",
                    "clipping_error": "|a - c| / |a|", "quantization_error": "|c - q| / |a|",
                    "snn_error": "|q - s_T| / |a|", "total_error": "|a - s_T| / |a|",
                    "clipped_error": "|c - s_T| / |a| (rate-coded neurons approach c rather than q)",
                    "correlation": "Pearson correlation of a and s_T over all neurons and images"},
                "layers": [layer.to_json() for layer in self.layers]}


class _Recorder:
    """Forward hooks keeping the latest output (or input) of named modules, flattened per sample."""

    def __init__(self, modules: dict[str, nn.Module], record_input: bool = False):
        self.values: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(
            lambda module, inputs, output, name=name: self.values.__setitem__(
                name, (inputs[0] if record_input else output).detach()))
            for name, module in modules.items()]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class _Sums:
    """Float64 running sums of one layer's statistics."""

    def __init__(self, T_list: Sequence[int]):
        self.count = 0
        self.clipped = 0
        self.a = self.a2 = self.clip2 = self.quant2 = 0.0
        self.per_T = {T: dict.fromkeys(("s", "s2", "as", "snn2", "total2", "clipped2"), 0.0) for T in T_list}

    def tree(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items()}


def _sum(x: torch.Tensor) -> float:
    return float(x.sum(dtype=torch.float64))


def _relative(square_sum: float, reference_square_sum: float) -> float | None:
    return math.sqrt(square_sum / reference_square_sum) if reference_square_sum > 0 else None


def _correlation(n: float, sa: float, sb: float, saa: float, sbb: float, sab: float) -> float | None:
    variance_a, variance_b = n * saa - sa * sa, n * sbb - sb * sb
    if variance_a <= 0 or variance_b <= 0:
        return None
    return (n * sab - sa * sb) / math.sqrt(variance_a * variance_b)


@torch.no_grad()
def analyze(snn: SpikingNetwork, loader: Iterable[Any], T_list: Iterable[int] | None = None, *,
            scatter_T: int | None = None, scatter_points: int = DEFAULT_SCATTER_POINTS, chunk_size: int | None = None,
            progress: bool = False, seed: int = 0) -> Analysis:
    """Compare every spiking layer of `snn` with its ANN and QANN activations on the batches of `loader`
    (inputs only; labels are ignored), at every T of `T_list` (default [snn.T]). `scatter_points` neurons
    per layer are sampled for the scatter plot, at `scatter_T` (default snn.T if listed, else the largest T).
    Under torchrun every process passes its shard and gets the statistics of all."""
    if snn.qann is None:
        raise ValueError("the spiking network has no QANN attached (snn.qann): the analysis compares against it")
    T_list = sorted(set([snn.T] if T_list is None else T_list))
    if not T_list:
        raise ValueError("T_list is empty: give at least one number of time steps to analyse")
    for T in T_list:
        check_steps("every T of T_list", T)
    scatter_T = scatter_T if scatter_T is not None else (snn.T if snn.T in T_list else T_list[-1])
    if scatter_T not in T_list:
        raise ValueError(f"scatter_T={scatter_T} is not one of the analysed T {T_list}")
    qann, neurons = snn.qann, snn.neurons
    bits = quantizer_bits(qann)
    quantizers = {name: qann.get_submodule(name) for name in bits}  # in graph order
    if missing := sorted(set(quantizers) - set(neurons)):
        raise ValueError(f"the spiking network has no neuron layer for the quantizers {', '.join(missing)}")
    reference = float_network(qann)
    ann_activations = _Recorder({name: reference.get_submodule(name) for name in quantizers})
    qann_activations = _Recorder(quantizers)
    sums = {name: _Sums(T_list) for name in quantizers}
    generator = torch.Generator().manual_seed(seed)
    scatter: dict[str, list[torch.Tensor]] = {name: [] for name in quantizers}
    spike_totals: dict[str, torch.Tensor] = {}
    # per layer, the counts after step s for every s a read-out window starts or ends at
    counts_after: dict[str, dict[int, torch.Tensor]] = {}
    starts = {T: snn.readout_start(T) for T in T_list}
    clipped: dict[str, torch.Tensor] = {}
    kind = neuron_kind(snn.config.get("neuron", "signed" if snn.coding.inject_once else "if"))

    def record_spikes(name: str, neuron: nn.Module, spikes: torch.Tensor) -> None:
        steps, t0 = neuron.steps, neuron.t0
        batch = spikes.shape[0] // steps
        sequence = spikes.reshape(steps, batch, -1)
        before = spike_totals.get(name, 0.0)
        spike_totals[name] = before + sequence.sum(0, dtype=torch.float64)
        counts = counts_after.setdefault(name, {0: torch.zeros((), dtype=torch.float64, device=spikes.device)})
        for point in {*starts.values(), *T_list} - {0}:
            if t0 < point <= t0 + steps:
                counts[point] = before + sequence[:point - t0].sum(0, dtype=torch.float64)
        a = ann_activations.values[name].reshape(batch, -1).double()
        q = qann_activations.values[name].reshape(batch, -1).double()
        # (not the neuron's threshold: balancing may have rescaled its input, see balance_thresholds)
        value = kind.spike_value(quantizers[name].theta, quantizers[name].levels).double()
        value = value.expand(ann_activations.values[name].shape).reshape(batch, -1)
        for T in T_list:
            if not t0 < T <= t0 + steps:
                continue
            # over the read-out window, as the network's output is read
            s = snn.coding.read_out((counts[T] - counts[starts[T]]) * value, T - starts[T])
            stats = sums[name].per_T[T]
            stats["s"] += _sum(s)
            stats["s2"] += _sum(s * s)
            stats["as"] += _sum(a * s)
            stats["snn2"] += _sum((q - s) ** 2)
            stats["total2"] += _sum((a - s) ** 2)
            stats["clipped2"] += _sum((clipped[name] - s) ** 2)
            if T == scatter_T:
                picks = torch.randint(0, a.numel(), (min(_POINTS_PER_BATCH, a.numel()),), generator=generator)
                picks = picks.to(a.device)
                scatter[name].append(torch.stack([a.flatten()[picks], s.flatten()[picks]]).cpu())

    handles = [neuron.register_forward_hook(
        lambda module, inputs, spikes, name=name: record_spikes(name, module, spikes))
        for name, neuron in neurons.items() if name in quantizers]
    images = 0
    try:
        for x in model_inputs(tqdm(loader, desc="analysing", unit="batch", disable=not progress, leave=False),
                              device_of(snn), "analysis"):
            images += x.shape[0]
            reference(x)
            qann(x)
            for name, quantizer in quantizers.items():
                a = ann_activations.values[name].double()
                theta = quantizer.theta.double()
                c = torch.minimum(a, theta)
                clipped[name] = c.reshape(x.shape[0], -1)
                q = qann_activations.values[name].double()
                layer = sums[name]
                layer.count += a.numel()
                layer.clipped += int((a > theta).sum())
                layer.a += _sum(a)
                layer.a2 += _sum(a * a)
                layer.clip2 += _sum((a - c) ** 2)
                layer.quant2 += _sum((c - q) ** 2)
            spike_totals.clear()
            counts_after.clear()
            # one sub-batch: the recorded activations are the whole batch's
            snn.simulate(x, T_list, chunk_size=chunk_size, sub_batch=x.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        ann_activations.close()
        qann_activations.close()
    require_on_every_process(images > 0, "the analysis loader yielded no batches")
    trees, images = reduce_over_processes(({name: layer.tree() for name, layer in sums.items()}, images), "sum")
    layers = []
    for name in quantizers:
        tree = trees[name]
        points = torch.cat(scatter[name], 1) if scatter[name] else torch.zeros(2, 0, dtype=torch.float64)
        if points.shape[1] > scatter_points:
            points = points[:, torch.randperm(points.shape[1], generator=generator)[:scatter_points]]
        n = tree["count"]
        layers.append(LayerAnalysis(
            name=name, bits=bits[name], neurons=n // images, mean_threshold=float(quantizers[name].theta.mean()),
            clipped_fraction=tree["clipped"] / n,
            clipping_error=_relative(tree["clip2"], tree["a2"]),
            quantization_error=_relative(tree["quant2"], tree["a2"]),
            snn_error={T: _relative(tree["per_T"][T]["snn2"], tree["a2"]) for T in T_list},
            total_error={T: _relative(tree["per_T"][T]["total2"], tree["a2"]) for T in T_list},
            clipped_error={T: _relative(tree["per_T"][T]["clipped2"], tree["a2"]) for T in T_list},
            correlation={T: _correlation(n, tree["a"], tree["per_T"][T]["s"], tree["a2"], tree["per_T"][T]["s2"],
                                         tree["per_T"][T]["as"]) for T in T_list},
            scatter={"ann": points[0].tolist(), "snn": points[1].tolist()}))
    config = {key: snn.config[key] for key in ("neuron", "qbits", "threshold_rule", "per_channel") if key in snn.config}
    return Analysis(images=images, T_list=T_list, scatter_T=scatter_T, config={**config, "coding": snn.coding.name},
                    layers=layers)


@dataclass(frozen=True)
class SpikingReference:
    """What a coding's SNN activation approaches, and so what its spiking error is measured against:
    accumulate-coded (signed) neurons settle on the QANN's levels q, rate-coded ones approach the clipped ANN
    activation c as T grows, whatever the QANN's bits."""

    error: str  # the LayerAnalysis attribute holding |reference - s_T| / |a|
    symbol: str
    name: str
    # whether the QANN's rounding lies on the way from the ANN activation to the SNN's
    quantized: bool


def spiking_reference(analysis: Analysis) -> SpikingReference:
    if coding(analysis.config["coding"]).settles:
        return SpikingReference("snn_error", "q", "QANN", quantized=True)
    return SpikingReference("clipped_error", "c", "clipped ANN", quantized=False)


def _network(analysis: Analysis) -> str:
    return f"{network_text(analysis.config)}, {analysis.config['coding']} coding"


def _value(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def analysis_summary(analysis: Analysis) -> str:
    """One row per layer: bits, threshold, the share of activations above it, and at every T the
    correlation of ANN and SNN activations and the relative errors by source."""
    reference = spiking_reference(analysis)
    header = ["Layer", "Bits", "Theta", "Clipped", "Clip err", "Quant err"]
    for T in analysis.T_list:
        header += [f"r T={T}", f"SNN err T={T}", f"Total T={T}"]
    rows = []
    for layer in analysis.layers:
        row = [layer.name, str(layer.bits), _value(layer.mean_threshold), f"{100 * layer.clipped_fraction:.2f} %",
               _value(layer.clipping_error), _value(layer.quantization_error)]
        for T in analysis.T_list:
            row += [_value(layer.correlation[T]), _value(getattr(layer, reference.error)[T]),
                    _value(layer.total_error[T])]
        rows.append(row)
    return (f"{_network(analysis)}, {analysis.images} images; errors are L2 norms relative to the ANN activation's\n"
            f"SNN err: against the {reference.name} ({reference.symbol}), which {analysis.config['coding']}-coded "
            f"neurons approach; r: correlation of the ANN activation and the SNN's decoded rate\n"
            + text_table(header, rows))


def plot_scatter(analysis: Analysis, path: str | Path) -> Path:
    """A grid with one scatter plot per layer: ANN activation against SNN rate × spike value at scatter_T."""
    layers = analysis.layers
    columns = max(1, math.ceil(math.sqrt(len(layers))))
    rows = max(1, math.ceil(len(layers) / columns))
    figure = Figure(figsize=(2.3 * columns, 2.2 * rows + 0.6), layout="constrained")
    grid = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axes, layer in zip(grid, layers):
        ann, snn = layer.scatter.get("ann", []), layer.scatter.get("snn", [])
        axes.scatter(ann, snn, s=2, alpha=0.3, color="tab:blue", rasterized=True)
        top = max([*ann, *snn, layer.mean_threshold, 1e-6])
        axes.plot([0, top], [0, top], color="tab:gray", linewidth=0.8, linestyle="--")
        axes.axvline(layer.mean_threshold, color="tab:red", linewidth=0.8, linestyle=":")
        axes.set_title(f"{layer.name} ({layer.bits} b)\nr = {_value(layer.correlation[analysis.scatter_T])}",
                       fontsize=7)
        axes.tick_params(labelsize=6)
    for axes in grid[len(layers):]:
        axes.set_visible(False)
    figure.suptitle(f"{_network(analysis)}: ANN activation against the SNN's decoded one "
                    f"({analysis.images} images)", fontsize=9)
    figure.supxlabel("ANN activation (red: mean threshold)", fontsize=9)
    figure.supylabel(f"SNN rate × spike value, T = {analysis.scatter_T}", fontsize=9)
    return save_figure(figure, path)


def plot_error_vs_T(analysis: Analysis, path: str | Path) -> Path:
    """Heat maps, layers × T: the SNN's error relative to the ANN activation, and against what its coding
    approaches (`spiking_reference`)."""
    names = [layer.name for layer in analysis.layers]
    reference = spiking_reference(analysis)
    figure = Figure(figsize=(2.0 + 1.1 * len(analysis.T_list) * 2, 1.6 + 0.28 * len(names)), layout="constrained")
    figure.suptitle(f"{_network(analysis)}: relative error at each T ({analysis.images} images)", fontsize=9)
    for axes, key, title in zip(figure.subplots(1, 2, sharey=True), ("total_error", reference.error),
                                ("|a - s_T| / |a| (vs ANN)",
                                 f"|{reference.symbol} - s_T| / |a| (vs {reference.name})")):
        values = np.array([[np.nan if getattr(layer, key)[T] is None else getattr(layer, key)[T]
                            for T in analysis.T_list] for layer in analysis.layers])
        image = axes.imshow(values, aspect="auto", cmap="viridis")
        for (row, column), value in np.ndenumerate(values):
            if not np.isnan(value):
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
        axes.set_xticks(range(len(analysis.T_list)), [str(T) for T in analysis.T_list], fontsize=7)
        axes.set_yticks(range(len(names)), names, fontsize=7)
        axes.set_xlabel("Time steps T")
        axes.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axes, shrink=0.8)
    return save_figure(figure, path)


def error_sources_figure(analysis: Analysis) -> Figure:
    """Per layer, the sources of the error at scatter_T, relative to the ANN activation: the clipping, then for
    accumulate coding the quantization and the SNN's distance from the QANN, for rate coding the SNN's distance
    from the clipped ANN (the QANN's rounding is no step on its way; see `spiking_reference`)."""
    layers, T = analysis.layers, analysis.scatter_T
    reference = spiking_reference(analysis)
    positions = np.arange(len(layers))
    figure = Figure(figsize=(max(7.0, 0.4 * len(layers) + 2.0), 4.2), layout="constrained")
    axes = figure.add_subplot()
    sources = [("clipping |a - c|", [layer.clipping_error for layer in layers], "tab:red")]
    if reference.quantized:
        sources.append(("quantization |c - q|", [layer.quantization_error for layer in layers], "tab:orange"))
    sources.append((f"SNN vs {reference.name} |{reference.symbol} - s_T|, T = {T}",
                    [getattr(layer, reference.error)[T] for layer in layers], "tab:blue"))
    width = 0.8 / len(sources)
    for index, (label, values, color) in enumerate(sources):
        axes.bar(positions + (index - (len(sources) - 1) / 2) * width,
                 [0.0 if value is None else value for value in values], width, label=label, color=color)
    axes.plot(positions, [np.nan if layer.total_error[T] is None else layer.total_error[T] for layer in layers],
              "kx", linestyle="none", label=f"total |a - s_T|, T = {T}")
    axes.set_xticks(positions, [layer.name for layer in layers], rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("L2 error / L2 norm of the ANN activation")
    axes.set_title(f"{_network(analysis)}: where each layer's error comes from ({analysis.images} images)\n"
                   f"{analysis.config['coding']}-coded neurons approach the {reference.name} {reference.symbol}: "
                   "SNN error measured against it", fontsize=9)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def plot_error_sources(analysis: Analysis, path: str | Path) -> Path:
    return save_figure(error_sources_figure(analysis), path)


def write_analysis(analysis: Analysis, directory: str | Path) -> list[Path]:
    """analysis.json and the three figures in `directory` (each written atomically); returns their paths."""
    directory = Path(directory)
    json_path = directory / ANALYSIS_JSON
    atomic_write(json_path, (json.dumps(analysis.to_json(), indent=2) + "\n").encode())
    return [json_path, plot_scatter(analysis, directory / SCATTER_PLOT),
            plot_error_vs_T(analysis, directory / ERROR_PLOT), plot_error_sources(analysis, directory / SOURCES_PLOT)]
