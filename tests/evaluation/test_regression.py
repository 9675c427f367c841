"""The accuracy-regression check: every shipped model, re-converted and re-evaluated on test-1000, must
reach the accuracies in calibration/baselines.json minus their tolerance."""
from __future__ import annotations

import copy
import json

import pytest

from ann2snn.config import ConversionConfig
from ann2snn.evaluation.regression import (
    BASELINES_FILE,
    MANIFESTS_FILE,
    ManifestMismatch,
    baseline_conversion,
    check_manifests,
    compare,
    format_table,
    load_baselines,
    measure,
)


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


def test_baselines_are_read_only_in_their_format_version(baselines, tmp_path):
    assert (baselines["format"], baselines["version"]) == ("ann2snn-baselines", 1)
    path = tmp_path / "baselines.json"
    for version in (2, None):
        path.write_text(json.dumps({**baselines, "version": version}))
        message = f"ann2snn-baselines format version {version}; this ann2snn reads version 1"
        with pytest.raises(ValueError, match=message):
            load_baselines(path)
    path.write_text(json.dumps({**baselines, "format": "something-else"}))
    with pytest.raises(ValueError, match="not an ann2snn-baselines file"):
        load_baselines(path)


def test_manifests_are_read_only_in_their_format_version(shared, tmp_path):
    manifests = json.loads(MANIFESTS_FILE.read_text())
    assert (manifests["format"], manifests["version"]) == ("ann2snn-manifests", 1)
    path = tmp_path / "manifests.json"
    for version in (2, None):
        path.write_text(json.dumps({**manifests, "version": version}))
        with pytest.raises(ValueError, match=f"ann2snn-manifests format version {version}; this ann2snn reads"):
            check_manifests(shared, path)
    path.write_text(json.dumps(manifests))
    assert set(check_manifests(shared, path)) == set(manifests["subsets"])


def test_entries_read_as_conversion_configs(baselines):
    """The entries as they are: each "conversion" record is a ConversionConfig's, at the entry's largest T."""
    for name, entry in baselines["models"].items():
        config, fine_tuned = baseline_conversion(entry)
        assert config.simulation.T == max(entry["T_list"]), name
        assert fine_tuned == entry["conversion"].get("fine_tuned_thresholds", False), name
        record = config.to_dict()
        assert {key: record[key] for key in entry["conversion"] if key != "fine_tuned_thresholds"} == \
            {key: value for key, value in entry["conversion"].items() if key != "fine_tuned_thresholds"}, name
    signed = next(entry for entry in baselines["models"].values() if entry["conversion"]["neuron"] == "signed")
    assert baseline_conversion(signed)[0] == ConversionConfig.from_dict(
        {"qbits": signed["conversion"]["qbits"], "neuron": "signed", "T": max(signed["T_list"]),
         "max_spikes_per_step": signed["conversion"]["max_spikes_per_step"]})
    with pytest.raises(ValueError, match="unknown conversion setting 'bursts'"):
        baseline_conversion({"conversion": {"bursts": 2}, "T_list": [4]})


@pytest.mark.shared
@pytest.mark.slow
def test_no_accuracy_dropped_below_its_baseline(baselines, measured):
    rows = compare(baselines, measured)
    print("\n" + format_table(rows))
    assert all(row.passed for row in rows), "accuracy regression:\n" + format_table(rows)


@pytest.mark.shared
@pytest.mark.slow
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


@pytest.mark.shared
@pytest.mark.slow
def test_an_entry_that_was_not_measured_fails(baselines, measured):
    rows = compare(baselines, {name: value for name, value in measured.items() if name != next(iter(measured))})
    assert not all(row.passed for row in rows)


@pytest.mark.shared
@pytest.mark.slow
def test_a_changed_subset_list_is_refused(shared, tmp_path):
    manifests = json.loads(MANIFESTS_FILE.read_text())
    manifests["subsets"]["evaluation"]["sha256"] = "0" * 64
    changed = tmp_path / "manifests.json"
    changed.write_text(json.dumps(manifests))
    with pytest.raises(ManifestMismatch, match="test-1000.txt differs from the list the baselines were measured on"):
        check_manifests(shared, changed)
