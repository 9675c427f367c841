"""Accuracy-regression baselines: every shipped model is re-converted and re-evaluated on fixed subsets,
and any accuracy (ANN, QANN, SNN at each T) below its stored baseline minus the tolerance is a failure.

`calibration/baselines.json` holds, per entry, the checkpoint, the conversion settings (a `ConversionConfig`
record, plus whether the checkpoint's fine-tuned thresholds are used), the T values and
the accuracies (percent) with a tolerance in percentage points; `calibration/manifests.json` holds the
SHA-256 of each subset list, so that baselines are never compared against a different subset.
`tools/update_baselines.py` rewrites the baselines after an intended change.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ann2snn.compiler.convert import convert
from ann2snn.config import ConversionConfig
from ann2snn.evaluation.evaluate import evaluate
from ann2snn.io.atomic import atomic_write
from ann2snn.io.data import make_loader, open_dataset
from ann2snn.io.model_loading import load_model

REPOSITORY = Path(__file__).resolve().parents[2]
BASELINES_FILE = REPOSITORY / "calibration" / "baselines.json"
MANIFESTS_FILE = REPOSITORY / "calibration" / "manifests.json"
BASELINES_FORMAT = "ann2snn-baselines"
BASELINES_VERSION = 1
MANIFESTS_FORMAT = "ann2snn-manifests"
MANIFESTS_VERSION = 1
SHARED_PREFIX = "<shared>/"
# The one key of an entry's "conversion" that is not a setting of `ConversionConfig`.
FINE_TUNED_KEY = "fine_tuned_thresholds"


class ManifestMismatch(RuntimeError):
    """A subset list is not the one the baselines were measured on."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifests(shared: Path, manifests_file: Path = MANIFESTS_FILE) -> dict[str, Path]:
    """The subset lists by name, after checking each against its recorded hash and image count."""
    manifests = read_versioned(manifests_file, MANIFESTS_FORMAT, MANIFESTS_VERSION)
    paths = {}
    for name, manifest in manifests["subsets"].items():
        path = shared / manifest["path"]
        if not path.is_file():
            raise ManifestMismatch(f"subset '{name}': {path} not found")
        if _sha256(path) != manifest["sha256"]:
            raise ManifestMismatch(f"subset '{name}': {path} differs from the list the baselines were measured on "
                                   f"(sha256 {manifest['sha256'][:12]}...); re-measure with tools/update_baselines.py")
        paths[name] = path
    return paths


def _resolve(checkpoint: str, shared: Path) -> Path:
    if checkpoint.startswith(SHARED_PREFIX):
        return shared / checkpoint.removeprefix(SHARED_PREFIX)
    return REPOSITORY / checkpoint


def baseline_conversion(entry: dict[str, Any]) -> tuple[ConversionConfig, bool]:
    """The configuration an entry's "conversion" record describes (simulated up to its largest T), and
    whether it converts with the checkpoint's fine-tuned thresholds instead of calibrating."""
    record = dict(entry["conversion"])
    fine_tuned = record.pop(FINE_TUNED_KEY, False)
    return ConversionConfig.from_dict({**record, "T": max(entry["T_list"])}), fine_tuned


def measure(entry: dict[str, Any], shared: Path, subsets: dict[str, Path], batch_size: int = 250) -> dict[str, Any]:
    """Convert and evaluate one baseline entry: {'ann', 'qann', 'snn': {T: accuracy}} in percent."""
    loaded = load_model(_resolve(entry["checkpoint"], shared))
    transform = loaded.preprocessing.transform()
    config, fine_tuned = baseline_conversion(entry)
    if fine_tuned:
        qbits = config.quantization.qbits
        if loaded.quantization is None or loaded.quantization["qbits"] != qbits:
            raise ValueError(f"{entry['checkpoint']}: has no fine-tuned thresholds at {qbits} bits")
        calibration, thresholds = None, loaded.quantization["thresholds"]
    else:
        calibration = make_loader(open_dataset(str(subsets["calibration"]), transform=transform), batch_size)
        thresholds = None
    torch.manual_seed(0)
    snn = convert(loaded.model, calibration, config, thresholds=thresholds)
    evaluation = make_loader(open_dataset(str(subsets["evaluation"]), transform=transform), batch_size)
    report = evaluate(snn, evaluation, entry["T_list"], ann=loaded.model)
    return {"ann": 100 * report.accuracy_ann, "qann": 100 * report.accuracy_qann,
            "snn": {str(T): 100 * accuracy for T, accuracy in report.accuracy_snn.items()}}


@dataclass
class Comparison:
    entry: str
    metric: str
    baseline: float
    measured: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.measured >= self.baseline - self.tolerance


def _flatten(accuracy: dict[str, Any]) -> dict[str, float]:
    flat = {"ANN": accuracy["ann"], "QANN": accuracy["qann"]}
    flat.update({f"SNN T={T}": value for T, value in accuracy["snn"].items()})
    return flat


def compare(baselines: dict[str, Any], measured: dict[str, dict[str, Any]]) -> list[Comparison]:
    """One row per entry and metric; an entry or metric without a measurement counts as 0 % (a failure)."""
    rows = []
    for name, entry in baselines["models"].items():
        found = _flatten(measured[name]) if name in measured else {}
        for metric, baseline in _flatten(entry["accuracy"]).items():
            rows.append(Comparison(name, metric, baseline, found.get(metric, 0.0), entry["tolerance"]))
    return rows


def format_table(rows: list[Comparison]) -> str:
    lines = ["| model | metric | baseline % | measured % | change | status |", "|---|---|---|---|---|---|"]
    for row in rows:
        status = "ok" if row.passed else f"FAIL (below {row.baseline - row.tolerance:.1f})"
        lines.append(f"| {row.entry} | {row.metric} | {row.baseline:.1f} | {row.measured:.1f} | "
                     f"{row.measured - row.baseline:+.1f} | {status} |")
    return "\n".join(lines)


def read_versioned(path: Path, file_format: str, version: int) -> dict[str, Any]:
    """A JSON document of ours, refused unless it carries `file_format` and `version`."""
    document = json.loads(path.read_text())
    if document.get("format") != file_format:
        raise ValueError(f"{path}: not an {file_format} file")
    if document.get("version") != version:
        raise ValueError(f"{path}: {file_format} format version {document.get('version')}; this ann2snn reads "
                         f"version {version}")
    return document


def load_baselines(path: Path = BASELINES_FILE) -> dict[str, Any]:
    return read_versioned(path, BASELINES_FORMAT, BASELINES_VERSION)


def write_baselines(document: dict[str, Any], path: Path = BASELINES_FILE) -> None:
    atomic_write(path, (json.dumps(document, indent=2) + "\n").encode())
