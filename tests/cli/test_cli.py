from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ann2snn
from ann2snn.io.checkpoint import load_into
from ann2snn.io.data import (
    CIFAR10_CLASSES,
    SHARED_ENV_VAR,
    cifar10_transform,
    make_loader,
    open_dataset,
    stratified_subset,
)
from ann2snn.io.model_loading import Preprocessing, save_checkpoint
from ann2snn.io.output_directory import MARKER
from ann2snn.zoo import build_model
from tests.helpers import assert_one_line_error, digits_args, digits_checkpoint
from tests.helpers import run_cli as run
from tests.networks import cnn

REPORT_FILES = {MARKER, "report.json", "report.md", "accuracy_vs_T.png", "spikes_per_layer.png"}
CONVERSION_FILES = REPORT_FILES | {"snn.pt", "snn.onnx", "snn-step.onnx"}
CLASSES = CIFAR10_CLASSES  # a CIFAR-10 model is refused data with class folders missing
FAST = ["--T", "4", "--T-list", "2,4", "--no-progress"]


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`data/test/<class>/<n>.png` (32x32 RGB) and `data/subsets/list.txt` listing half of them."""
    root = tmp_path_factory.mktemp("data")
    generator = np.random.default_rng(0)
    listed = []
    for label in CLASSES:
        (root / "test" / label).mkdir(parents=True)
        for index in range(2):
            pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "test" / label / f"{index}.png")
            if index % 2 == 0:
                listed.append(f"test/{label}/{index}.png")
    (root / "subsets").mkdir()
    (root / "subsets" / "list.txt").write_text("\n".join(listed) + "\n")
    return root


@pytest.fixture(scope="module")
def resnet20_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(build_model("resnet20"), tmp_path_factory.mktemp("ckpt") / "resnet20.pt", "resnet20",
                           preprocessing=Preprocessing())


def convert_args(checkpoint: Path, data: str | Path, out: Path, *extra: str | Path) -> list[str | Path]:
    return ["convert", checkpoint, "--calib", data, "--eval", data, "--out", out, *FAST, *extra]


def test_convert_writes_everything_and_the_snn_reloads(capsys, image_tree: Path, resnet20_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, *convert_args(resnet20_checkpoint, image_tree / "test", out))
    assert code == 0
    assert {path.name for path in out.iterdir()} == CONVERSION_FILES
    assert f"Wrote {out}/" in stdout and "QANN" in stdout

    document = json.loads((out / "report.json").read_text())
    assert document["images"] == 20 and document["T_list"] == [2, 4]
    assert set(document["accuracy"]["snn"]) == {"2", "4"}
    assert document["accuracy"]["ann"] is not None and document["accuracy"]["qann"] is not None
    assert {"name", "neurons", "spikes_per_image", "firing_rate"} <= set(document["spikes"]["per_layer"][0])
    assert {"synops_per_image", "ann_macs_per_image", "energy", "config", "timing"} <= set(document)
    assert (document["config"]["T"], document["config"]["qbits"], document["config"]["neuron"],
            document["config"]["threshold_rule"]) == (4, 4, "if", "mse")
    assert document["model"]["arch"] == "resnet20" and document["model"]["arch_source"] == "checkpoint"
    assert document["data"]["calibration"]["images"] == 20

    saved = ann2snn.io.saved_network.load_saved(out / "snn.pt")
    assert saved.metadata["preprocessing"] == Preprocessing().to_dict()
    x = torch.randn(2, 3, 32, 32)
    assert saved.snn(x).shape == (2, 10) and saved.ann(x).shape == (2, 10)


def test_default_output_directory_and_force(capsys, image_tree: Path, resnet20_checkpoint: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = image_tree / "subsets" / "list.txt"
    args = ["convert", resnet20_checkpoint, "--calib", data, "--eval", data, *FAST]
    assert run(capsys, *args)[0] == 0
    out = tmp_path / "resnet20-snn"
    assert {path.name for path in out.iterdir()} == CONVERSION_FILES
    (out / "report.md").write_text("previous run")

    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, 2, "resnet20-snn already exists", "--force")
    assert (out / "report.md").read_text() == "previous run"

    assert run(capsys, *args, "--force")[0] == 0
    assert (out / "report.md").read_text() != "previous run"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["resnet20-snn"], "staging directories left behind"


def test_list_file_data_and_subset_sizes(capsys, image_tree: Path, resnet20_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = image_tree / "subsets" / "list.txt"
    code, _, _ = run(capsys, *convert_args(resnet20_checkpoint, data, out, "--calib-size", 6, "--eval-size", 3,
                                           "--seed", 5))
    assert code == 0
    document = json.loads((out / "report.json").read_text())
    assert document["data"]["calibration"] == {"spec": str(data), "images": 6, "available": 10, "seed": 5,
                                               "classes": list(CLASSES)}
    assert document["data"]["evaluation"]["images"] == document["images"] == 3


def write_fake_cifar10(root: Path, images: int = 12) -> None:
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for name in [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]:
        batch = {"data": generator.integers(0, 256, (images, 3072), dtype=np.uint8),
                 "labels": [index % 10 for index in range(images)]}
        (batches / name).write_bytes(pickle.dumps(batch))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{index}" for index in range(10)]}))


def test_cifar10_data_in_torchvision_format(capsys, resnet20_checkpoint: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar10(tmp_path / "cifar")
    # torchvision checks the batch files against the real data set's MD5 sums.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: os.path.isfile(path))
    out = tmp_path / "out"
    code, _, err = run(capsys, *convert_args(resnet20_checkpoint, f"cifar10:{tmp_path / 'cifar'}", out))
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["images"] == 12


def mnist_checkpoint(directory: Path) -> Path:
    """A small CNN for 1x28x28 digits, pickled whole (its class is torch's own)."""
    model = cnn(1, [4], 4 * 6 * 6, 10, kernel=5, stride=2, padding=0, batchnorm=False, pool=nn.MaxPool2d(2)).eval()
    path = directory / "digits.pt"
    torch.save(model, path)
    return path


def test_mnist5k_with_a_trusted_pickled_module_and_preprocessing_flags(capsys, tmp_path: Path) -> None:
    checkpoint = mnist_checkpoint(tmp_path)
    out = tmp_path / "out"
    code, _, err = run(capsys, *convert_args(checkpoint, "mnist5k", out, "--calib-size", 40, "--eval-size", 30,
                                             "--trust-pickle", "--mean", "0.13", "--std", "0.31",
                                             "--image-size", "1,28,28"))
    assert code == 0, err
    document = json.loads((out / "report.json").read_text())
    assert document["images"] == 30
    assert document["model"]["preprocessing"] == {"mean": [0.13], "std": [0.31], "image_size": [1, 28, 28]}
    assert document["model"]["arch_source"] == "pickled module"


def test_plain_state_dict_forms(capsys, image_tree: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = build_model("resnet20").state_dict()
    plain = tmp_path / "weights.pt"
    torch.save(state, plain)
    wrapped = tmp_path / "resnet20-cifar10.th"
    torch.save({"best_prec1": 90.0, "state_dict": {f"module.{key}": value for key, value in state.items()}}, wrapped)
    data = image_tree / "subsets" / "list.txt"

    assert run(capsys, *convert_args(plain, data, tmp_path / "a", "--arch", "resnet20"))[0] == 0
    assert run(capsys, *convert_args(wrapped, data, tmp_path / "b"))[0] == 0
    model_a = json.loads((tmp_path / "a" / "report.json").read_text())["model"]
    model_b = json.loads((tmp_path / "b" / "report.json").read_text())["model"]
    assert (model_a["arch"], model_a["arch_source"]) == ("resnet20", "argument")
    assert (model_b["arch"], model_b["arch_source"]) == ("resnet20", "file name")


def test_eval_of_a_conversion_directory_file_and_checkpoint(capsys, image_tree: Path, resnet20_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    data = image_tree / "test"
    out = tmp_path / "conversion"
    assert run(capsys, *convert_args(resnet20_checkpoint, data, out))[0] == 0
    converted = json.loads((out / "report.json").read_text())

    code, stdout, _ = run(capsys, "eval", out, "--data", data, "--T-list", "2,4", "--no-progress",
                          "--out", tmp_path / "again")
    assert code == 0 and "SNN" in stdout
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["accuracy"] == converted["accuracy"]
    assert again["synops_per_image"] == pytest.approx(converted["synops_per_image"])
    assert again["model"]["arch"] == "resnet20"
    assert {path.name for path in (tmp_path / "again").iterdir()} == REPORT_FILES

    code, stdout, _ = run(capsys, "eval", out / "snn.pt", "--data", data, "--no-progress")
    snn_rows = [line.split()[1] for line in stdout.splitlines() if line.split()[:1] == ["SNN"]]
    assert code == 0 and snn_rows == ["1", "2", "4", "8"], "the default T list is T/4, T/2, T, 2T"

    code, _, _ = run(capsys, "eval", resnet20_checkpoint, "--calib", data, "--data", data, *FAST,
                     "--out", tmp_path / "from-checkpoint")
    assert code == 0
    assert json.loads((tmp_path / "from-checkpoint" / "report.json").read_text())["accuracy"] == converted["accuracy"]


def test_inspect_lists_what_each_node_becomes(capsys, resnet20_checkpoint: Path) -> None:
    code, stdout, _ = run(capsys, "inspect", resnet20_checkpoint)
    assert code == 0
    assert stdout.startswith("resnet20 (checkpoint), input 3x32x32:")
    assert "spiking neuron layer" in stdout and "synapses: weights" in stdout and "1x10" in stdout
    assert "can be converted" in stdout


def test_unconvertible_model(capsys, image_tree: Path, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, len(CLASSES)))
    checkpoint = tmp_path / "silu.pt"
    torch.save(model, checkpoint)

    code, stdout, err = run(capsys, "inspect", checkpoint, "--trust-pickle")
    assert code == 1 and "UNSUPPORTED" in stdout and "SiLU" in stdout
    assert_one_line_error(code, err, 1, "1 node(s) cannot be converted")

    code, _, err = run(capsys, *convert_args(checkpoint, image_tree / "test", tmp_path / "out", "--trust-pickle"))
    assert_one_line_error(code, err, 1, "cannot be converted", "SiLU", "ann2snn inspect")
    assert not (tmp_path / "out").exists()


def test_error_unknown_arch(capsys, image_tree: Path, resnet20_checkpoint: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, *convert_args(resnet20_checkpoint, image_tree / "test", tmp_path / "out",
                                             "--arch", "resnet21"))
    assert_one_line_error(code, err, 1, "unknown model 'resnet21'", "known models:", "torchvision:")


def test_error_arch_not_inferable(capsys, image_tree: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    torch.save(build_model("resnet20").state_dict(), checkpoint)
    code, _, err = run(capsys, *convert_args(checkpoint, image_tree / "test", tmp_path / "out"))
    assert_one_line_error(code, err, 1, "cannot tell the architecture", "pass --arch NAME")


def test_error_missing_data_directory(capsys, resnet20_checkpoint: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    code, _, err = run(capsys, *convert_args(resnet20_checkpoint, missing, tmp_path / "out"))
    assert_one_line_error(code, err, 1, str(missing), "does not exist", "ImageFolder directory")
    assert not (tmp_path / "out").exists()


def test_error_missing_default_data(capsys, resnet20_checkpoint: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHARED_ENV_VAR, str(tmp_path / "empty"))
    code, _, err = run(capsys, "convert", resnet20_checkpoint, "--out", tmp_path / "out", *FAST)
    assert_one_line_error(code, err, 2, "no --data given", "pass --data DATA")


def test_error_wrong_input_size(capsys, resnet20_checkpoint: Path, tmp_path: Path, image_tree: Path) -> None:
    # Digits have one channel; the ResNet-20 takes three.
    code, _, err = run(capsys, *convert_args(resnet20_checkpoint, "mnist5k", tmp_path / "out", "--calib-size", 20))
    assert_one_line_error(code, err, 1, "wrong input size", "1x28x28", "3x32x32")
    # The digit CNN accepts 28x28 inputs only.
    code, _, err = run(capsys, *convert_args(mnist_checkpoint(tmp_path), image_tree / "test", tmp_path / "out",
                                             "--trust-pickle", "--mean", "0.5", "--std", "0.5",
                                             "--image-size", "1", "32", "32"))
    assert_one_line_error(code, err, 1, "20 of 20 images do not fit the model's 1x32x32 inputs", "(colour (RGB))")
    code, _, err = run(capsys, *convert_args(mnist_checkpoint(tmp_path), "mnist5k", tmp_path / "out", "--trust-pickle",
                                             "--mean", "0.5", "--std", "0.5", "--image-size", "1,20,20", "--resize"))
    assert_one_line_error(code, err, 1, "wrong input size: the model rejects 1x20x20 inputs")


def test_error_pickled_module_without_trust(capsys, image_tree: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, *convert_args(mnist_checkpoint(tmp_path), "mnist5k", tmp_path / "out"))
    assert_one_line_error(code, err, 1, "pickled Python objects", "--trust-pickle")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_cuda_unavailable(capsys, image_tree: Path, resnet20_checkpoint: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, *convert_args(resnet20_checkpoint, image_tree / "test", tmp_path / "out",
                                             "--device", "cuda"))
    assert_one_line_error(code, err, 2, "CUDA is not available")


def test_usage_errors(capsys) -> None:
    code, _, err = run(capsys, "convert")
    assert code == 2 and "CHECKPOINT" in err
    code, _, err = run(capsys, "convert", "x.pt", "--T-list", "8,zero")
    assert code == 2 and "--T-list" in err
    assert run(capsys, "--help")[0] == 0


def test_options_are_never_abbreviated(capsys, tmp_path: Path) -> None:
    """`eval DIR --eval DATA` was taken for --eval-size; an option is now spelled out or refused."""
    code, _, err = run(capsys, "eval", tmp_path, "--eval", "mnist5k")
    assert_one_line_error(code, err, 2, "unrecognized arguments: --eval mnist5k")
    code, _, err = run(capsys, "convert", "x.pt", "--eval-s", "3")
    assert_one_line_error(code, err, 2, "unrecognized arguments: --eval-s")


def test_conversion_options_are_refused_on_a_saved_network(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    out = tmp_path / "conversion"
    # every command names its evaluation data --data; convert's old --eval still works (digits_args uses it)
    arguments = digits_args(checkpoint, "--out", out)
    arguments[arguments.index("--eval")] = "--data"
    code, _, err = run(capsys, *arguments)
    assert code == 0, err
    for command in ("eval", "analyze"):
        refused = tmp_path / f"{command}-refused"
        code, _, err = run(capsys, command, out, "--data", "mnist5k", "--T", "8", "--neuron", "signed",
                           "--per-channel", "--prune", "0.5", "--out", refused)
        assert_one_line_error(code, err, 2, "--T, --neuron, --per-channel, --prune: conversion options",
                              f"{out} is a saved network")
        assert not refused.exists()
    code, _, err = run(capsys, "eval", out / "snn.pt", "--data", "mnist5k", "--calib", "mnist5k")
    assert_one_line_error(code, err, 2, "--calib: conversion option, but")


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "ann2snn", "inspect", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "usage: ann2snn inspect" in result.stdout


@pytest.mark.shared
@pytest.mark.slow
def test_shared_resnet20_cli_matches_the_python_api(capsys, shared: Path, tmp_path: Path) -> None:
    checkpoint = shared / "models" / "resnet20-cifar10.th"
    calibration_list = shared / "data" / "cifar10" / "subsets" / "train-calib-512.txt"
    test_list = shared / "data" / "cifar10" / "subsets" / "test-1000.txt"
    out = tmp_path / "r20"
    code, _, err = run(capsys, "convert", checkpoint, "--calib", calibration_list, "--calib-size", 64,
                       "--eval", test_list, "--eval-size", 100, "--T-list", "8,32", "--T", 32, "--qbits", 4,
                       "--out", out, "--no-progress")
    assert code == 0, err
    document = json.loads((out / "report.json").read_text())
    assert document["model"]["arch"] == "resnet20" and document["model"]["arch_source"] == "file name"

    model = load_into(build_model("resnet20"), checkpoint).eval()
    calibration = stratified_subset(open_dataset(str(calibration_list), transform=cifar10_transform()), 64, seed=0)
    evaluation = stratified_subset(open_dataset(str(test_list), transform=cifar10_transform()), 100, seed=0)
    snn = ann2snn.convert(model, make_loader(calibration, 128), T=32, qbits=4)
    expected = ann2snn.evaluate(snn, make_loader(evaluation, 128), [8, 32], ann=model).to_json()

    assert document["accuracy"] == expected["accuracy"]
    assert document["agreement_snn_qann"] == expected["agreement_snn_qann"]
    assert document["synops_per_image"] == pytest.approx(expected["synops_per_image"])
    assert document["spikes"]["per_layer"] == expected["spikes"]["per_layer"]
    assert document["ann_macs_per_image"] == expected["ann_macs_per_image"]
    # The shipped ResNet-20 scores about 81 % on this JPEG test set (README); 100 images are noisy.
    assert 0.7 <= document["accuracy"]["ann"] <= 0.92


def test_stop_when_quiet_with_signed_neurons(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    code, out, err = run(capsys, *digits_args(checkpoint, "--neuron", "signed", "--T", "64", "--T-list", "64",
                                              "--stop-when-quiet", "--out", tmp_path / "quiet"))
    assert code == 0, err
    quiet = json.loads((tmp_path / "quiet" / "report.json").read_text())["quiet_steps"]
    assert 1 <= quiet["mean"] <= quiet["max"] <= 64 and "Stopped when quiet:" in out


def test_stop_when_quiet_needs_signed_neurons_before_any_work(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    code, out, err = run(capsys, *digits_args(checkpoint, "--stop-when-quiet", "--out", tmp_path / "rate"))
    assert_one_line_error(code, err, 2, "stop when quiet needs signed neurons (accumulate coding), not rate coding")
    assert "calibrating" not in err and not (tmp_path / "rate").exists()
