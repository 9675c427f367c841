"""Reports record where they come from: ann2snn's version and commit, torch, torchvision, Python, the platform and
device, the command line and the date; and every path in them is absolute."""
from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ann2snn
from ann2snn.evaluation import provenance
from ann2snn.evaluation.report import markdown
from ann2snn.io.data import absolute_spec
from ann2snn.io.model_loading import Preprocessing
from ann2snn.workflow import open_data
from tests.helpers import digits_args, digits_checkpoint, run_cli


def evaluated() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    inputs = torch.randn(16, 3, 2, 2)
    data = DataLoader(TensorDataset(inputs, model(inputs).argmax(-1).detach()), batch_size=8)
    return ann2snn.evaluate(ann2snn.convert(model, data, T=4), data, [4], ann=model).to_json()


def test_report_records_versions_machine_command_and_date() -> None:
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    document = evaluated()
    origin = document["provenance"]
    assert origin["ann2snn"] == ann2snn.__version__
    assert origin["torch"] == torch.__version__ and origin["torchvision"] == torchvision.__version__
    assert origin["python"] == ".".join(map(str, sys.version_info[:3]))
    assert origin["platform"] and origin["device"] == document["timing"]["device"]
    assert origin["command"] == sys.argv and origin["working_directory"] == str(Path.cwd())
    date = datetime.datetime.fromisoformat(origin["date"])
    assert date.utcoffset() == datetime.timedelta(0) and before <= date <= before + datetime.timedelta(minutes=5)

    text = markdown(document)
    assert "## Provenance" in text
    assert f"| ann2snn | {ann2snn.__version__}" in text and f"| torch | {torch.__version__} |" in text
    assert f"| command | `{shlex.join(sys.argv)}` |" in text and f"| date (UTC) | {origin['date']} |" in text


def test_commit_of_the_checkout_ann2snn_runs_from() -> None:
    root = Path(ann2snn.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("ann2snn does not run from a git checkout here")
    described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--tags"], capture_output=True,
                               text=True, check=True).stdout.strip()
    assert provenance.source_commit() in (described, described + "-dirty")


def _git(directory: Path, *arguments: str) -> None:
    subprocess.run(["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@t", *arguments],
                   check=True, capture_output=True)


def test_dirty_checkout_and_installed_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "ann2snn").mkdir(parents=True)
    (checkout / "ann2snn" / "__init__.py").write_text("")
    _git(checkout, "init", "-q")
    _git(checkout, "add", "ann2snn/__init__.py")
    _git(checkout, "commit", "-q", "-m", "one")
    _git(checkout, "tag", "v9.9")
    monkeypatch.setattr(provenance, "_CHECKOUT", checkout)
    assert provenance.source_commit() == "v9.9"
    (checkout / "ann2snn" / "__init__.py").write_text("changed = True\n")
    assert provenance.source_commit() == "v9.9-dirty"
    # a copy installed into a virtual environment that lies inside some git repository: not a checkout of ann2snn
    monkeypatch.setattr(provenance, "_CHECKOUT", checkout / "venv" / "lib" / "site-packages")
    assert provenance.source_commit() is None


def test_command_line_run_records_its_argv_and_absolute_paths(capsys, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # reported: report.json gave the checkpoint as typed (relative), the default data as an absolute path
    checkpoint = digits_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["ann2snn", *digits_args(Path(checkpoint.name), "--out", "run")]
    monkeypatch.setattr(sys, "argv", argv)
    code, _, err = run_cli(capsys, *argv[1:])
    assert code == 0, err
    document = json.loads((tmp_path / "run" / "report.json").read_text())
    assert document["provenance"]["command"] == argv
    assert document["provenance"]["working_directory"] == str(tmp_path.resolve())
    assert document["model"]["checkpoint"] == str(checkpoint.resolve())
    assert (tmp_path / "run" / "report.md").read_text().count(f"Checkpoint: `{checkpoint.resolve()}`") == 1


def test_data_specs_are_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "list.txt").write_text("")
    monkeypatch.chdir(tmp_path / "data")
    assert absolute_spec("list.txt") == str(tmp_path.resolve() / "data" / "list.txt")
    assert absolute_spec("cifar10:../data") == f"cifar10:{tmp_path.resolve() / 'data'}"
    assert absolute_spec("cifar10-train:.") == f"cifar10-train:{tmp_path.resolve() / 'data'}"
    assert absolute_spec("mnist5k") == "mnist5k"
    for label in ("cat", "dog"):
        (tmp_path / "data" / "images" / label).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "data" / "images" / label / "0.png")
    _, entry = open_data("images", Preprocessing())
    assert entry["spec"] == str(tmp_path.resolve() / "data" / "images") and entry["images"] == 2
