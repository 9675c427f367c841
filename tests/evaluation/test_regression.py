"""The accuracy-regression check: every shipped model, re-converted and re-evaluated on test-1000, must
reach the accuracies in calibration/baselines.json minus their tolerance."""
from __future__ import annotations

import copy
import json

import pytest

from ann2snn.evaluation.regression import BASELINES_FILE, MANIFESTS_FILE, ManifestMismatch, check_manifests, compare, format_table, load_baselines, measure

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def baselines() -> dict:
    return load_baselines()


@pytest.fixture(scope="module")
def measured(shared, baselines) -> dict:
    subsets = check_manifests(shared)
    return {name: measure(entry, shared, subsets) for name, entry in baselines["models"].items()}


def test_every_shipped_model_has_a_baseline(baselines):
    checkpoints = {entry["checkpoint"] for entry in baselines["models"].values()}
    shipped = {f"models/{path.name}" for path in BASELINES_FILE.parent.parent.glob("models/*.pt")}
    assert shipped and shipped <= checkpoints, f"shipped checkpoints without a baseline: {shipped - checkpoints}"


def test_no_accuracy_dropped_below_its_baseline(baselines, measured):
    rows = compare(baselines, measured)
    print("\n" + format_table(rows))
    assert all(row.passed for row in rows), "accuracy regression:\n" + format_table(rows)


def test_a_baseline_raised_above_reality_fails(baselines, measured):
    name = next(iter(baselines["models"]))
    raised = copy.deepcopy(baselines)
    entry = raised["models"][name]
    entry["accuracy"]["snn"] = {T: measured[name]["snn"][T] + entry["tolerance"] + 0.5 for T in measured[name]["snn"]}
    rows = compare(raised, measured)
    failed = [row for row in rows if not row.passed]
    assert failed and {row.entry for row in failed} == {name}
    assert {row.metric for row in failed} == {f"SNN T={T}" for T in measured[name]["snn"]}
    assert "FAIL" in format_table(rows)


def test_an_entry_that_was_not_measured_fails(baselines, measured):
    rows = compare(baselines, {name: value for name, value in measured.items() if name != next(iter(measured))})
    assert not all(row.passed for row in rows)


def test_a_changed_subset_list_is_refused(shared, tmp_path):
    manifests = json.loads(MANIFESTS_FILE.read_text())
    manifests["subsets"]["evaluation"]["sha256"] = "0" * 64
    changed = tmp_path / "manifests.json"
    changed.write_text(json.dumps(manifests))
    with pytest.raises(ManifestMismatch, match="test-1000.txt differs from the list the baselines were measured on"):
        check_manifests(shared, changed)
