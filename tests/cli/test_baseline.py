"""`ann2snn baseline record | check | update` on a small digits CNN: an unchanged model passes; a baseline above
what the model reaches (accuracy) or below what it spends (spikes) fails with exit code 1 and a table that says
which metric; other data, a file that is not ours, clashing names and unknown entries are refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ann2snn.cli.main import main
from tests.helpers import assert_one_line_error, digits_checkpoint, run_cli

RECORD = ["--trust-pickle", "--calib", "mnist5k", "--data", "mnist5k", "--calib-size", "40", "--eval-size", "60",
          "--image-size", "1,28,28", "--mean", "0.13", "--std", "0.31", "--T", "4", "--T-list", "2,4",
          "--no-progress"]


def _record(capsys, directory: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "baseline", "record", directory / "digits.pt", *RECORD, *extra)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the checkpoint and ci/baselines.json, recorded once for the module."""
    directory = tmp_path_factory.mktemp("recorded")
    digits_checkpoint(directory)
    (directory / "ci").mkdir()
    assert main(["baseline", "record", str(directory / "digits.pt"), *RECORD,
                 "--out", str(directory / "ci" / "baselines.json")]) == 0
    return directory


@pytest.fixture
def baselines(recorded: Path, tmp_path: Path) -> Path:
    """A copy of the recorded directory for one test to change."""
    shutil.copytree(recorded, tmp_path, dirs_exist_ok=True)
    return tmp_path / "ci" / "baselines.json"


def test_record_prints_what_it_stored(tmp_path: Path, capsys) -> None:
    digits_checkpoint(tmp_path)
    code, out, err = _record(capsys, tmp_path, "--out", tmp_path / "b.json", "--name", "digits")
    assert code == 0, err
    assert "Recorded digits in" in out and "| digits | spikes/image T=4 |" in out


def _edited(path: Path, edit) -> Path:
    document = json.loads(path.read_text())
    edit(document["models"]["digits/default"])
    path.write_text(json.dumps(document))
    return path


def test_an_unchanged_model_passes_from_any_directory(baselines: Path, capsys, monkeypatch) -> None:
    document = json.loads(baselines.read_text())
    entry = document["models"]["digits/default"]
    assert entry["checkpoint"] == "../digits.pt"  # relative to the file, not to where it was recorded
    assert entry["conversion"] == {"T": 4} and entry["load"]["image_size"] == [1, 28, 28]
    assert set(entry["baseline"]) == {"ann", "qann", "snn", "spikes_per_image", "synops_per_image",
                                      "energy_uj_per_image", "memory_energy_uj_per_image"}
    assert entry["baseline"]["spikes_per_image"]["4"] > 0 and entry["versions"]["torch"]
    monkeypatch.chdir(baselines.parent)
    code, out, err = run_cli(capsys, "baseline", "check", "baselines.json", "--trust-pickle", "--no-progress")
    assert code == 0, err
    assert "No regression: 12 metrics of 1 entries" in out and "FAIL" not in out


def test_a_raised_accuracy_fails(baselines: Path, capsys) -> None:
    def raise_accuracy(entry: dict) -> None:
        entry["baseline"]["snn"]["4"] += 1.5  # the tolerance is 1 point

    _edited(baselines, raise_accuracy)
    code, out, err = run_cli(capsys, "baseline", "check", baselines, "--trust-pickle", "--no-progress")
    assert code == 1, err
    failed = [line for line in out.splitlines() if "FAIL" in line]
    assert len(failed) == 1 and "| SNN T=4 accuracy % |" in failed[0] and "below limit" in failed[0]
    assert "ann2snn: regression: 1 of 12 metrics beyond their tolerance (digits/default)" in out


def test_raised_spikes_fail_at_equal_accuracy(baselines: Path, capsys) -> None:
    """The stored spikes lowered by a third: the model now spends 1.5 times the baseline's spikes (the tolerance
    is 10 %)."""
    def lower_spikes(entry: dict) -> None:
        entry["baseline"]["spikes_per_image"] = {T: value / 1.5 for T, value in
                                                 entry["baseline"]["spikes_per_image"].items()}

    _edited(baselines, lower_spikes)
    code, out, err = run_cli(capsys, "baseline", "check", baselines, "--trust-pickle", "--no-progress")
    assert code == 1, err
    failed = [line for line in out.splitlines() if "FAIL" in line]
    assert [line.split("|")[2].strip() for line in failed] == ["spikes/image T=2", "spikes/image T=4"]
    assert all("+50.0 %" in line and "above limit" in line for line in failed)


def test_the_memory_energy_is_checked_under_the_preset_it_was_recorded_with(tmp_path: Path, capsys) -> None:
    """An int8 entry priced at fp32 when checked would spend several times its memory-aware baseline."""
    digits_checkpoint(tmp_path)
    code, out, err = _record(capsys, tmp_path, "--out", tmp_path / "b.json", "--name", "digits",
                             "--energy-preset", "int8-45nm")
    assert code == 0, err
    entry = json.loads((tmp_path / "b.json").read_text())["models"]["digits"]
    assert entry["options"]["energy_preset"] == "int8-45nm"
    code, out, err = run_cli(capsys, "baseline", "check", tmp_path / "b.json", "--trust-pickle", "--no-progress")
    assert code == 0, out + err
    assert "| digits | memory-aware energy µJ/image T=4 |" in out


def test_update_takes_the_new_values(baselines: Path, capsys) -> None:
    original = json.loads(baselines.read_text())["models"]["digits/default"]["baseline"]
    _edited(baselines, lambda entry: entry["baseline"]["snn"].update({"4": 100.0}))
    code, out, err = run_cli(capsys, "baseline", "update", baselines, "--trust-pickle", "--no-progress")
    assert code == 0, err
    assert json.loads(baselines.read_text())["models"]["digits/default"]["baseline"] == original
    code, out, err = run_cli(capsys, "baseline", "check", baselines, "--trust-pickle", "--no-progress")
    assert code == 0, err


def test_other_data_is_refused_before_converting(baselines: Path, capsys) -> None:
    document = json.loads(baselines.read_text())
    document["data"]["evaluation"]["sha256"] = "0" * 64
    baselines.write_text(json.dumps(document))
    code, out, err = run_cli(capsys, "baseline", "check", baselines, "--trust-pickle", "--no-progress")
    assert_one_line_error(code, err, 1, "evaluation data mnist5k is not the data the baselines were recorded on",
                          "ann2snn baseline update")


def test_the_file_cannot_grant_trust_in_pickles(baselines: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "baseline", "check", baselines, "--no-progress")
    assert code == 1 and "--trust-pickle" in err


def test_record_refuses_clashes_and_foreign_files(baselines: Path, tmp_path: Path, capsys) -> None:
    code, out, err = _record(capsys, tmp_path, "--out", baselines)
    assert_one_line_error(code, err, 2, "has entries named digits/default; pass --force to replace them")
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"my": "notes"}')
    code, out, err = _record(capsys, tmp_path, "--out", foreign)
    assert_one_line_error(code, err, 1, "notes.json: not an ann2snn-baselines file")
    assert foreign.read_text() == '{"my": "notes"}'
    code, out, err = run_cli(capsys, "baseline", "record", tmp_path / "digits.pt", tmp_path / "gone.pt", *RECORD,
                             "--out", tmp_path / "new.json", "--name", "a", "--name", "b")
    assert_one_line_error(code, err, 2, "gone.pt not found")  # before the first checkpoint is converted
    assert not (tmp_path / "new.json").exists()
    code, out, err = run_cli(capsys, "baseline", "check", baselines, "--only", "resnet", "--trust-pickle")
    assert_one_line_error(code, err, 1, "no baseline entry named resnet; the entries are digits/default")
