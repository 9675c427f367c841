"""The command line's checks before any work and its output lines (issue 17): option conflicts found before the
model is loaded, error and warning lines that start a line of their own after a progress bar, class folders
matched against the model, an evaluation progress bar that moves per chunk of steps with a warning when the run
will be long, and a start-up that does not import torch for --help and --version."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import ann2snn
from ann2snn.cli import convert as convert_command
from ann2snn.errors import ConversionWarning
from ann2snn.evaluation import evaluate as evaluate_module
from ann2snn.io.data import CIFAR10_CLASSES
from ann2snn.workflow import default_T_list
from tests.helpers import assert_one_line_error, digits_args, digits_checkpoint, run_cli

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("options, fragment", [
    (["--stop-when-quiet"], "stop when quiet needs signed neurons"),
    (["--adapt-increase", "0.1"], "--adapt-increase and --adapt-decay are options of --neuron adaptive"),
    (["--qbits-budget", "3", "--qbits", "4"], "--qbits-budget chooses the bits"),
    (["--neuron", "signed", "--encoding", "poisson"], "encoding 'poisson' needs rate-coded neurons"),
    (["--qbits-config", "QBITS"], "qbits of 'default' must be an integer in 1..8"),
], ids=["stop-when-quiet-if", "adapt-increase-if", "budget-and-qbits", "signed-poisson", "bad-qbits-config"])
def test_option_conflicts_are_refused_before_the_model_is_loaded(capsys, tmp_path: Path, options: list[str],
                                                                  fragment: str) -> None:
    """The checkpoint does not exist: an error about the options proves they were checked first. Each is a usage
    error (exit 2), as README says, whether argparse, the command line's own checks or the configuration refuses
    the value."""
    (tmp_path / "bits.json").write_text('{"default": "x"}')
    options = [str(tmp_path / "bits.json") if option == "QBITS" else option for option in options]
    code, _, err = run_cli(capsys, "convert", tmp_path / "absent.pt", "--out", tmp_path / "out", *options)
    line = assert_one_line_error(code, err, 2, fragment)
    assert "absent.pt" not in line and not (tmp_path / "out").exists()


def test_error_and_warning_lines_start_a_line_of_their_own(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error was printed onto the end of the progress bar's line, so that `grep '^ann2snn: error'` missed it."""
    def fails_while_drawing(args) -> int:
        bar = tqdm(total=10, desc="calibrating")
        bar.update(3)
        bar.refresh()
        warnings.warn("halfway there", ConversionWarning)
        bar.update(3)
        bar.refresh()
        raise ValueError("the calibration failed")

    monkeypatch.setattr(convert_command, "run", fails_while_drawing)
    code, _, err = run_cli(capsys, "convert", "model.pt")
    assert code == 1
    lines = err.split("\n")
    assert "ann2snn: warning: halfway there" in lines and "ann2snn: error: the calibration failed" in lines, err


def cifar_like_checkpoint(directory: Path) -> Path:
    """A tiny trusted pickled CNN for 3x8x8 images with CIFAR-10's 10 outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    path = directory / "tiny.pt"
    torch.save(model.eval(), path)
    return path


def tiny_folder(root: Path, classes) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), color=(len(name) * 20, 40, 90)).save(root / name / "0.png")
    return root


def tiny_args(checkpoint: Path, data: Path, out: Path) -> list[str | Path]:
    return ["convert", checkpoint, "--trust-pickle", "--calib", data, "--data", data, "--image-size", "3,8,8",
            "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--T", "4", "--T-list", "4", "--no-progress",
            "--out", out]


def test_class_folders_are_matched_to_the_model_hidden_ones_ignored(capsys, tmp_path: Path) -> None:
    """Without cat/ the labels shifted (ANN 33 % instead of 86 %); .ipynb_checkpoints/ made an 11th class."""
    checkpoint = cifar_like_checkpoint(tmp_path)
    no_cat = tiny_folder(tmp_path / "no_cat", [name for name in CIFAR10_CLASSES if name != "cat"])
    code, _, err = run_cli(capsys, *tiny_args(checkpoint, no_cat, tmp_path / "refused"))
    assert_one_line_error(code, err, 1, f"evaluation data {no_cat}: class folder cat missing", "10 outputs")
    assert not (tmp_path / "refused").exists()

    data = tiny_folder(tmp_path / "data", CIFAR10_CLASSES)
    tiny_folder(data / ".ipynb_checkpoints", ["cat"])
    code, _, err = run_cli(capsys, *tiny_args(checkpoint, data, tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["images"] == 10 and report["data"]["evaluation"]["classes"] == list(CIFAR10_CLASSES)


def test_eval_of_a_saved_network_checks_the_classes_it_was_calibrated_on(capsys, tmp_path: Path) -> None:
    checkpoint = digits_checkpoint(tmp_path, classes=10)
    out = tmp_path / "conversion"
    assert run_cli(capsys, *digits_args(checkpoint, "--out", out))[0] == 0
    digits = tmp_path / "digits"
    for digit in (0, 1, 2, 3, 4, 6, 7, 8, 9):  # no 5/
        (digits / str(digit)).mkdir(parents=True)
        Image.new("L", (28, 28)).save(digits / str(digit) / "0.png")
    code, _, err = run_cli(capsys, "eval", out, "--data", digits, "--no-progress")
    assert_one_line_error(code, err, 1, f"evaluation data {digits}: class folder 5 missing (the model's 10 outputs "
                                        "stand for the calibration data's classes)")


class _Bar:
    """Records what a progress bar is told."""

    instances: list[_Bar] = []

    def __init__(self, iterable=None, total=None, **options) -> None:
        self.iterable, self.total, self.updates = iterable, total, []
        _Bar.instances.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def update(self, count: int) -> None:
        self.updates.append(count)

    def close(self) -> None:
        pass


def tiny_snn() -> ann2snn.SpikingNetwork:
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    return ann2snn.convert(model, [torch.rand(16, 6)], T=8)


def test_the_evaluation_bar_moves_per_chunk_of_time_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """It moved once per batch: 0/1 for the whole run with one batch."""
    monkeypatch.setattr(evaluate_module, "tqdm", _Bar)
    _Bar.instances.clear()
    loader = DataLoader(TensorDataset(torch.rand(5, 6), torch.randint(0, 3, (5,))), batch_size=5)
    ann2snn.evaluate(tiny_snn(), loader, [8], chunk_size=2, progress=True)
    bar, = _Bar.instances
    assert bar.total == 5 * 8 and bar.updates == [5 * 2] * 4


def test_a_long_evaluation_is_announced_with_its_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """--T 100000 --eval-size 2 ran for hours without a word."""
    monkeypatch.setattr(evaluate_module, "LONG_EVALUATION_S", 0.0)
    loader = DataLoader(TensorDataset(torch.rand(5, 6), torch.randint(0, 3, (5,))), batch_size=5)
    with pytest.warns(ConversionWarning, match=r"^this evaluation will take about \d+ s: 5 images x 8 time steps, at "
                                               r"the pace of its first 10 image-steps; a smaller --T, --T-list or "
                                               r"--eval-size shortens it$"):
        ann2snn.evaluate(tiny_snn(), loader, [8], chunk_size=2)


def test_a_run_stopped_when_quiet_is_estimated_from_its_first_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed run was estimated from its first chunk as if every step ran: hours announced for minutes."""
    monkeypatch.setattr(evaluate_module, "LONG_EVALUATION_S", 0.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    snn = ann2snn.convert(model, [torch.rand(16, 6)], T=256, neuron="signed")
    data = TensorDataset(torch.rand(10, 6), torch.randint(0, 3, (10,)))
    quiet_after = int(snn.simulate(data.tensors[0][:5], [256], stop_when_quiet=True).steps_used.max())
    assert quiet_after < 256
    with pytest.warns(ConversionWarning) as announced:
        ann2snn.evaluate(snn, DataLoader(data, batch_size=5), [256], chunk_size=1, stop_when_quiet=True)
    message, = [str(warning.message) for warning in announced]
    assert re.fullmatch(rf"this evaluation will take about \d+ s: 10 images x 256 time steps, at the pace of its "
                        rf"first batch of 5 images, quiet after {quiet_after} steps; .*", message), message
    with warnings.catch_warnings():  # one batch: it is over when its pace is known
        warnings.simplefilter("error", ConversionWarning)
        ann2snn.evaluate(snn, DataLoader(data, batch_size=10), [256], chunk_size=1, stop_when_quiet=True)


def test_the_default_T_list_doubles_T_only_while_that_is_cheap() -> None:
    """--T 100000 simulated 200,000 steps: the default list included 2T."""
    assert default_T_list(32) == [8, 16, 32, 64]
    assert default_T_list(256) == [64, 128, 256, 512]
    assert default_T_list(100000) == [25000, 50000, 100000]


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["eval", "--help"], ["--version"]],
                         ids=["help", "convert-help", "eval-help", "version"])
def test_help_and_version_do_not_import_torch(argv: list[str]) -> None:
    """--help took 15 s and 850 MB: torch was imported before argparse ran."""
    output = run_python("import contextlib, io, sys\n"
                        "from ann2snn.cli.main import main\n"
                        "printed = io.StringIO()\n"
                        "with contextlib.redirect_stdout(printed):\n"
                        f"    code = main({argv!r})\n"
                        "print(code, 'torch' in sys.modules, repr(printed.getvalue()))")
    code, torch_imported, printed = output.split(" ", 2)
    assert (code, torch_imported) == ("0", "False"), printed
    if argv == ["--version"]:
        assert printed.strip() == repr(f"ann2snn {ann2snn.__version__}\n")


def test_the_vocabulary_the_options_offer_is_the_library_s() -> None:
    """The options read their choices and defaults from the library's source (ann2snn.cli.vocabulary)."""
    from ann2snn import config, distributed
    from ann2snn.cli import vocabulary
    from ann2snn.compiler.observers import THRESHOLD_RULES
    from ann2snn.compiler.passes.calibrate_spiking import SPIKING_CALIBRATIONS
    from ann2snn.evaluation import energy
    from ann2snn.interop.onnx import FILE_NAMES, FORMATS
    from ann2snn.runtime.encoding import ENCODINGS
    from ann2snn.runtime.neuron_kinds import NEURON_KINDS
    from ann2snn.training.pruning import PRUNE_MODES

    assert vocabulary.NEURON_KINDS == tuple(NEURON_KINDS)
    assert vocabulary.ADAPTIVE_OPTIONS == NEURON_KINDS[vocabulary.ADAPTIVE].options
    assert vocabulary.THRESHOLD_RULES == tuple(THRESHOLD_RULES)
    assert vocabulary.SPIKING_CALIBRATIONS == tuple(SPIKING_CALIBRATIONS)
    assert vocabulary.THRESHOLD_LEVELS == config.THRESHOLD_LEVELS
    assert (vocabulary.ENCODINGS, vocabulary.PRUNE_MODES) == (ENCODINGS, PRUNE_MODES)
    assert (vocabulary.ONNX_FORMATS, vocabulary.ONNX_FILE_NAMES) == (FORMATS, FILE_NAMES)
    assert vocabulary.DEFAULT_DIST_TIMEOUT == distributed.DEFAULT_TIMEOUT
    assert vocabulary.ENERGY_PRESETS == tuple(energy.ENERGY_PRESETS)
    assert vocabulary.DEFAULT_ENERGY_PRESET == energy.DEFAULT_ENERGY_PRESET
    defaults = config.ConversionConfig()
    for part, field, value in [("SimulationConfig", "T", defaults.simulation.T),
                               ("QuantizationConfig", "qbits", defaults.quantization.qbits),
                               ("QuantizationConfig", "threshold_rule", defaults.quantization.threshold_rule),
                               ("QuantizationConfig", "percentile", defaults.quantization.percentile),
                               ("NeuronConfig", "kind", defaults.neuron.kind),
                               ("NeuronConfig", "max_spikes_per_step", defaults.neuron.max_spikes_per_step),
                               ("EncodingConfig", "seed", defaults.encoding.seed),
                               ("SpikingCalibrationConfig", "images", defaults.calibration.images)]:
        assert vocabulary.config_default(part, field) == value, (part, field)


def test_the_energy_preset_option_reaches_the_run() -> None:
    from ann2snn.cli import arguments
    from ann2snn.cli.main import build_parser

    chosen = build_parser().parse_args(["eval", "x.pt", "--device", "cpu", "--energy-preset", "int8-45nm"])
    default = build_parser().parse_args(["eval", "x.pt", "--device", "cpu"])
    assert arguments.execution(chosen).energy_preset == "int8-45nm"
    assert arguments.execution(default).energy_preset == "fp32-45nm"
