"""What counts as a regression (accuracy lower, or activity higher, than the tolerance allows), and this project's
own check: every shipped model, re-converted and re-evaluated by `ann2snn baseline check`, within its baselines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ann2snn.cli.main import main
from ann2snn.config import ConversionConfig
from ann2snn.evaluation.regression import Tolerance, compare, format_table, load_baselines

REPOSITORY = Path(__file__).resolve().parents[2]
BASELINES_FILE = REPOSITORY / "calibration" / "baselines.json"

BASELINE = {"ann": 90.0, "qann": 89.0, "snn": {"16": 80.0}, "spikes_per_image": {"16": 1000.0},
            "synops_per_image": {"16": 5e6}, "energy_uj_per_image": {"16": 10.0},
            "memory_energy_uj_per_image": {"16": 30.0}}


def _measured(**changes: dict) -> dict:
    return {key: {**value, **changes.get(key, {})} if isinstance(value, dict) else changes.get(key, value)
            for key, value in BASELINE.items()}


def _failed(measured: dict | None) -> list[str]:
    return [row.metric for row in compare("m", BASELINE, measured, Tolerance(accuracy=1.0, activity=0.1))
            if not row.passed]


def test_limits_in_points_and_fractions() -> None:
    assert _failed(_measured()) == []
    assert _failed(_measured(snn={"16": 79.0})) == []  # exactly at the limit
    assert _failed(_measured(snn={"16": 78.9})) == ["SNN T=16 accuracy %"]
    assert _failed(_measured(ann=95.0, spikes_per_image={"16": 500.0})) == []  # better is never a failure
    assert _failed(_measured(spikes_per_image={"16": 1100.0})) == []
    assert _failed(_measured(spikes_per_image={"16": 1101.0}, energy_uj_per_image={"16": 20.0})) == \
        ["spikes/image T=16", "energy µJ/image T=16"]
    assert _failed(_measured(memory_energy_uj_per_image={"16": 33.1})) == ["memory-aware energy µJ/image T=16"]


def test_a_baseline_from_before_the_memory_model_checks_the_rest() -> None:
    older = {key: value for key, value in BASELINE.items() if key != "memory_energy_uj_per_image"}
    rows = compare("m", older, _measured(memory_energy_uj_per_image={"16": 1e9}), Tolerance())
    assert [row.metric for row in rows if "memory" in row.metric] == []
    assert all(row.passed for row in rows)


def test_a_missing_measurement_fails() -> None:
    assert len(_failed(None)) == 7
    missing_T = {**BASELINE, "snn": {}}
    assert _failed(missing_T) == ["SNN T=16 accuracy %"]
    assert "FAIL (not measured)" in format_table(compare("m", BASELINE, None, Tolerance()))


def test_negative_tolerances_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        Tolerance(accuracy=-1)


def test_baselines_are_read_only_in_their_format_version(tmp_path: Path) -> None:
    document = load_baselines(BASELINES_FILE)
    path = tmp_path / "baselines.json"
    for version in (1, None):
        path.write_text(json.dumps({**document, "version": version}))
        with pytest.raises(ValueError, match=f"ann2snn-baselines format version {version}; this ann2snn reads "
                                             "version 2"):
            load_baselines(path)
    path.write_text(json.dumps({**document, "format": "something-else"}))
    with pytest.raises(ValueError, match="not an ann2snn-baselines file"):
        load_baselines(path)


def test_every_shipped_model_has_a_baseline() -> None:
    document = load_baselines(BASELINES_FILE)
    checkpoints = {entry["checkpoint"] for entry in document["models"].values()}
    shipped = {f"../models/{path.name}" for path in (REPOSITORY / "models").glob("*.pt")}
    assert shipped and shipped <= checkpoints, f"shipped checkpoints without a baseline: {shipped - checkpoints}"


def test_entries_are_conversion_records() -> None:
    """Each entry's "conversion" record is a ConversionConfig's, read as it is."""
    for name, entry in load_baselines(BASELINES_FILE)["models"].items():
        record = entry["conversion"]
        assert {key: ConversionConfig.from_dict(record).to_dict()[key] for key in record} == record, name


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("entry", list(json.loads(BASELINES_FILE.read_text())["models"]))
def test_no_shipped_model_regressed(entry: str, capsys: pytest.CaptureFixture[str]) -> None:
    # one test per entry: a regression names its model, and parallel test workers share the entries out
    code = main(["baseline", "check", str(BASELINES_FILE), "--only", entry, "--no-progress"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, "regression:\n" + out
