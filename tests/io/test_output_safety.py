"""Output safety (issue 17): an output directory is replaced only when ann2snn wrote it, by one run at a time,
and what a run that died left is cleared by the next; single files (export) are replaced only when ours."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ann2snn.errors import ConversionWarning
from ann2snn.io.output_directory import (
    MARKER,
    OutputRefused,
    check_files_replaceable,
    claimed_output,
    read_marker,
    record_files,
)

REPOSITORY = Path(__file__).resolve().parents[2]


def written(out: Path, files: dict[str, str], force: bool = False, inputs: list[Path] = ()) -> Path:
    """`out` written as a run writes it: claimed, filled, committed."""
    with claimed_output(out, force=force, written_by="test", inputs=inputs) as claim:
        for name, text in files.items():
            (claim.directory / name).write_text(text)
        claim.commit()
    return out


def contents(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): path.read_text() for path in sorted(directory.rglob("*"))
            if path.is_file()}


# --force -------------------------------------------------------------------------------------------------------


def test_force_never_replaces_a_directory_ann2snn_did_not_write(tmp_path: Path) -> None:
    """`mkdir -p d/thesis; echo x > d/thesis/ch1.tex; ann2snn convert CKPT --out d --force` left only our files."""
    out = tmp_path / "d"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "ch1.tex").write_text("x")
    with pytest.raises(OutputRefused, match=f"output directory {out} already exists and was not written by ann2snn "
                                            f"\\(it has no {MARKER} marker\\).*even with --force"):
        written(out, {"report.md": "new"}, force=True)
    assert contents(out) == {"thesis/ch1.tex": "x"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d"], "the claim was not given up"


def test_force_never_replaces_files_put_into_our_output(tmp_path: Path) -> None:
    out = written(tmp_path / "out", {"report.md": "first", "snn.pt": "weights"})
    assert read_marker(out)["files"] == ["report.md", "snn.pt"]
    (out / "notes.md").write_text("my notes")
    (out / "figures").mkdir()
    with pytest.raises(OutputRefused, match="holds figures/, notes.md, which ann2snn did not write"):
        written(out, {"report.md": "second"}, force=True)
    # a file ann2snn wrote, replaced by a directory of the user's, is not ann2snn's either
    (out / "notes.md").unlink()
    (out / "figures").rmdir()
    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    with pytest.raises(OutputRefused, match="holds report.md/, which ann2snn did not write"):
        written(out, {"report.md": "second"}, force=True)
    assert (out / "report.md").is_dir()


def test_force_replaces_our_own_output_whole_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    out = written(tmp_path / "runs" / "out", {"report.md": "first", "old.png": "figure"})
    with pytest.raises(OutputRefused, match=f"output directory {out} already exists; pass --force to replace it"):
        written(out, {"report.md": "second"})
    written(out, {"report.md": "second"}, force=True)
    assert contents(out) == {MARKER: (out / MARKER).read_text(), "report.md": "second"}
    marker = read_marker(out)
    assert (marker["files"], marker["written_by"], marker["pid"], marker["host"]) == (
        ["report.md"], "test", os.getpid(), socket.gethostname())
    assert sorted(path.name for path in out.parent.iterdir()) == ["out"]


def test_an_empty_directory_is_replaced_with_force(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputRefused, match="already exists; pass --force"):
        written(tmp_path / "out", {"report.md": "new"})
    assert contents(written(tmp_path / "out", {"report.md": "new"}, force=True))["report.md"] == "new"


def test_a_failed_run_leaves_nothing_behind_not_even_the_parents_it_made(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="calibration failed"):
        with claimed_output(tmp_path / "a" / "b" / "out") as claim:
            (claim.directory / "snn.pt").write_text("partial")
            raise RuntimeError("calibration failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("place", ["current directory", "above the current directory", "input inside", "input"])
def test_outputs_that_would_hold_the_current_directory_or_an_input_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, place: str) -> None:
    """`--out .` passed the start-up check, and the run ended in `[Errno 16] Device or resource busy: '.' ->
    '..old-…'`."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out, inputs, reason = {
        "current directory": (Path("."), [], "output directory . is the current directory or holds it"),
        "above the current directory": (Path(".."), [], "output directory .. is the current directory or holds it"),
        "input inside": (tmp_path / "models", [tmp_path / "models" / "ck.pt"],
                         f"holds {tmp_path / 'models' / 'ck.pt'}, which this run reads"),
        "input": (Path("ck.pt"), [Path("ck.pt")], "holds ck.pt, which this run reads"),
    }[place]
    with pytest.raises(OutputRefused, match=reason):
        written(out, {"report.md": "new"}, force=True, inputs=inputs)
    assert list(work.iterdir()) == [] and sorted(path.name for path in tmp_path.iterdir()) == ["work"]


def test_a_mount_point_is_refused() -> None:
    mount_point = next((Path(path) for path in ("/proc", "/sys", "/dev") if os.path.ismount(path)), None)
    if mount_point is None:
        pytest.skip("no mount point to try")
    with pytest.raises(OutputRefused, match=f"output directory {mount_point} is a mount point"):
        written(mount_point, {}, force=True)


def test_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    target = written(tmp_path / "real", {"report.md": "ours"})
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OutputRefused, match=f"output path {tmp_path / 'link'} is a symbolic link"):
        written(tmp_path / "link", {"report.md": "new"}, force=True)
    assert (target / "report.md").read_text() == "ours"


def test_an_unwritable_place_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OutputRefused, match=f"cannot write output directory {tmp_path / 'file' / 'out'}: Not a "
                                            f"directory \\({tmp_path / 'file'}\\)"):
        written(tmp_path / "file" / "out", {})


# Claims --------------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    """Two runs with the same --out, started at once, both exited 0 and the later one replaced the earlier's."""
    out = tmp_path / "X"
    with claimed_output(out, written_by="ann2snn convert") as first:
        started = time.monotonic()
        with pytest.raises(OutputRefused, match=f"output directory {out} is being written by another run, process "
                                                f"{os.getpid()} on {socket.gethostname()} \\(ann2snn convert, since "):
            written(out, {"report.md": "second"}, force=True)
        assert time.monotonic() - started < 1
        (first.directory / "report.md").write_text("first")
        first.commit()
    assert contents(out)["report.md"] == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["X"]


CLAIM_AND_HANG = textwrap.dedent("""
    import sys, time
    from ann2snn.io.output_directory import claim_output
    claim = claim_output(sys.argv[1], written_by="ann2snn convert")
    (claim.directory / "snn.pt").write_text("partial")
    print("claimed", flush=True)
    time.sleep(600)
""")


def test_the_claim_of_a_killed_run_is_taken_over_and_cleared(tmp_path: Path) -> None:
    """A SIGKILLed run left a hidden .partial-* folder that no later run cleaned up."""
    out = tmp_path / "K"
    process = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, str(out)], cwd=REPOSITORY,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "claimed\n"
        with pytest.raises(OutputRefused, match=f"being written by another run, process {process.pid} on "):
            written(out, {"report.md": "second"})
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    claim = tmp_path / ".K.partial"
    assert (claim / "snn.pt").read_text() == "partial", "the killed run's claim is left as it was"

    with pytest.warns(ConversionWarning, match=f"{claim}: left by an ann2snn run that ended \\(process "
                                               f"{process.pid} on .*its partial outputs were removed"):
        written(out, {"report.md": "second"})
    assert contents(out) == {MARKER: (out / MARKER).read_text(), "report.md": "second"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["K"]


def test_abandoned_attempts_are_removed_only_when_they_are_ours(tmp_path: Path) -> None:
    """What a run leaves when it dies while it claims: removed if it holds our marker (no live process holds
    its lock); a folder without the marker (an older ann2snn's staging, or someone else's) stays."""
    ours, foreign = tmp_path / ".out.partial-1a2b3c4d", tmp_path / ".out.partial-0badc0de"
    ours.mkdir()
    record_files(ours, [], "ann2snn convert")
    (ours / "snn.pt").write_text("partial")
    foreign.mkdir()
    (foreign / "snn.pt").write_text("an older run's")
    written(tmp_path / "out", {"report.md": "new"})
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.partial-0badc0de", "out"]


def test_a_claim_not_made_by_ann2snn_is_refused_not_removed(tmp_path: Path) -> None:
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "data.bin").write_text("someone's")
    with pytest.raises(OutputRefused, match=f"is claimed by {tmp_path / '.out.partial'}, which was not made by "
                                            "ann2snn; remove it"):
        written(tmp_path / "out", {})
    assert (tmp_path / ".out.partial" / "data.bin").read_text() == "someone's"


# Single files (export) -----------------------------------------------------------------------------------------


def test_existing_files_are_replaced_only_with_force_and_only_if_ours(tmp_path: Path) -> None:
    check_files_replaceable(tmp_path / "new", ["snn.onnx"], force=False)
    out = written(tmp_path / "conversion", {"snn.onnx": "ours"})
    with pytest.raises(OutputRefused, match=f"snn.onnx already exists in {out}; pass --force"):
        check_files_replaceable(out, ["snn.onnx", "qann.onnx"], force=False)
    check_files_replaceable(out, ["snn.onnx", "qann.onnx"], force=True)
    record_files(out, ["qann.onnx"], "ann2snn export")
    assert read_marker(out)["files"] == ["qann.onnx", "snn.onnx"] and read_marker(out)["written_by"] == "test"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "snn.onnx").write_text("my own model")
    with pytest.raises(OutputRefused, match=f"snn.onnx in {mine} was not written by ann2snn"):
        check_files_replaceable(mine, ["snn.onnx", "qann.onnx"], force=True)
    record_files(mine, ["qann.onnx"], "ann2snn export")
    with pytest.raises(OutputRefused, match="snn.onnx in .* was not written by ann2snn"):
        check_files_replaceable(mine, ["snn.onnx", "qann.onnx"], force=True)
    (mine / MARKER).write_text("a file of the user's")
    with pytest.raises(OutputRefused, match=f"{mine / MARKER} was not written by ann2snn"):
        check_files_replaceable(mine, ["qann.onnx"], force=True)
