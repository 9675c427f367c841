"""Output safety and integrity (issue 17) on the command line: what `--force` replaces, two runs on one output, a
killed run's leftovers, `--out .`, where `analyze` and `export` write, a damaged snn.pt, and files given to the
wrong command. Each refusal is one `ann2snn: error:` line and comes before any slow work: the checkpoint named is
often absent, and the error is still about the output.

The models are small digit CNNs (tests.helpers.digits_checkpoint) on a few mnist5k images."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ann2snn.cli.main import main
from ann2snn.io.output_directory import MARKER, read_marker
from tests.helpers import assert_one_line_error, digits_args, digits_checkpoint, run_cli

REPOSITORY = Path(__file__).resolve().parents[2]
ONNX_FILES = ("snn.onnx", "snn-step.onnx")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits checkpoint, converted into conversion/ beside it."""
    checkpoint = digits_checkpoint(tmp_path_factory.mktemp("digits"))
    assert main(digits_args(checkpoint, "--out", checkpoint.parent / "conversion")) == 0
    return checkpoint


@pytest.fixture
def converted(tmp_path: Path, digits: Path) -> Path:
    """A copy of the digits conversion, for a test to change."""
    return Path(shutil.copytree(digits.parent / "conversion", tmp_path / "conversion"))


def contents(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def convert_in_background(digits: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ann2snn", *digits_args(digits, "--out", out)], cwd=REPOSITORY,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared: {process.communicate()[1]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# --force -------------------------------------------------------------------------------------------------------


def test_force_refuses_a_directory_ann2snn_did_not_write(capsys, tmp_path: Path) -> None:
    """`mkdir -p d/thesis; echo x > d/thesis/ch1.tex; ann2snn convert CKPT --out d --force` left only our files."""
    out = tmp_path / "d"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "ch1.tex").write_text("x")
    code, _, err = run_cli(capsys, *digits_args(tmp_path / "absent.pt", "--out", out, "--force"))
    assert_one_line_error(code, err, 2, f"output directory {out} already exists and was not written by ann2snn "
                                        f"(it has no {MARKER} marker)", "even with --force")
    assert contents(out) == {"thesis/ch1.tex": b"x"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d"]


def test_force_refuses_our_output_once_it_holds_a_file_of_the_users(capsys, tmp_path: Path, digits: Path,
                                                                    converted: Path) -> None:
    (converted / "notes.md").write_text("what I saw")
    before = contents(converted)
    code, _, err = run_cli(capsys, *digits_args(tmp_path / "absent.pt", "--out", converted, "--force"))
    assert_one_line_error(code, err, 2, f"output directory {converted} holds notes.md, which ann2snn did not write")
    assert contents(converted) == before

    (converted / "notes.md").unlink()
    code, _, err = run_cli(capsys, *digits_args(digits, "--out", converted, "--force", "--seed", "4"))
    assert code == 0, err
    assert read_marker(converted)["written_by"] == "ann2snn convert"
    assert set(read_marker(converted)["files"]) == {path.name for path in converted.iterdir()} - {MARKER}
    assert contents(converted)["snn.pt"] != before["snn.pt"], "replaced by the new run"


# Two runs, one output ------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_output_is_refused_at_once(capsys, tmp_path: Path, digits: Path) -> None:
    """Two `convert … --out X` at once, with no X yet: both exited 0, the later replacing the earlier's output."""
    out = tmp_path / "X"
    first = convert_in_background(digits, out)
    try:
        wait_for(tmp_path / ".X.partial", first)
        started = time.monotonic()
        code, _, err = run_cli(capsys, *digits_args(digits, "--out", out, "--force"))
        assert time.monotonic() - started < 5, "refused only after work"
        assert_one_line_error(code, err, 2, f"output directory {out} is being written by another run, process "
                                            f"{first.pid} on ", "(ann2snn convert, since ")
        _, first_err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, first_err
    assert read_marker(out)["pid"] == first.pid
    assert sorted(path.name for path in tmp_path.iterdir()) == ["X"]


def test_a_killed_runs_leftovers_are_cleared_by_the_next_run(capsys, tmp_path: Path, digits: Path) -> None:
    """A SIGKILLed run left a hidden .partial-* folder that no later run cleaned up."""
    out = tmp_path / "K"
    killed = convert_in_background(digits, out)
    try:
        wait_for(tmp_path / ".K.partial", killed)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        killed.kill()
    assert (tmp_path / ".K.partial").is_dir()
    code, _, err = run_cli(capsys, *digits_args(digits, "--out", out))
    assert code == 0, err
    left = f"ann2snn: warning: {tmp_path / '.K.partial'}: left by an ann2snn run that ended (process {killed.pid} on "
    assert any(line.startswith(left) and line.endswith("its partial outputs were removed") for line in err.splitlines())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["K"]


# Where the output may be ---------------------------------------------------------------------------------------


def test_the_current_directory_is_refused_before_the_model_is_loaded(capsys, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .` passed the start-up check, and with --force the run ended in `[Errno 16] Device or resource
    busy: '.' -> '..old-…'`."""
    monkeypatch.chdir(tmp_path)
    for out in (".", ".."):
        code, _, err = run_cli(capsys, *digits_args(tmp_path / "absent.pt", "--out", out, "--force"))
        assert_one_line_error(code, err, 2, f"output directory {out} is the current directory or holds it")
    assert list(tmp_path.iterdir()) == []


def test_a_mount_point_is_refused_before_the_model_is_loaded(capsys, tmp_path: Path) -> None:
    mount_point = next((path for path in ("/proc", "/sys", "/dev") if Path(path).is_mount()), None)
    if mount_point is None:
        pytest.skip("no mount point to try")
    code, _, err = run_cli(capsys, *digits_args(tmp_path / "absent.pt", "--out", mount_point, "--force"))
    assert_one_line_error(code, err, 2, f"output directory {mount_point} is a mount point")


def test_eval_refuses_to_write_over_the_conversion_it_reads(capsys, converted: Path) -> None:
    before = contents(converted)
    code, _, err = run_cli(capsys, "eval", converted, "--data", "mnist5k", "--out", converted, "--force")
    assert_one_line_error(code, err, 2, f"output directory {converted} holds {converted}, which this run reads")
    assert contents(converted) == before


def test_analyze_writes_beside_the_conversion(capsys, tmp_path: Path, converted: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`analyze DIR` wrote into the current directory, not beside the conversion."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "analyze", converted, "--data", "mnist5k", "--eval-size", "10", "--T-list", "4",
                             "--no-progress")
    assert code == 0, err
    analysis = tmp_path / "conversion-analysis"
    assert f"Wrote {analysis}/" in out and (analysis / "analysis.json").is_file()
    assert list(elsewhere.iterdir()) == []
    assert read_marker(analysis)["written_by"] == "ann2snn analyze"


def test_analyze_help_says_where_it_writes(capsys) -> None:
    code, out, _ = run_cli(capsys, "analyze", "--help")
    assert code == 0 and "CONVERSION-analysis" in " ".join(out.split())


# export --------------------------------------------------------------------------------------------------------


def test_export_replaces_onnx_files_only_with_force_and_only_its_own(capsys, tmp_path: Path,
                                                                     converted: Path) -> None:
    """`export` overwrote existing .onnx files without --force."""
    before = contents(converted)
    code, _, err = run_cli(capsys, "export", converted)
    assert_one_line_error(code, err, 2, f"snn-step.onnx, snn.onnx already exist in {converted}; pass --force")
    assert contents(converted) == before

    code, out, err = run_cli(capsys, "export", converted, "--format", "qann")
    assert code == 0, err
    assert "qann.onnx" in read_marker(converted)["files"]
    code, out, err = run_cli(capsys, "export", converted, "--format", "t-step", "--force")
    assert code == 0 and f"Wrote {converted / 'snn.onnx'}" in out, err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "snn.onnx").write_text("my own model")
    code, _, err = run_cli(capsys, "export", converted, "--out", mine, "--force")
    assert_one_line_error(code, err, 2, f"snn.onnx in {mine} was not written by ann2snn")
    assert contents(mine) == {"snn.onnx": b"my own model"}


# snn.pt --------------------------------------------------------------------------------------------------------


def test_a_damaged_snn_pt_is_refused_by_every_command_that_reads_it(capsys, tmp_path: Path, converted: Path) -> None:
    """Four bytes zeroed inside snn.pt went unnoticed, and export wrote the changed weights."""
    snn_pt = converted / "snn.pt"
    data = bytearray(snn_pt.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = bytes(4)
    snn_pt.write_bytes(data)
    damaged = f"{snn_pt}: corrupt: its contents do not match the sha256 checksum saved with them"
    code, _, err = run_cli(capsys, "export", converted, "--out", tmp_path / "onnx")
    assert_one_line_error(code, err, 1, damaged)
    assert not (tmp_path / "onnx").exists()
    for command in ("eval", "analyze"):
        code, _, err = run_cli(capsys, command, converted, "--data", "mnist5k", "--no-progress", "--out",
                               tmp_path / command)
        assert_one_line_error(code, err, 1, damaged)
        assert sorted(path.name for path in tmp_path.iterdir()) == ["conversion"]


def test_a_truncated_snn_pt_is_called_truncated(capsys, converted: Path) -> None:
    """It was called a directory (eval DIR) or said to have no format marker (export)."""
    snn_pt = converted / "snn.pt"
    snn_pt.write_bytes(snn_pt.read_bytes()[:20000])
    for command in (("eval", converted, "--data", "mnist5k"), ("export", converted, "--format", "qann"),
                    ("eval", snn_pt, "--data", "mnist5k")):
        code, _, err = run_cli(capsys, *command)
        assert_one_line_error(code, err, 1, f"{snn_pt}: truncated or corrupt: a spiking network saved by "
                                            "ann2snn.save, but it cannot be read")


def test_eval_of_a_directory_whose_snn_pt_is_a_checkpoint_says_what_it_is(capsys, tmp_path: Path,
                                                                          digits: Path) -> None:
    """It said 'is a directory, not a checkpoint file'."""
    (tmp_path / "p").mkdir()
    shutil.copy(digits, tmp_path / "p" / "snn.pt")
    code, _, err = run_cli(capsys, "eval", tmp_path / "p", "--data", "mnist5k")
    assert_one_line_error(code, err, 1, f"{tmp_path / 'p' / 'snn.pt'}: not a spiking network saved by ann2snn.save",
                          "a torch file that holds pickled Python objects, such as a checkpoint of a whole model",
                          "`ann2snn convert` converts checkpoints")


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_saved_network_given_as_a_checkpoint_is_named(capsys, tmp_path: Path, digits: Path, command: str) -> None:
    """`convert` and `inspect` of an snn.pt blamed the architecture name ('snn')."""
    snn_pt = digits.parent / "conversion" / "snn.pt"
    argv = digits_args(snn_pt, "--out", tmp_path / "again") if command == "convert" else ["inspect", snn_pt]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, 1, f"{snn_pt}: a spiking network converted by ann2snn, not a checkpoint to "
                                        "convert; `ann2snn eval` evaluates it, `ann2snn export` writes its ONNX models")
    assert list(tmp_path.iterdir()) == []
