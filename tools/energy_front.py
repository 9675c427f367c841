"""The accuracy-energy front of the shipped models: each point a conversion (neuron kind, T, bits, spike-penalty
fine-tuning, pruning), its top-1 on test-1000 (calibrated on train-calib-512) and its energy per image against
the ANN it came from, in both energy models (`ann2snn.evaluation.energy`): the operation count (E_MAC, E_AC)
and the memory-aware model under each preset.

    python tools/energy_front.py [--families resnet20,mobilenet_v2] [--points "LABEL;..."] [--eval-size N]
                                 [--results tools/figures/energy_front.json] [--figure tools/figures/energy_front.png]

Measured points are kept in `--results` (keyed by family and label) and not measured again, so that a long
sweep resumes where it stopped; `--remeasure` measures the selected points again. Prints the markdown table of
every measured point of the selected families, Pareto-optimal points (no other point of the family is both
more accurate and cheaper in the operation count) in bold, and draws accuracy against ANN/SNN energy, one
panel per energy model, to `--figure`. Each family's reference is the float ANN its checkpoints were fine-tuned
from, measured on the same images. Adding a point or a family is one entry of FAMILIES."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared_subsets import subset_file, test_batches  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.evaluation.energy import ENERGY_PRESETS, memory_energy  # noqa: E402
from ann2snn.evaluation.statistics import accuracy_interval  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402
from ann2snn.training.finetune import accuracy  # noqa: E402
from ann2snn.workflow import Execution, Pruning, convert_checkpoint  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One conversion of `checkpoint` (relative to the repository) with the conversion `settings`, read at `T`;
    `prune` magnitude-prunes that fraction of the weights first, without fine-tuning."""

    label: str
    checkpoint: str
    settings: dict[str, Any]
    T: int
    prune: float | None = None

    @property
    def stops_when_quiet(self) -> bool:
        return self.settings.get("neuron") == "signed"


@dataclass(frozen=True)
class Family:
    ann: str  # the float checkpoint the family's checkpoints were fine-tuned from: the reference
    points: list[Point]


def _signed(bursts: int) -> dict[str, Any]:
    return {"neuron": "signed", "max_spikes_per_step": bursts}


def _resnet20_points() -> list[Point]:
    q4, q2 = "models/resnet20-q4.pt", "models/resnet20-q2.pt"
    sparse = {"spike penalty 0.1": "models/resnet20-q4-sp01.pt", "spike penalty 0.25": "models/resnet20-q4-sp025.pt",
              "spike penalty 0.4, 8 epochs": "models/resnet20-q4-sp04.pt"}
    points = [Point(f"4 bits, if, T={T}", q4, {}, T) for T in (16, 32, 64)]
    points += [Point(f"4 bits, adaptive, T={T}", q4, {"neuron": "adaptive"}, T) for T in (32,)]
    points += [Point(f"4 bits, signed k=2, T={T}", q4, _signed(2), T) for T in (8, 16)]
    points += [Point("4 bits, signed k=4, T=4", q4, _signed(4), 4),
               Point("4 bits, signed k=15, T=1", q4, _signed(15), 1),
               Point("2 bits, signed k=3, T=1", q2, _signed(3), 1)]
    points += [Point(f"4 bits, signed k=15, T=1, pruned {amount:.0%}", q4, _signed(15), 1, prune=amount)
               for amount in (0.3, 0.5)]
    for name, checkpoint in sparse.items():
        points += [Point(f"4 bits, {name}, signed k=2, T=8", checkpoint, _signed(2), 8),
                   Point(f"4 bits, {name}, signed k=15, T=1", checkpoint, _signed(15), 1),
                   Point(f"4 bits, {name}, signed k=15, T=1, pruned 30%", checkpoint, _signed(15), 1, prune=0.3)]
    return points


def _mobilenet_points() -> list[Point]:
    q4 = "models/mobilenet_v2.pt"
    return [*(Point(f"4 bits, if, T={T}", q4, {}, T) for T in (16, 32)),
            Point("4 bits, signed k=4, T=8", q4, _signed(4), 8),
            Point("4 bits, signed k=15, T=1", q4, _signed(15), 1),
            Point("4 bits, signed k=15, T=1, pruned 30%", q4, _signed(15), 1, prune=0.3),
            Point("4 bits, quantized streams, spike penalty 0.5, signed k=15, T=1",
                  "models/mobilenet_v2-q4-streams.pt", _signed(15), 1)]


FAMILIES = {
    "resnet20": Family("models/resnet20.pt", _resnet20_points()),
    "mobilenet_v2": Family("models/mobilenet_v2-ann.pt", _mobilenet_points()),
}
OPERATIONS = "operations"
MEMORY_PRESET_SHOWN = "int8-45nm"  # the figure's second panel: the preset most favourable to either network


def measure_reference(family: Family, eval_size: int | None) -> dict[str, Any]:
    loaded = load_model(ROOT / family.ann)
    batches = test_batches(loaded.preprocessing, eval_size)
    images = sum(len(labels) for _, labels in batches)
    percent = accuracy(loaded.model, batches)
    return {"checkpoint": family.ann, "images": images, "accuracy": percent,
            "ci95": [100 * bound for bound in accuracy_interval(percent / 100, images)]}


def measure(point: Point, eval_size: int | None) -> dict[str, Any]:
    calibration = str(subset_file("train-calib-512"))
    conversion = convert_checkpoint(ROOT / point.checkpoint, calib=calibration, T=point.T,
                                    pruning=Pruning(point.prune) if point.prune else None,
                                    execution=Execution(progress=False), **point.settings)
    batches = test_batches(conversion.preprocessing, eval_size)
    report = ann2snn.evaluate(conversion.snn, batches, [point.T], ann=conversion.ann,
                              stop_when_quiet=point.stops_when_quiet)
    T = point.T
    memory = {preset: memory_energy(preset, report.ann_traffic, {T: report.snn_traffic[T]})["ann_over_snn"][str(T)]
              for preset in ENERGY_PRESETS}
    return {"checkpoint": point.checkpoint, "settings": point.settings, "T": T, "prune": point.prune,
            "images": report.images, "accuracy": 100 * report.accuracy_snn[T],
            "ci95": [100 * bound for bound in accuracy_interval(report.accuracy_snn[T], report.images)],
            "qann": 100 * report.accuracy_qann, "spikes_per_image": report.spikes_per_image[T],
            "synops_per_image": report.synops_per_image[T], "macs_per_image": report.snn_macs_per_image[T],
            "quiet_steps": report.quiet_steps["mean"] if report.quiet_steps else None,
            "operation_ann_over_snn": report.ann_energy_uj / report.snn_energy_uj(T),
            "memory_ann_over_snn": memory}


def energy_ratio(point: dict[str, Any], model: str) -> float:
    """ANN / SNN energy of a point in `model`: "operations", or a memory-aware preset's name."""
    return point["operation_ann_over_snn"] if model == OPERATIONS else point["memory_ann_over_snn"][model]


def pareto(points: dict[str, dict[str, Any]], model: str = "operations") -> set[str]:
    """The labels no other point beats on both accuracy and energy ratio in `model`."""
    def beaten(a: dict[str, Any]) -> bool:
        a_ratio = energy_ratio(a, model)
        return any(b["accuracy"] >= a["accuracy"] and energy_ratio(b, model) >= a_ratio
                   and (b["accuracy"], energy_ratio(b, model)) != (a["accuracy"], a_ratio) for b in points.values())
    return {label for label, point in points.items() if not beaten(point)}


def table(name: str, reference: dict[str, Any], points: dict[str, dict[str, Any]]) -> str:
    front = pareto(points)
    presets = list(ENERGY_PRESETS)
    lines = [f"{name}: reference ANN `{reference['checkpoint']}` {reference['accuracy']:.1f} % "
             f"({reference['ci95'][0]:.1f}-{reference['ci95'][1]:.1f}) on {reference['images']} images",
             "", "| point | top-1 (95 % CI) | vs ANN | spikes/img | synops/img | analog MACs/img | steps | "
             "ANN/SNN operations | " + " | ".join(f"ANN/SNN memory {preset}" for preset in presets) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(presets)]
    for label, point in sorted(points.items(), key=lambda item: -item[1]["operation_ann_over_snn"]):
        steps = f"{point['quiet_steps']:.1f}" if point["quiet_steps"] is not None else str(point["T"])
        shown = f"**{label}**" if label in front else label
        lines.append(f"| {shown} | {point['accuracy']:.1f} ({point['ci95'][0]:.1f}-{point['ci95'][1]:.1f}) | "
                     f"{point['accuracy'] - reference['accuracy']:+.1f} | {point['spikes_per_image'] / 1e3:.0f} k | "
                     f"{point['synops_per_image'] / 1e6:.1f} M | {point['macs_per_image'] / 1e6:.2f} M | {steps} | "
                     f"{point['operation_ann_over_snn']:.2f} | "
                     + " | ".join(f"{point['memory_ann_over_snn'][preset]:.2f}" for preset in presets) + " |")
    return "\n".join(lines)


def draw(results: dict[str, Any], families: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = [(OPERATIONS, "operations only (E_MAC 4.6 pJ, E_AC 0.9 pJ)"),
              (MEMORY_PRESET_SHOWN, f"memory-aware, preset {MEMORY_PRESET_SHOWN}")]
    for axis, (model, title) in zip(axes, panels):
        for family, colour in zip(families, ("tab:blue", "tab:orange", "tab:green")):
            points = results[family]["points"]
            if not points:
                continue
            front = sorted((energy_ratio(points[label], model), points[label]["accuracy"])
                           for label in pareto(points, model))
            axis.scatter([energy_ratio(p, model) for p in points.values()], [p["accuracy"] for p in points.values()],
                         color=colour, alpha=0.5, s=18)
            axis.plot(*zip(*front), color=colour, marker="o", label=f"{family} SNN (front)")
            axis.axhline(results[family]["reference"]["accuracy"], color=colour, linestyle="--", linewidth=1,
                         label=f"{family} ANN")
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("energy per image, ANN / SNN (> 1: the SNN is cheaper)")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("top-1 on test-1000 (%)")
    axes[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"of: {', '.join(FAMILIES)}")
    parser.add_argument("--points", help="labels of the points to measure, separated by ';' (default: all)")
    parser.add_argument("--eval-size", type=int, help="a stratified subset of test-1000")
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "figures" / "energy_front.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "tools" / "figures" / "energy_front.png")
    parser.add_argument("--remeasure", action="store_true", help="measure the selected points again")
    args = parser.parse_args()
    families = [name.strip() for name in args.families.split(",")]
    if unknown := [name for name in families if name not in FAMILIES]:
        parser.error(f"unknown family {', '.join(unknown)}; the families are {', '.join(FAMILIES)}")
    wanted = {label.strip() for label in args.points.split(";")} if args.points else None
    torch.set_num_threads(1)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}

    def save() -> None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2) + "\n")

    for name in families:
        family = FAMILIES[name]
        entry = results.setdefault(name, {"points": {}})
        if "reference" not in entry or args.remeasure:
            entry["reference"] = measure_reference(family, args.eval_size)
            save()
        for point in family.points:
            if wanted is not None and point.label not in wanted:
                continue
            if point.label in entry["points"] and not args.remeasure:
                continue
            if not (ROOT / point.checkpoint).is_file():
                print(f"skipped {name} / {point.label}: {point.checkpoint} does not exist", file=sys.stderr)
                continue
            entry["points"][point.label] = measure(point, args.eval_size)
            save()
            print(f"measured {name} / {point.label}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, ann2snn {ann2snn.__version__}, one thread")
    for name in families:
        print()
        print(table(name, results[name]["reference"], results[name]["points"]))
    draw(results, families, args.figure)


if __name__ == "__main__":
    main()
