"""Writing an evaluation report: report.json, report.md, two figures, and the terminal summary.

Everything here reads the report.json document (`EvaluationReport.to_json()`, possibly with the
command line's `model` and `data` sections added), so a report can be re-rendered from its JSON.
Figures are drawn on matplotlib `Figure` objects directly: no pyplot, no global backend change."""
from __future__ import annotations

import io
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ann2snn.io.atomic import atomic_write

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ACCURACY_PLOT = "accuracy_vs_T.png"
SPIKES_PLOT = "spikes_per_layer.png"
_DPI = 200

Document = dict[str, Any]


def si_prefixed(value: float | None) -> str:
    """1234567 -> '1.23 M'."""
    if value is None:
        return "–"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:.4g}"


def _percent(fraction: float | None, digits: int = 2) -> str:
    return "–" if fraction is None else f"{100 * fraction:.{digits}f} %"


def _interval(bounds: Sequence[float] | None) -> str:
    """[0.829, 0.873] -> '(82.9–87.3)', in percent."""
    return "" if bounds is None else f" ({100 * bounds[0]:.1f}–{100 * bounds[1]:.1f})"


def _accuracy(document: Document, network: str, T: str | None = None) -> str:
    """An accuracy with its 95 % confidence interval: '85.20 % (82.9–87.3)' (reports written before the
    intervals were recorded show the accuracy alone)."""
    accuracy = document["accuracy"][network]
    interval = document.get("accuracy_ci95", {}).get(network)
    if T is not None:
        accuracy, interval = accuracy[T], (interval or {}).get(T)
    return _percent(accuracy) + ("" if accuracy is None else _interval(interval))


def _energy(microjoules: float | None) -> str:
    return "–" if microjoules is None else f"{microjoules:.2f} µJ"


def _T_values(document: Document) -> list[int]:
    return sorted(int(T) for T in document["accuracy"]["snn"])


def _network_rows(document: Document) -> tuple[list[str], list[list[str]]]:
    """One row per network (ANN, QANN, SNN at each T): accuracy, operations and energy per image."""
    energy = document["energy"]
    agreement = document.get("agreement_snn_qann") or {}
    ratios = energy.get("ann_over_snn") or {}
    header = ["Network", "T", "Top-1 (95 % CI)", "Agrees with QANN", "Spikes/img", "MACs/img", "ACs (synops)/img",
              "Energy/img", "ANN/SNN energy"]
    rows = [["ANN", "–", _accuracy(document, "ann"), "–", "–", si_prefixed(document["ann_macs_per_image"]), "–",
             _energy(energy["ann_uj_per_image"]), "1.00" if energy["ann_uj_per_image"] else "–"],
            ["QANN", "–", _accuracy(document, "qann"), "–", "–", "–", "–", "–", "–"]]
    for T in _T_values(document):
        key = str(T)
        ratio = ratios.get(key)
        rows.append(["SNN", key, _accuracy(document, "snn", key), _percent(agreement.get(key)),
                     si_prefixed(document["spikes"]["per_image"][key]),
                     si_prefixed(document["snn_macs_per_image"][key]),
                     si_prefixed(document["synops_per_image"][key]), _energy(energy["snn_uj_per_image"][key]),
                     "–" if ratio is None else f"{ratio:.2f}"])
    return header, rows


def _significant_energy(microjoules: float) -> str:
    """Three significant digits: a layer's share can be a thousandth of a µJ."""
    return f"{microjoules:.3g} µJ"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _memory_energy_rows(memory: Document) -> tuple[list[str], list[list[str]]]:
    """One row per network (ANN, SNN at each T): the memory-aware energy per image by term, and the ratio."""
    header = ["Network", "T", "Weights", "Activations/spikes", "Membranes", "Operations", "Total", "ANN/SNN"]
    terms = memory["terms"]

    def row(network: str, T: str, values: Document, ratio: str) -> list[str]:
        return [network, T, *(_significant_energy(values[f"{term}_uj"]) for term in (
            "weights", "activations", "membranes", "operations", "total")), ratio]

    rows = [row("ANN", "–", terms["ann"], "1.00")] if terms["ann"] is not None else []
    ratios = memory["ann_over_snn"] or {}
    rows += [row("SNN", T, values, _ratio(ratios.get(T))) for T, values in terms["snn"].items()]
    return header, rows


def _memory_layer_rows(layers: list[Document]) -> tuple[list[str], list[list[str]]]:
    """Per layer of one network: what it reads and computes per image, its operation-only energy and its
    memory-aware terms (spiking layers: their membranes and updates)."""
    header = ["Layer", "Weight reads", "Input reads", "MACs", "ACs", "Operation-only", "Weights", "Activations/spikes",
              "Membranes", "Operations", "Memory-aware"]
    rows = []
    for layer in layers:
        if layer["kind"] == "synaptic":
            counts = [si_prefixed(layer["weight_reads"]), si_prefixed(layer["spike_reads"] + layer["value_reads"]),
                      si_prefixed(layer["multiply_accumulates"]), si_prefixed(layer["accumulates"])]
        else:
            counts = ["–", "–", "–", f"{si_prefixed(layer['neurons'] * layer['steps'] + layer['spikes'])} (updates)"]
        rows.append([layer["name"], *counts, *(_significant_energy(layer[f"{term}_uj"]) for term in (
            "operation_only", "weights", "activations", "membranes", "operations", "total"))])
    return header, rows


def _memory_size(size: int) -> str:
    return f"{size / 1024 ** 2:g} MiB" if size >= 1024 ** 2 else f"{size / 1024:g} KiB"


def _memory_assumptions(memory: Document) -> str:
    """The preset, constants and sources the memory-aware figures rest on, in one paragraph."""
    preset = memory["constants"]
    sram = ", ".join(f"{_memory_size(point['bytes'])} {point['pj_per_64_bits']:g} pJ"
                     for point in preset["sram_pj_per_word"])
    kinds = ("weight", "activation", "spike", "membrane")
    widths = ", ".join(f"{preset[f'{kind}_bits']}-bit {kind}s" for kind in kinds)
    return (f"Memory-aware energy, preset `{memory['preset']}` ({preset['description']}): "
            f"E_MAC = {preset['e_mac_pj']:g} pJ, E_AC = {preset['e_ac_pj']:g} pJ; {widths}; per 64-bit access: SRAM "
            f"{sram}, DRAM {preset['dram_pj_per_word']:g} pJ. {memory['model']} Sources: {preset['sources']}.")


def _memory_sections(document: Document) -> list[str]:
    """report.md's memory-aware energy: totals, assumptions, and each network's layers; nothing for reports
    written before it was recorded."""
    memory = document.get("energy_memory")
    if not memory:
        return []
    per_layer = memory["per_layer"]
    sections = ["## Memory-aware energy per image\n\n" + _markdown_table(*_memory_energy_rows(memory)),
                _memory_assumptions(memory)]
    if per_layer["ann"] is not None:
        sections.append("### ANN per layer\n\n" + _markdown_table(*_memory_layer_rows(per_layer["ann"])))
    sections.append(f"### SNN per layer at T = {per_layer['T']}\n\n"
                    + _markdown_table(*_memory_layer_rows(per_layer["snn"])))
    sections.append("Operation-only: the layer's share of the operation-only energy of the first table (E_MAC x "
                    "MACs + E_AC x ACs). Input reads: every input entry of the ANN, the spike events and graded values "
                    "of the SNN, each written into and read from the layer's input buffer; a spiking layer's updates: "
                    "one per neuron per step and one per spike.")
    return sections


def _memory_summary(document: Document) -> str:
    """The terminal summary's line on the memory-aware energy at the largest T; empty without it."""
    memory = document.get("energy_memory")
    if not memory:
        return ""
    T = str(memory["per_layer"]["T"])
    ann = memory["ann_uj_per_image"]
    ratio = (memory["ann_over_snn"] or {}).get(T)
    return (f"Memory-aware energy ({memory['preset']}): "
            + (f"ANN {_significant_energy(ann)}, " if ann is not None else "")
            + f"SNN {_significant_energy(memory['snn_uj_per_image'][T])} at T = {T}"
            + (f" (ANN/SNN {_ratio(ratio)})" if ratio is not None else "") + ".")


def _layer_rows(document: Document) -> tuple[list[str], list[list[str]]]:
    header = ["Layer", "Neurons", "Spikes/img", "Firing rate", "Never fired"]
    rows = [[layer["name"], str(layer["neurons"]), si_prefixed(layer["spikes_per_image"]),
             _percent(layer["firing_rate"]), _percent(layer["never_fired_fraction"], 1)]
            for layer in document["spikes"]["per_layer"]]
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header, *rows])


def bits_text(qbits: int | dict[str, int] | None) -> str:
    """A configuration's qbits in words: 4 -> '4-bit'; per-layer bits -> '2–8-bit (per layer)'."""
    if qbits is None:
        return "?-bit"
    if isinstance(qbits, dict):
        low, high = min(qbits.values()), max(qbits.values())
        return f"{low}-bit (per layer)" if low == high else f"{low}–{high}-bit (per layer)"
    return f"{qbits}-bit"


def network_text(config: dict[str, Any]) -> str:
    """'signed neurons, 4-bit': what a figure's title must say to be read on its own."""
    return f"{config.get('neuron', '?')} neurons, {bits_text(config.get('qbits'))}"


def _title(document: Document) -> str:
    config = document["config"]
    model = document.get("model", {}).get("arch", "model")
    return (f"{model} → SNN: {network_text(config)} QANN, {config.get('coding', '?')} coding, threshold rule "
            f"{config.get('threshold_rule', '?')}")


def _memory(timing: dict[str, Any]) -> str:
    """What the memory limit bounds, the simulation's planned working set (chunks of time steps), apart from the
    whole run's measured peak (model, data and interpreter included), so that a peak above the limit cannot read
    as a limit broken. Reports written before these were recorded say so."""
    parts = []
    limit, chunk = timing.get("memory_limit_mb"), timing.get("chunk_size")
    chunks = "" if chunk is None else f"chunks of {chunk} time step{'s' * (chunk != 1)}"
    if limit is not None:
        parts.append(f"simulation working set planned within {limit:.0f} MiB" + (f" ({chunks})" if chunks else ""))
    elif chunks:
        parts.append(f"simulated in {chunks}")
    peak = timing.get("peak_memory_mb")
    parts.append("whole-run peak not measured" if peak is None
                 else f"whole-run peak {peak:.0f} MiB ({timing['peak_memory_measure']})")
    return "; ".join(parts)


def save_figure(figure: Figure, path: str | Path) -> Path:
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=_DPI)
    atomic_write(Path(path), png.getvalue())
    return Path(path)


def _code(path: str | None) -> str:
    return "not named" if path is None else f"`{path}`"


def _data_lines(document: Document) -> list[str]:
    lines = []
    for role, entry in document.get("data", {}).items():
        subset = (f" of {entry['available']}, a stratified subset drawn with seed {entry['seed']}"
                  if entry["images"] < entry["available"] else "")
        lines.append(f"{role.capitalize()} data: `{entry['spec']}`, {entry['images']} images{subset}.")
    return lines


def _interval_note(document: Document) -> str:
    if "accuracy_ci95" not in document:
        return ""
    return (f"Top-1 in brackets: the {document['accuracy_ci95']['method']} of the accuracy on {document['images']} "
            "images, in percent.")


def _quiet_line(document: Document) -> str:
    """With stop-when-quiet, how many steps the images needed; empty without."""
    quiet = document.get("quiet_steps")
    if not quiet:
        return ""
    return (f"Stopped when quiet: {quiet['mean']:.1f} steps per image on average (at most {quiet['max']} of "
            f"{quiet['of']}); the output is final once no neuron fires.")


def _provenance_section(document: Document) -> str:
    """Versions, machine, command line and date; empty for reports written before they were recorded."""
    origin = document.get("provenance")
    if not origin:
        return ""
    commit = f" (commit {origin['commit']})" if origin.get("commit") else ""
    rows = [["ann2snn", f"{origin['ann2snn'] or 'version unknown'}{commit}"],
            ["torch", origin["torch"]], ["torchvision", origin["torchvision"]], ["Python", origin["python"]],
            ["platform", origin["platform"]], ["device", origin["device"]],
            ["command", f"`{shlex.join(origin['command'])}`"],
            ["working directory", f"`{origin['working_directory']}`"], ["date (UTC)", origin["date"]]]
    return "## Provenance\n\n" + _markdown_table(["Recorded", "Value"], rows)


def markdown(document: Document) -> str:
    """report.md: the report as readable tables."""
    energy, timing = document["energy"], document["timing"]
    model = document.get("model")
    layers_header, layer_rows = _layer_rows(document)
    network_header, network_rows = _network_rows(document)
    sections = [
        f"# {_title(document)}",
        "\n\n".join(line for line in [
            f"Checkpoint: {_code(model['checkpoint'])} (architecture {model['arch']}, from the {model['arch_source']})"
            if model else "",
            *_data_lines(document),
            f"{document['images']} evaluation images; one simulation per batch up to T = {max(_T_values(document))}.",
            _quiet_line(document),
        ] if line),
        "## Accuracy, operations and energy per image\n\n" + _markdown_table(network_header, network_rows),
        _interval_note(document),
        f"Energy constants: {energy['reference']}. {energy['method']} First-layer MACs on the analog input "
        "are counted once per time step for rate coding and once per image for accumulate coding.",
        *_memory_sections(document),
        f"## Spikes per layer at T = {document['spikes']['T']}\n\n" + _markdown_table(layers_header, layer_rows),
        "Firing rate: spikes per neuron per time step. Never fired: share of the layer's neurons that did not "
        "spike for any evaluated image.",
        "## Timing\n\n" + _markdown_table(
            ["Wall time", "Images/s", "SNN simulation", "SNN images/s", "Device"],
            [[f"{timing['wall_s']:.1f} s", f"{timing['images_per_s']:.1f}", f"{timing['snn_s']:.1f} s",
              f"{timing['snn_images_per_s']:.1f}", timing["device"]]]),
        f"Memory: {_memory(timing)}.",
        "## Configuration\n\n" + _markdown_table(
            ["Setting", "Value"], [[key, f"`{value}`"] for key, value in document["config"].items()]),
        _provenance_section(document),
        f"![Accuracy against time steps]({ACCURACY_PLOT})\n\n![Spikes per layer]({SPIKES_PLOT})",
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def summary(document: Document) -> str:
    """The one-screen summary the command line prints at the end."""
    energy, timing = document["energy"], document["timing"]
    network_header, network_rows = _network_rows(document)
    quietest = min(document["spikes"]["per_layer"], key=lambda layer: layer["firing_rate"], default=None)
    lines = [
        _title(document),
        f"{document['images']} images, {timing['wall_s']:.1f} s ({timing['images_per_s']:.1f} images/s) "
        f"on {timing['device']}",
        f"Memory: {_memory(timing)}",
        "",
        text_table(network_header, network_rows),
        "",
        f"Energy: {energy['reference']}.",
        _memory_summary(document),
    ]
    if document.get("quiet_steps"):
        lines.append(_quiet_line(document))
    if quietest is not None:
        lines.append(f"{len(document['spikes']['per_layer'])} spiking layers; lowest firing rate "
                     f"{_percent(quietest['firing_rate'])} in {quietest['name']}.")
    return "\n".join(lines)


def accuracy_figure(document: Document) -> Figure:
    """SNN top-1 accuracy against T with its 95 % intervals as error bars, and the ANN and QANN accuracies as
    reference lines with their intervals as bands. The two lines differ in width as well as style and are
    labelled with their values on opposite sides, so that equal accuracies show as two lines, not one."""
    T_values = _T_values(document)
    accuracy = document["accuracy"]
    intervals = document.get("accuracy_ci95", {})
    figure = Figure(figsize=(5.0, 3.6), layout="constrained")
    axes = figure.add_subplot()
    snn = [100 * accuracy["snn"][str(T)] for T in T_values]
    snn_intervals = [(intervals.get("snn") or {}).get(str(T)) for T in T_values]
    below = [0.0 if bounds is None else value - 100 * bounds[0] for value, bounds in zip(snn, snn_intervals)]
    above = [0.0 if bounds is None else 100 * bounds[1] - value for value, bounds in zip(snn, snn_intervals)]
    axes.errorbar(T_values, snn, yerr=[below, above], marker="o", color="tab:blue", capsize=3, zorder=3,
                  label="SNN" + (" (bars: 95 % CI)" if intervals else ""))
    references = (("ann", dict(linestyle="--", linewidth=2.6, color="tab:gray", zorder=2), "bottom"),
                  ("qann", dict(linestyle=":", linewidth=1.4, color="tab:orange", zorder=2.5), "top"))
    for name, style, side in references:
        if accuracy[name] is None:
            continue
        value, bounds = 100 * accuracy[name], intervals.get(name)
        label = f"{name.upper()} {value:.1f} %" + (f" ({100 * bounds[0]:.1f}–{100 * bounds[1]:.1f})" if bounds else "")
        axes.axhline(value, label=label, **style)
        if bounds:
            axes.axhspan(100 * bounds[0], 100 * bounds[1], color=style["color"], alpha=0.08, linewidth=0, zorder=1)
        axes.annotate(f"{name.upper()} {value:.1f} %", (0.0, value), xycoords=("axes fraction", "data"),
                      xytext=(3, 2 if side == "bottom" else -2), textcoords="offset points", ha="left", va=side,
                      fontsize=7, color=style["color"])
    axes.set_xscale("log", base=2)
    axes.set_xticks(T_values, [str(T) for T in T_values])
    axes.minorticks_off()
    axes.set_xlabel("Time steps T")
    axes.set_ylabel("Top-1 accuracy (%)")
    axes.set_title(f"{document.get('model', {}).get('arch', 'SNN')}: {network_text(document['config'])}, "
                   f"{document['config'].get('coding', '?')} coding\naccuracy vs. time steps "
                   f"({document['images']} images{'; 95 % Wilson intervals' if intervals else ''})", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=7)
    return figure


def plot_accuracy_vs_T(document: Document, path: str | Path) -> Path:
    return save_figure(accuracy_figure(document), path)


def spikes_figure(document: Document) -> Figure:
    """Per spiking layer: spikes per image (top) and firing rate and never-firing share (bottom)."""
    layers = document["spikes"]["per_layer"]
    names = [layer["name"] for layer in layers]
    positions = range(len(layers))
    figure = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2.0), 5.5), layout="constrained")
    spikes_axes, rate_axes = figure.subplots(2, 1, sharex=True)
    spikes_axes.bar(positions, [layer["spikes_per_image"] for layer in layers], color="tab:blue")
    spikes_axes.set_ylabel("Spikes per image")
    spikes_axes.set_title(f"{document.get('model', {}).get('arch', 'SNN')}, {network_text(document['config'])}: "
                          f"spiking activity per layer at T = {document['spikes']['T']} ({document['images']} images)",
                          fontsize=9)
    rate_axes.bar(positions, [100 * layer["firing_rate"] for layer in layers], color="tab:green",
                  label="Firing rate (spikes per neuron per step)")
    rate_axes.plot(positions, [100 * layer["never_fired_fraction"] for layer in layers], "kx", linestyle="none",
                   label="Neurons that never fired")
    rate_axes.set_ylabel("Percent")
    rate_axes.set_xlabel("Spiking layer")
    rate_axes.set_xticks(list(positions), names, rotation=60, ha="right", fontsize=7)
    rate_axes.legend(fontsize=8)
    for axes in (spikes_axes, rate_axes):
        axes.grid(True, axis="y", alpha=0.3)
    return figure


def plot_spikes_per_layer(document: Document, path: str | Path) -> Path:
    return save_figure(spikes_figure(document), path)


def write_report(document: Document, directory: str | Path) -> list[Path]:
    """Write report.json, report.md and the two figures into `directory`; returns their paths. Each file
    appears complete or not at all (written under a temporary name, then renamed)."""
    directory = Path(directory)
    json_path, markdown_path = directory / REPORT_JSON, directory / REPORT_MD
    atomic_write(json_path, (json.dumps(document, indent=2) + "\n").encode())
    atomic_write(markdown_path, markdown(document).encode())
    return [json_path, markdown_path, plot_accuracy_vs_T(document, directory / ACCURACY_PLOT),
            plot_spikes_per_layer(document, directory / SPIKES_PLOT)]
