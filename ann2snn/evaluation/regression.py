"""Accuracy-regression baselines: what a conversion measured, and the comparison of a new measurement with it.

A baseline holds the accuracies (ANN, QANN, SNN at each T) and the activity per image at each T (spikes,
synaptic operations, and energy in both models of `ann2snn.evaluation.energy`: the operation count and the
memory-aware one under the report's preset). A regression is an accuracy below its baseline by more than
`Tolerance.accuracy` percentage points, or an activity above its baseline by more than the fraction
`Tolerance.activity`: a conversion that doubles the spikes at equal accuracy is a regression too. Lower
activity and higher accuracy are never failures. The baselines file and the command that records and checks
it: `ann2snn.baselines`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ann2snn.io.atomic import atomic_write

BASELINES_FORMAT = "ann2snn-baselines"
BASELINES_VERSION = 2

# (key of a measurement's map by T, the metric's name in the table)
ACTIVITIES = (("spikes_per_image", "spikes/image"), ("synops_per_image", "synaptic ops/image"),
              ("energy_uj_per_image", "energy µJ/image"),
              ("memory_energy_uj_per_image", "memory-aware energy µJ/image"))


@dataclass(frozen=True)
class Tolerance:
    accuracy: float = 1.0  # percentage points
    activity: float = 0.1  # a fraction of the baseline

    def __post_init__(self) -> None:
        if not (self.accuracy >= 0 and self.activity >= 0):
            raise ValueError(f"tolerances must not be negative, got accuracy {self.accuracy}, activity {self.activity}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> Tolerance:
        return cls(**values)


def measurement(report: dict[str, Any]) -> dict[str, Any]:
    """A baseline's measured values from a report.json document: accuracies in percent, activities per image,
    maps keyed by T as strings."""
    accuracy = report["accuracy"]

    def percent(fraction: float) -> float:
        return round(100 * fraction, 6)  # 84.9, not 84.89999999999999: accuracies are counts of images

    return {"ann": percent(accuracy["ann"]), "qann": percent(accuracy["qann"]),
            "snn": {T: percent(value) for T, value in accuracy["snn"].items()},
            "spikes_per_image": report["spikes"]["per_image"], "synops_per_image": report["synops_per_image"],
            "energy_uj_per_image": report["energy"]["snn_uj_per_image"],
            "memory_energy_uj_per_image": report["energy_memory"]["snn_uj_per_image"]}


@dataclass(frozen=True)
class Comparison:
    entry: str
    metric: str
    baseline: float
    measured: float | None  # None: not measured, a failure
    limit: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if self.measured is None:
            return False
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit


def _metrics(values: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """Every metric of a measurement: name -> (value, whether higher is better)."""
    metrics = {"ANN accuracy %": (values["ann"], True), "QANN accuracy %": (values["qann"], True)}
    metrics.update({f"SNN T={T} accuracy %": (value, True) for T, value in values["snn"].items()})
    for key, name in ACTIVITIES:
        # baselines recorded before the memory-aware model hold no memory_energy_uj_per_image: nothing to check
        metrics.update({f"{name} T={T}": (value, False) for T, value in values.get(key, {}).items()})
    return metrics


def compare(name: str, baseline: dict[str, Any], measured: dict[str, Any] | None,
            tolerance: Tolerance) -> list[Comparison]:
    """One row per metric of the baseline; a metric missing from `measured` (or no measurement) fails."""
    found = {metric: value for metric, (value, _) in _metrics(measured).items()} if measured is not None else {}
    rows = []
    for metric, (value, higher_is_better) in _metrics(baseline).items():
        limit = value - tolerance.accuracy if higher_is_better else value * (1 + tolerance.activity)
        rows.append(Comparison(name, metric, value, found.get(metric), limit, higher_is_better))
    return rows


def _number(value: float) -> str:
    return f"{value:.4g}"


def format_table(rows: list[Comparison]) -> str:
    lines = ["| model | metric | baseline | measured | change | limit | status |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.measured is None:
            change, status = "", "FAIL (not measured)"
        else:
            change = (f"{row.measured - row.baseline:+.1f}" if row.higher_is_better
                      else f"{100 * (row.measured / row.baseline - 1):+.1f} %" if row.baseline else "")
            status = "ok" if row.passed else "FAIL (" + ("below" if row.higher_is_better else "above") + " limit)"
        measured = _number(row.measured) if row.measured is not None else "-"
        bound = ("≥ " if row.higher_is_better else "≤ ") + _number(row.limit)
        lines.append(f"| {row.entry} | {row.metric} | {_number(row.baseline)} | {measured} | {change} | {bound} | "
                     f"{status} |")
    return "\n".join(lines)


def load_baselines(path: Path) -> dict[str, Any]:
    """A baselines file, refused unless it carries our format and version."""
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON document ({error})") from error
    if not isinstance(document, dict) or document.get("format") != BASELINES_FORMAT:
        raise ValueError(f"{path}: not an {BASELINES_FORMAT} file")
    if document.get("version") != BASELINES_VERSION:
        raise ValueError(f"{path}: {BASELINES_FORMAT} format version {document.get('version')}; this ann2snn reads "
                         f"version {BASELINES_VERSION}")
    return document


def write_baselines(document: dict[str, Any], path: Path) -> None:
    atomic_write(path, (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode())
