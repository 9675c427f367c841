"""Bad inputs, tried as a new user would (issue #7, reliability and security): through the command line
wherever it can express them, else through the Python API. Each must end in exit code 1 (the work failed)
or 2 (usage error) with one `ann2snn: error:` line that names the problem, and leave no output behind;
an interrupted run must leave a previous output as it was; the same run twice must give the same results.

The models are small digit CNNs (tests.helpers.digits_checkpoint) on a few mnist5k images."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann2snn
from ann2snn.cli.main import main
from ann2snn.errors import ConversionError, ConversionWarning, InputError
from ann2snn.io.output_directory import MARKER
from ann2snn.io.saved_network import load_saved
from ann2snn.zoo import build_model
from tests.helpers import (
    RunsCallWhenUnpickled,
    assert_one_line_error,
    digits_args,
    digits_checkpoint,
    randomize_bn,
    run_cli,
)
from tests.networks import cnn

REPOSITORY = Path(__file__).resolve().parents[2]
SEED = ("--seed", "3")  # the stratified subsets of calibration and evaluation images depend on it
CONVERSION_FILES = {MARKER, "snn.pt", "snn.onnx", "snn-step.onnx", "report.json", "report.md", "accuracy_vs_T.png",
                    "spikes_per_layer.png"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Path:
    """A complete conversion of the digits checkpoint."""
    out = tmp_path_factory.mktemp("converted") / "out"
    assert main(digits_args(digits, "--out", out, *SEED)) == 0
    assert {path.name for path in out.iterdir()} == CONVERSION_FILES
    return out


def contents(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def source_line(function, text: str) -> int:
    """The line number of the line of `function`'s source that contains `text`."""
    lines, first = inspect.getsourcelines(function)
    return first + next(index for index, line in enumerate(lines) if text in line)


# Checkpoints ---------------------------------------------------------------------------------------------------


def test_pickled_payload_does_not_run_without_trust_pickle(capsys, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    checkpoint = tmp_path / "payload.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "extra": RunsCallWhenUnpickled(os.mkdir, str(marker))},
               checkpoint)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", out, trust_pickle=False))
    refused = f"{os.mkdir.__module__}.{os.mkdir.__name__}"  # posix.mkdir (nt.mkdir on Windows)
    assert_one_line_error(code, err, 1, str(checkpoint), f"pickled Python objects ({refused})", "--trust-pickle")
    assert not marker.exists(), "the payload ran"
    assert not out.exists()


# Each makes a bad checkpoint in `directory`: its path, the options a user would pass with it and what the error
# must say.
def nan_and_inf_weights(directory: Path, digits: Path) -> tuple[Path, list[str], list[str]]:
    model = torch.load(digits, weights_only=False)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[3].bias[1] = float("inf")
    torch.save(model, directory / "diverged.pt")
    return directory / "diverged.pt", [], ["2 tensors hold NaN or Inf values: 0.weight (1 NaN), 3.bias (1 Inf)"]


def wrong_shapes_for_the_arch(directory: Path, digits: Path) -> tuple[Path, list[str], list[str]]:
    # a ResNet-20 trained on one-channel images, converted as the (three-channel) resnet20
    state = build_model("resnet20").state_dict()
    state["conv1.weight"] = torch.zeros(16, 1, 3, 3)
    torch.save(state, directory / "weights.pt")
    return directory / "weights.pt", ["--arch", "resnet20"], [
        "does not fit CifarResNet: 1 shape mismatches: conv1.weight (checkpoint (16, 1, 3, 3), model (16, 3, 3, 3))"]


def truncated(directory: Path, digits: Path) -> tuple[Path, list[str], list[str]]:
    data = digits.read_bytes()
    (directory / "digits.pt").write_bytes(data[: len(data) // 2])
    return directory / "digits.pt", [], ["not a torch checkpoint, or truncated"]


def text_file(directory: Path, digits: Path) -> tuple[Path, list[str], list[str]]:
    (directory / "log.txt").write_text("epoch,accuracy\n1,0.52\n2,0.61\n")
    return directory / "log.txt", [], ["not a torch checkpoint, or truncated"]


def directory_instead(directory: Path, digits: Path) -> tuple[Path, list[str], list[str]]:
    (directory / "checkpoints").mkdir()
    return directory / "checkpoints", [], ["is a directory, not a checkpoint file"]


@pytest.mark.parametrize("make", [nan_and_inf_weights, wrong_shapes_for_the_arch, truncated, text_file,
                                  directory_instead], ids=lambda make: make.__name__)
def test_bad_checkpoints(capsys, tmp_path: Path, digits: Path, make) -> None:
    checkpoint, options, fragments = make(tmp_path, digits)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", out, *options))
    assert_one_line_error(code, err, 1, str(checkpoint), *fragments)
    assert not out.exists()


# Parameters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["4 8", "4,8", " 8, 4 ", "4,,8"])
def test_T_lists_separated_by_commas_or_spaces(given: str) -> None:
    """"4 8" was read as T = 48."""
    from ann2snn.cli.main import build_parser

    args = build_parser().parse_args(["convert", "x.pt", "--T-list", given])
    assert args.T_list == [4, 8]


@pytest.mark.parametrize("option, value, reason", [
    ("--T", "0", "argument --T: expected a positive integer, got '0'"),
    ("--T", "-3", "argument --T: expected a positive integer, got '-3'"),
    ("--qbits", "0", "argument --qbits: expected an integer number of bits in 1..8, got '0'"),
    ("--qbits", "9", "argument --qbits: expected an integer number of bits in 1..8, got '9'"),
    ("--T-list", "", "argument --T-list: expected at least one time step count, got ''"),
    ("--T-list", ",", "argument --T-list: expected at least one time step count, got ','"),
    ("--calib-size", "0", "argument --calib-size: expected a positive integer, got '0'"),
], ids=["T-0", "T-negative", "qbits-0", "qbits-9", "T-list-empty", "T-list-comma", "calib-size-0"])
def test_bad_parameters_are_usage_errors(capsys, tmp_path: Path, digits: Path, option: str, value: str,
                                         reason: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *digits_args(digits, "--out", out, option, value))
    assert_one_line_error(code, err, 2, reason, "ann2snn convert --help")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys, tmp_path: Path, digits: Path) -> None:
    code, _, err = run_cli(capsys, *digits_args(digits, "--out", tmp_path / "out", "--device", "cuda"))
    assert_one_line_error(code, err, 2, "--device cuda: CUDA is not available", "use --device cpu")
    assert not (tmp_path / "out").exists()


def test_calibration_data_without_images(capsys, tmp_path: Path, digits: Path) -> None:
    class_folders, bare = tmp_path / "calibration", tmp_path / "nothing"
    for label in ("cat", "dog"):
        (class_folders / label).mkdir(parents=True)
    bare.mkdir()
    for data, fragment in ((class_folders, "Found no valid file for the classes cat, dog"),
                           (bare, "Couldn't find any class folder")):
        code, _, err = run_cli(capsys, *digits_args(digits, "--out", tmp_path / "out", "--calib", data))
        assert_one_line_error(code, err, 1, f"data set {data} holds no images", fragment)
    assert not (tmp_path / "out").exists()


def test_images_of_the_wrong_size_for_the_model(capsys, tmp_path: Path, digits: Path) -> None:
    # the digits are resized to 4x4 (--resize), which the second 3x3 convolution cannot take
    code, _, err = run_cli(capsys, *digits_args(digits, "--out", tmp_path / "out", "--image-size", "1,4,4",
                                                "--resize"))
    assert_one_line_error(code, err, 1, "wrong input size: the model rejects 1x4x4 inputs", "--image-size C,H,W")
    assert not (tmp_path / "out").exists()


def test_labels_out_of_range(capsys, tmp_path: Path) -> None:
    five_classes = digits_checkpoint(tmp_path, classes=5)
    code, _, err = run_cli(capsys, *digits_args(five_classes, "--out", tmp_path / "out"))
    assert_one_line_error(code, err, 1, "labels out of range: the evaluation data has 10 classes but the model "
                                        "has 5 outputs")
    assert not (tmp_path / "out").exists()


def small_cnn() -> nn.Module:
    return randomize_bn(cnn(1, [4], 4, 3, padding=0, pool=nn.AdaptiveAvgPool2d(1))).eval()


def test_api_calibration_loaders_that_cannot_calibrate() -> None:
    images = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="^the calibration loader yielded no batches$"):
        ann2snn.convert(small_cnn(), [])
    with pytest.raises(ValueError, match="^the calibration loader yielded no batches$"):
        ann2snn.convert(small_cnn(), iter(()))
    with pytest.raises(InputError, match=r"^calibration batch 0: inputs are torch.uint8, not floating point; "
                                         r"convert the images to float first"):
        ann2snn.convert(small_cnn(), [(images * 255).to(torch.uint8)])
    # the second batch is only read by the calibration pass: its error is about the data, not the pass
    with pytest.raises(InputError, match=r"^calibration batch 1: inputs of size 1x9x9, but the first batch had "
                                         r"1x8x8; every batch must hold inputs of one size$"):
        ann2snn.convert(small_cnn(), [(images, torch.zeros(4)), (torch.rand(4, 1, 9, 9), torch.zeros(4))])


# Models --------------------------------------------------------------------------------------------------------


class BranchesOnValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, stride=2), nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = F.relu(x)
        return self.fc(x.mean((2, 3)))


class Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, stride=2), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("model, line, fragments", [
    (BranchesOnValues, "if x.sum() > 0:", ["[pass trace] torch.fx could not trace the top-level BranchesOnValues",
                                           "Data-dependent control flow"]),
    (Sigmoid, "torch.sigmoid", ["[pass check_supported] 1 node(s) cannot be converted",
                                "node 'sigmoid' [call_function torch", "not a linear synaptic op"]),
], ids=["data-dependent-if", "sigmoid"])
def test_unconvertible_models_name_the_node_and_line(capsys, tmp_path: Path, model, line: str,
                                                      fragments: list[str]) -> None:
    checkpoint = tmp_path / "model.pt"
    torch.save(model().eval(), checkpoint)
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", tmp_path / "out"))
    where = f"{Path(__file__).name}:{source_line(model.forward, line)} ("
    assert_one_line_error(code, err, 1, *fragments, where, line.strip(":"), "`ann2snn inspect CHECKPOINT`")
    assert not (tmp_path / "out").exists()


def test_a_model_in_training_mode_converts_in_eval_mode_with_a_warning(capsys, tmp_path: Path, digits: Path) -> None:
    model = torch.load(digits, weights_only=False).train()
    checkpoint = tmp_path / "training.pt"
    torch.save(model, checkpoint)
    # `eval CHECKPOINT` converts in memory and writes nothing: the conversion without the ONNX export
    code, out, err = run_cli(capsys, "eval", checkpoint, "--trust-pickle", "--calib", "mnist5k", "--calib-size", 40,
                             "--data", "mnist5k", "--eval-size", 20, "--image-size", "1,28,28", "--mean", "0.13",
                             "--std", "0.31", "--T", 4, "--T-list", 4, "--no-progress")
    assert code == 0, err
    assert err.strip().splitlines() == [
        f"ann2snn: warning: {checkpoint}: the pickled model was saved in training mode; converting its eval() form, "
        "in which BatchNorm uses its running statistics and dropout is off (1, 4)"]
    assert "SNN" in out

    # through the API: a warning, the eval() form converted, and the caller's model left in training mode
    calibration = [torch.rand(8, 1, 28, 28)]
    with pytest.warns(ConversionWarning, match="the model was in training mode; converting its eval\\(\\) form"):
        snn = ann2snn.convert(model, calibration, T=4)
    assert model.training
    expected = ann2snn.convert(model.eval(), calibration, T=4)
    assert torch.equal(snn(calibration[0]), expected(calibration[0]))


def test_parameters_on_two_devices() -> None:
    model = small_cnn()
    model[5].to("meta")
    with pytest.raises(ConversionError, match=r"on several devices \(cpu: 7 tensors \(0.weight, 0.bias, 1.weight, "
                                              r"\.\.\. \(4 more\)\); meta: 2 tensors \(5.weight, 5.bias\)\)"):
        ann2snn.convert(model, [torch.rand(4, 1, 8, 8)])


# Outputs -------------------------------------------------------------------------------------------------------


def test_existing_output_directory_without_force_is_left_alone(capsys, tmp_path: Path, digits: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("results of last week")
    before = contents(out)
    code, _, err = run_cli(capsys, *digits_args(digits, "--out", out))
    assert_one_line_error(code, err, 2, f"output directory {out} already exists and was not written by ann2snn")
    assert contents(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_unwritable_output_fails_before_any_work(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a directory")
    # The checkpoint does not exist either: the output is checked first, before anything is loaded.
    code, _, err = run_cli(capsys, *digits_args(tmp_path / "absent.pt", "--out", blocker / "out"))
    assert_one_line_error(code, err, 2, f"cannot write output directory {blocker / 'out'}: Not a directory")
    assert blocker.read_text() == "a file, not a directory"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results"]


def test_interrupted_run_leaves_the_previous_output_as_it_was(tmp_path: Path, digits: Path, converted: Path) -> None:
    out = tmp_path / "runs" / "out"
    shutil.copytree(converted, out)
    before = contents(out)
    process = subprocess.Popen([sys.executable, "-m", "ann2snn", *digits_args(digits, "--out", out, *SEED, "--force")],
                               cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Stop it at the worst moment: while the new outputs are being written beside the previous ones.
        deadline = time.monotonic() + 240
        while not (out.parent / ".out.partial" / "snn.pt").exists():
            assert process.poll() is None, f"the run ended before writing its outputs: {process.communicate()[1]}"
            assert time.monotonic() < deadline, "the run never started writing its outputs"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ann2snn: interrupted"
    assert contents(out) == before
    assert sorted(path.name for path in out.parent.iterdir()) == ["out"], "staging directories left behind"


# Determinism ---------------------------------------------------------------------------------------------------


def test_the_same_conversion_twice_gives_the_same_network_and_report(tmp_path: Path, digits: Path,
                                                                     converted: Path) -> None:
    again = tmp_path / "again"
    assert main(digits_args(digits, "--out", again, *SEED)) == 0
    first, second = load_saved(converted / "snn.pt"), load_saved(again / "snn.pt")
    for network in ("snn", "ann"):
        states = getattr(first, network).state_dict(), getattr(second, network).state_dict()
        assert list(states[0]) == list(states[1])
        for name, tensor in states[0].items():
            assert tensor.dtype == states[1][name].dtype and torch.equal(tensor, states[1][name]), f"{network}: {name}"

    reports = [json.loads((directory / "report.json").read_text()) for directory in (converted, again)]
    for report in reports:
        report.pop("timing"), report.pop("provenance")  # when and how each run went differ
    assert reports[0] == reports[1]
    for figure in ("accuracy_vs_T.png", "spikes_per_layer.png"):
        assert (converted / figure).read_bytes() == (again / figure).read_bytes(), figure
