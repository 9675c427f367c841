"""The `ann2snn` command line: convert, eval and inspect.

    ann2snn convert CHECKPOINT --T 32 --qbits 4 [--calib DATA] [--eval DATA] [--T-list 8,16,32,64] ...
    ann2snn eval DIR-or-FILE --data DATA [--T-list ...] [--out DIR]
    ann2snn inspect CHECKPOINT
    ann2snn export DIR-or-FILE [--format single-step|t-step|qann|all] [--T N] [--out DIR]

Exit codes: 0 on success, 1 when the work fails (unconvertible model, unreadable checkpoint, missing
data, ...), 2 for usage errors; errors are printed as one line `ann2snn: error: <reason>`."""
from __future__ import annotations

import argparse
import functools
import os
import secrets
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.data import Dataset
from tqdm import tqdm

from ann2snn.evaluation.analysis import analysis_summary, analyze, write_analysis
from ann2snn.compiler.convert import DEFAULT_THRESHOLD_RULE, convert, prepare_pipeline
from ann2snn.training.bit_allocation import allocate_bits, read_qbits_config
from ann2snn.io.data import known_labels, make_loader, open_dataset, shared_dir, stratified_subset
from ann2snn.runtime.encoding import ENCODINGS
from ann2snn.distributed import DEFAULT_TIMEOUT, is_distributed, is_main_process, process_group, rank, shard, world_size
from ann2snn.io.batches import check_model_accepts, device_of
from ann2snn.errors import ConversionError, ConversionWarning, target_name
from ann2snn.evaluation.evaluate import evaluate
from ann2snn.compiler.ops import Role, role_of
from ann2snn.io.model_loading import LoadedModel, Preprocessing, load_model
from ann2snn.runtime.neurons import DEFAULT_ADAPT_DECAY, DEFAULT_ADAPT_INCREASE
from ann2snn.compiler.observers import THRESHOLD_RULES
from ann2snn.interop.onnx import FILE_NAMES, FORMATS, write_onnx_files
from ann2snn.compiler.passes.check_supported import unsupported_reason
from ann2snn.compiler.passes.emit_neurons import NEURON_KINDS
from ann2snn.training.pruning import PRUNE_MODES, PruningSummary, prune
from ann2snn.evaluation.report import summary, write_report
from ann2snn.runtime.memory import MEBIBYTE, default_memory_limit
from ann2snn.io.saved_network import is_saved_network, load_saved
from ann2snn.workflow import save
from ann2snn.runtime.network import SpikingNetwork

PROGRAM = "ann2snn"
SNN_FILE = "snn.pt"
CONVERT_ONNX_FORMATS = ("t-step", "single-step")
DEFAULT_QBITS = 4
DEFAULT_CALIBRATION = Path("data/cifar10/subsets/train-calib-512.txt")
DEFAULT_EVALUATION = Path("data/cifar10/subsets/test-1000.txt")
DEFAULT_TRAINING = Path("data/cifar10/train")


class UsageError(Exception):
    """The command line asks for something impossible; nothing has been done yet."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors printed as one line, like every other error: argparse prints the whole
    usage first, twenty lines of options above the reason. add_subparsers makes the subcommands' parsers
    of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROGRAM}: error: {message} (`{self.prog} --help` lists the options)\n")


# ---------------------------------------------------------------------------------------------------
# Argument parsing


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _T_list(text: str) -> list[int]:
    values = sorted({_positive_int(piece) for piece in text.replace(" ", "").split(",") if piece})
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one time step count, got {text!r}")
    return values


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"expected an integer number of bits in 1..8, got {text!r}")
    return value


def _number_in(what: str, accepts: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float that `accepts` admits, else an error that says `what` was expected."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")  # refused below, with the same message
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_percentile = _number_in("a percentile in (0, 100]", lambda value: 0 < value <= 100)
_fraction = _number_in("a fraction in (0, 1)", lambda value: 0 < value < 1)
_bit_budget = _number_in("a mean number of bits per neuron in [1, 8]", lambda value: 1 <= value <= 8)
_megabytes = _number_in("a positive number of MiB", lambda value: 0 < value < float("inf"))
_adapt_increase = _number_in("a threshold increase per spike >= 0", lambda value: 0 <= value < float("inf"))
_adapt_decay = _number_in("a decay factor in [0, 1)", lambda value: 0 <= value < 1)


def _numbers(tokens: Sequence[str] | None, kind: type) -> list | None:
    """Numbers given as separate tokens or comma-separated ('3 32 32' or '3,32,32')."""
    if tokens is None:
        return None
    pieces = [piece for token in tokens for piece in token.replace(",", " ").split()]
    try:
        return [kind(piece) for piece in pieces]
    except ValueError:
        raise UsageError(f"expected {kind.__name__} values, got {' '.join(tokens)!r}") from None


def _model_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--arch", help="architecture of a plain state dict: a name from models/ or "
                                      "torchvision:<name> (default: read from the checkpoint or its file name)")
    group.add_argument("--num-classes", type=_positive_int,
                       help="number of classes (default: from the checkpoint's final layer)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow checkpoints holding pickled Python objects (can run arbitrary code)")
    group.add_argument("--mean", nargs="+", metavar="M", help="per-channel normalisation mean")
    group.add_argument("--std", nargs="+", metavar="S", help="per-channel normalisation std")
    group.add_argument("--image-size", nargs="+", metavar="N", help="model input size C,H,W (e.g. 3,32,32)")
    return parser


def _conversion_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("conversion")
    group.add_argument("--T", type=_positive_int, default=32, help="time steps the SNN simulates (default 32)")
    group.add_argument("--qbits", type=_bits, help="activation quantization bits, 1..8 (default: the bits a "
                       "fine-tuned checkpoint was trained at, else 4)")
    group.add_argument("--recalibrate", action="store_true",
                       help="calibrate thresholds even when the checkpoint has fine-tuned ones")
    group.add_argument("--neuron", choices=NEURON_KINDS, default="if",
                       help="spiking neuron model (default if: integrate-and-fire)")
    group.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default=DEFAULT_THRESHOLD_RULE,
                       help=f"how thresholds are calibrated (default {DEFAULT_THRESHOLD_RULE})")
    group.add_argument("--percentile", type=_percentile, default=99.99, help="for --threshold-rule percentile")
    group.add_argument("--per-channel", action="store_true", help="one threshold per channel")
    group.add_argument("--max-spikes-per-step", type=_positive_int, default=1)
    group.add_argument("--encoding", choices=ENCODINGS, default="direct",
                       help="how the image reaches the first layer: direct (the analog image, default), poisson "
                            "(random spikes of the pixel intensity's rate) or regular (evenly spaced spikes); "
                            "spike encodings need rate-coded neurons")
    group.add_argument("--encoding-seed", type=int, default=0, metavar="N",
                       help="seed of --encoding poisson (default 0)")
    group.add_argument("--adapt-increase", type=_adapt_increase, metavar="A",
                       help=f"--neuron adaptive: threshold increase per spike, in thresholds (default "
                            f"{DEFAULT_ADAPT_INCREASE})")
    group.add_argument("--adapt-decay", type=_adapt_decay, metavar="D",
                       help=f"--neuron adaptive: decay of the threshold increase per step (default {DEFAULT_ADAPT_DECAY})")
    group.add_argument("--calib", metavar="DATA", help=f"calibration data (default <shared>/{DEFAULT_CALIBRATION})")
    group.add_argument("--calib-size", type=_positive_int, metavar="N",
                       help="use a stratified subset of N calibration images")
    research = parser.add_argument_group("research options")
    research.add_argument("--qbits-first-last", type=_bits, metavar="BITS",
                          help="bits of the first and last activations (the others: --qbits)")
    research.add_argument("--qbits-config", type=Path, metavar="FILE",
                          help='JSON mapping of activation names, "first", "last" and "default" to bits '
                               "(`ann2snn analyze` lists the names); --qbits and --qbits-first-last override it")
    research.add_argument("--qbits-budget", type=_bit_budget, metavar="BITS",
                          help="choose each activation's bits (2..8) by its measured sensitivity so that the mean "
                               "bits per neuron stay within BITS; --qbits-first-last and --qbits-config names pin bits")
    research.add_argument("--prune", type=_fraction, metavar="FRACTION",
                          help="prune this fraction of the weights (magnitude) or of each convolution's channels "
                               "(channel) before converting")
    research.add_argument("--prune-mode", choices=PRUNE_MODES,
                          help="magnitude: global L1 over conv/linear weights (default); channel: the weakest output "
                               "channels of every convolution, with their bias and BatchNorm")
    research.add_argument("--prune-finetune-epochs", type=_positive_int, metavar="N",
                          help="fine-tune the pruned model for N epochs, pruned weights held at zero")
    research.add_argument("--prune-finetune-data", metavar="DATA",
                          help=f"labelled fine-tuning data (default <shared>/{DEFAULT_TRAINING})")
    return parser


def _run_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-size", type=_positive_int, metavar="N",
                       help="evaluate a stratified subset of N images")
    group.add_argument("--T-list", type=_T_list, metavar="T,T,...",
                       help="time steps to report accuracy at (default T/4,T/2,T,2T)")
    group.add_argument("--seed", type=int, default=0, help="seed of the stratified subsets (default 0)")
    group.add_argument("--batch-size", type=_positive_int, default=128)
    group.add_argument("--chunk-size", type=_positive_int, help="time steps simulated per batched call")
    group.add_argument("--max-memory", type=_megabytes, metavar="MiB",
                       help="memory the simulation may plan to use (default: half of what is available at the "
                            "start); fewer time steps are simulated per chunk to fit, and a batch too large to "
                            "fit fails before any simulation")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda when available, else cpu")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--force", action="store_true", help="replace an existing output directory")
    group.add_argument("--dist-timeout", type=_positive_int, metavar="SECONDS",
                       default=int(DEFAULT_TIMEOUT.total_seconds()),
                       help="under torchrun: how long a process waits for the others in a collective before "
                            f"failing (default {int(DEFAULT_TIMEOUT.total_seconds())})")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROGRAM, description="Compile trained PyTorch ANNs into spiking neural networks, and "
                                               "measure them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model, conversion, run = _model_arguments(), _conversion_arguments(), _run_arguments()

    convert_parser = commands.add_parser(
        "convert", parents=[model, conversion, run], help="convert a checkpoint and evaluate the SNN",
        description="Convert CHECKPOINT into an SNN; write snn.pt, report.json, report.md and figures to --out.")
    convert_parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    convert_parser.add_argument("--eval", metavar="DATA", help=f"evaluation data (default <shared>/{DEFAULT_EVALUATION})")
    convert_parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default <checkpoint stem>-snn)")
    convert_parser.set_defaults(handler=_convert_command)

    eval_parser = commands.add_parser(
        "eval", parents=[model, conversion, run], help="evaluate an existing conversion",
        description="Evaluate a conversion directory or snn.pt file (or convert CHECKPOINT in memory first).")
    eval_parser.add_argument("target", type=Path, metavar="DIR-or-CHECKPOINT")
    eval_parser.add_argument("--data", metavar="DATA", help=f"evaluation data (default <shared>/{DEFAULT_EVALUATION})")
    eval_parser.add_argument("--out", type=Path, metavar="DIR", help="also write the report files to DIR")
    eval_parser.set_defaults(handler=_eval_command)

    inspect_parser = commands.add_parser(
        "inspect", parents=[model], help="show what each node of the traced graph will become",
        description="Trace CHECKPOINT's model and list each node, its output shape and what the conversion makes "
                    "of it, without converting.")
    inspect_parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    inspect_parser.set_defaults(handler=_inspect_command)

    export_parser = commands.add_parser(
        "export", help="write ONNX models of a conversion",
        description="Write ONNX models of the conversion in DIR (or of an snn.pt file) beside it: "
                    + ", ".join(f"{name} ({f})" for f, name in FILE_NAMES.items()) + ".")
    export_parser.add_argument("target", type=Path, metavar="DIR-or-FILE")
    export_parser.add_argument("--format", choices=(*FORMATS, "all"), default="all",
                               help="single-step: one step, state in and out; t-step: the whole simulation in a Loop; "
                                    "qann: the quantized ANN (default all)")
    export_parser.add_argument("--T", type=_positive_int, help="time steps of the t-step model (default: the network's T)")
    export_parser.add_argument("--image-size", nargs="+", metavar="N",
                               help="model input size C,H,W (default: from the conversion's metadata)")
    export_parser.add_argument("--out", type=Path, metavar="DIR", help="write the files to DIR (default: beside snn.pt)")
    export_parser.set_defaults(handler=_export_command)

    analyze_parser = commands.add_parser(
        "analyze", parents=[model, conversion, run], help="compare each spiking layer with its ANN activation",
        description="Per layer, on --data: the ANN activation against the SNN's rate x threshold (scatter plots, "
                    "correlation), the relative error at each T, and how much of it comes from clipping, "
                    "quantization and the spiking itself. Writes analysis.json and figures to --out.")
    analyze_parser.add_argument("target", type=Path, metavar="DIR-or-CHECKPOINT")
    analyze_parser.add_argument("--data", metavar="DATA", help=f"images to analyse (default <shared>/{DEFAULT_CALIBRATION})")
    analyze_parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default <target stem>-analysis)")
    analyze_parser.set_defaults(handler=_analyze_command)
    return parser


# ---------------------------------------------------------------------------------------------------
# Shared steps


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); use --device cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def _preprocessing_overrides(args: argparse.Namespace) -> dict[str, list]:
    given = {"mean": _numbers(args.mean, float), "std": _numbers(args.std, float),
             "image_size": _numbers(args.image_size, int)}
    return {key: value for key, value in given.items() if value is not None}


def _default_T_list(T: int) -> list[int]:
    return sorted({max(1, T // 4), max(1, T // 2), T, 2 * T})


def _data_spec(given: str | None, default: Path, option: str) -> str:
    if given is not None:
        return given
    path = shared_dir() / default
    if not path.is_file():
        raise UsageError(f"no {option} given, and the default {path} does not exist; pass {option} DATA")
    return str(path)


def _open_data(spec: str, size: int | None, seed: int, preprocessing: Preprocessing) -> tuple[Dataset, dict]:
    """The data set named by `spec`, subsampled to `size` images, and its entry for the report."""
    dataset = open_dataset(spec, transform=preprocessing.transform())
    available = len(dataset)
    if size is not None and size < available:
        dataset = stratified_subset(dataset, size, seed)
    return dataset, {"spec": spec, "images": len(dataset), "available": available, "seed": seed}


def _check_model_input(model: nn.Module, dataset: Dataset, device: torch.device, labelled: bool = False) -> None:
    """Fail early, with the sizes in the message, when the model cannot take the data's images or (for
    `labelled` evaluation data) when the data has more classes than the model has outputs."""
    outputs = check_model_accepts(model, dataset[0][0].unsqueeze(0).to(device),
                                  "; set --image-size C,H,W or check the data")
    labels = known_labels(dataset) if labelled else None
    if labels and max(labels) >= outputs.shape[-1]:
        raise ValueError(f"labels out of range: the evaluation data has {max(labels) + 1} classes but the model has "
                         f"{outputs.shape[-1]} outputs; check the data, or the model's --num-classes")


def _check_output_free(out: Path | None, force: bool) -> None:
    """Fail before any work when `out` exists (unless `force`) or cannot be written."""
    # Under torchrun only the first process writes; the others' file systems do not matter.
    if not is_main_process() or out is None:
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a directory; choose another --out")
    if out.exists() and not force:
        raise UsageError(f"output directory {out} already exists; pass --force to replace it")
    # Try what _staged_directory will do at the end: make a directory beside `out`, in the nearest
    # directory that exists (the missing ones in between are made then, as they would be now).
    absolute = out.absolute()
    ancestor = next(parent for parent in absolute.parents if parent.exists())
    probe = ancestor / f".{out.name}.probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as error:
        raise UsageError(f"cannot write output directory {out}: {error.strerror} ({ancestor}); choose another "
                         "--out") from error
    probe.rmdir()


@contextmanager
def _staged_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out` that replaces `out` once everything is written into it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: the result must get the user's usual permissions, not 0700.
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            retired = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            out.rename(retired)
            try:
                staging.rename(out)
            except BaseException:  # Ctrl-C between the two renames included: put the previous output back
                retired.rename(out)
                raise
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load(args: argparse.Namespace, checkpoint: Path) -> LoadedModel:
    return load_model(checkpoint, arch=args.arch, num_classes=args.num_classes,
                      preprocessing=_preprocessing_overrides(args), trust_pickle=args.trust_pickle)


def _model_entry(checkpoint: Path, loaded: LoadedModel) -> dict[str, Any]:
    return {"checkpoint": str(checkpoint), "arch": loaded.arch, "arch_kwargs": loaded.arch_kwargs,
            "arch_source": loaded.arch_source, "preprocessing": loaded.preprocessing.to_dict()}


def _requested_bits(args: argparse.Namespace) -> dict[str, int]:
    """The bits the command line sets, as a mapping (see ann2snn.compiler.qbits): --qbits-config,
    then --qbits as 'default' and --qbits-first-last as 'first' and 'last'."""
    requested = read_qbits_config(args.qbits_config) if args.qbits_config is not None else {}
    if args.qbits is not None:
        requested["default"] = args.qbits
    if args.qbits_first_last is not None:
        requested["first"] = requested["last"] = args.qbits_first_last
    if args.qbits_budget is not None and "default" in requested:
        raise UsageError("--qbits-budget chooses the bits of every activation that --qbits-first-last or "
                         "--qbits-config names do not pin; drop --qbits (or the config's 'default')")
    return requested


def _quantization_settings(args: argparse.Namespace, loaded: LoadedModel) -> tuple[int | dict, dict | None]:
    """The bits to quantize at (one number, or a mapping per activation) and, when the checkpoint was
    fine-tuned at those bits, its thresholds."""
    fine_tuned = loaded.quantization
    requested = _requested_bits(args)
    default = requested.pop("default", None) or (fine_tuned["qbits"] if fine_tuned is not None else DEFAULT_QBITS)
    qbits = {"default": default, **requested} if requested else default
    if fine_tuned is None:
        return qbits, None
    if qbits != fine_tuned["qbits"] or args.recalibrate or args.qbits_budget is not None:
        bits = f"{qbits} bits" if isinstance(qbits, int) else "per-layer bits"
        print(f"note: the checkpoint was fine-tuned at {fine_tuned['qbits']} bits; calibrating new thresholds "
              f"at {bits} instead of using its own", file=sys.stderr)
        return qbits, None
    return qbits, fine_tuned["thresholds"]


def _pruned(args: argparse.Namespace, model: nn.Module, preprocessing: Preprocessing) -> tuple[nn.Module, PruningSummary]:
    """The model pruned (and fine-tuned) as --prune and its options ask."""
    finetune_loader = None
    if args.prune_finetune_epochs:
        if is_distributed():
            raise UsageError("--prune-finetune-epochs trains in one process: fine-tune without torchrun, or convert "
                             "a pruned checkpoint")
        spec = _data_spec(args.prune_finetune_data, DEFAULT_TRAINING, "--prune-finetune-data")
        finetune_loader = make_loader(_open_data(spec, None, args.seed, preprocessing)[0], args.batch_size,
                                      shuffle=True)
    return prune(model, args.prune, args.prune_mode or PRUNE_MODES[0], finetune_loader=finetune_loader,
                 finetune_epochs=args.prune_finetune_epochs or 0, progress=not args.no_progress and is_main_process())


def _neuron_options(args: argparse.Namespace) -> dict[str, float]:
    """The adaptive neuron's options, defaults spelled out so that the report shows them; refused for other
    neurons, which would ignore them."""
    if args.neuron != "adaptive":
        if args.adapt_increase is not None or args.adapt_decay is not None:
            raise UsageError(f"--adapt-increase and --adapt-decay are options of --neuron adaptive, not of --neuron "
                             f"{args.neuron}")
        return {}
    return {"adapt_increase": DEFAULT_ADAPT_INCREASE if args.adapt_increase is None else args.adapt_increase,
            "adapt_decay": DEFAULT_ADAPT_DECAY if args.adapt_decay is None else args.adapt_decay}


def _convert_loaded(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> tuple[SpikingNetwork, dict]:
    """Calibrate and convert a loaded model: the SNN and the calibration data's report entry. With --prune,
    `loaded.model` becomes the pruned model: the ANN the SNN is measured against and saved with."""
    if args.prune is None and (args.prune_mode or args.prune_finetune_epochs or args.prune_finetune_data):
        raise UsageError("--prune-mode, --prune-finetune-epochs and --prune-finetune-data need --prune FRACTION")
    calibration, calibration_entry = _open_data(_data_spec(args.calib, DEFAULT_CALIBRATION, "--calib"),
                                                args.calib_size, args.seed, loaded.preprocessing)
    model = loaded.model.to(device)
    _check_model_input(model, calibration, device)
    pruning = None
    if args.prune is not None:
        model, pruning = _pruned(args, model, loaded.preprocessing)
        loaded.model = model
    calibration_batches = tqdm(make_loader(shard(calibration, args.batch_size), args.batch_size), desc="calibrating",
                               unit="batch", disable=args.no_progress or not is_main_process(), leave=False)
    qbits, thresholds = _quantization_settings(args, loaded)
    allocation = None
    if args.qbits_budget is not None:
        calibration_batches = list(calibration_batches)  # read once, for the allocation and the calibration
        pinned = {key: bits for key, bits in qbits.items() if key != "default"} if isinstance(qbits, dict) else {}
        allocation = allocate_bits(model, calibration_batches, args.qbits_budget, pinned=pinned,
                                   threshold_rule=args.threshold_rule, percentile=args.percentile,
                                   per_channel=args.per_channel)
        qbits = allocation.bits
    snn = convert(model, calibration_batches, thresholds=thresholds,
                  qbits=qbits, T=args.T, neuron=args.neuron, threshold_rule=args.threshold_rule,
                  percentile=args.percentile, per_channel=args.per_channel,
                  max_spikes_per_step=args.max_spikes_per_step, chunk_size=args.chunk_size,
                  neuron_options=_neuron_options(args), encoding=args.encoding, encoding_seed=args.encoding_seed,
                  input_mean=loaded.preprocessing.mean, input_std=loaded.preprocessing.std)
    if pruning is not None:
        snn.config["pruning"] = pruning.to_json()
    if allocation is not None:
        snn.config["qbits_allocation"] = allocation.to_json()
    return snn, calibration_entry


def _evaluate_document(args: argparse.Namespace, snn: SpikingNetwork, ann: nn.Module | None,
                       evaluation: tuple[Dataset, dict], model_entry: dict, data_entries: dict) -> dict:
    """Evaluate and return the report.json document, with the model and data sections."""
    dataset, evaluation_entry = evaluation
    T_list = args.T_list or _default_T_list(snn.T)
    max_memory = (int(args.max_memory * MEBIBYTE) if args.max_memory is not None
                  else default_memory_limit(device_of(snn)))
    report = evaluate(snn, make_loader(shard(dataset, args.batch_size), args.batch_size), T_list, ann=ann,
                      chunk_size=args.chunk_size, progress=not args.no_progress and is_main_process(),
                      max_memory=max_memory)
    return {**report.to_json(), "model": model_entry, "data": {**data_entries, "evaluation": evaluation_entry}}


def _finish(document: dict, out: Path | None, written: list[str]) -> None:
    print(summary(document))
    if out is not None:
        print(f"\nWrote {out}/: {', '.join(written)}")


def _data_parallel(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Under torchrun, run `command` as one process of the group: each process calibrates and
    evaluates its shard of the data, the statistics are combined exactly, and the first process
    prints and writes the outputs (see ann2snn.distributed)."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        with process_group(_device(args.device), timedelta(seconds=args.dist_timeout)):
            return command(args)
    return run


# ---------------------------------------------------------------------------------------------------
# Commands


@_data_parallel
def _convert_command(args: argparse.Namespace) -> int:
    out = args.out or Path(f"{args.checkpoint.stem}-snn")
    _check_output_free(out, args.force)
    device = _device(args.device)
    evaluation_spec = _data_spec(args.eval, DEFAULT_EVALUATION, "--eval")
    loaded = _load(args, args.checkpoint)
    evaluation = _open_data(evaluation_spec, args.eval_size, args.seed, loaded.preprocessing)
    _check_model_input(loaded.model, evaluation[0], device_of(loaded.model), labelled=True)
    snn, calibration_entry = _convert_loaded(args, loaded, device)
    model_entry = _model_entry(args.checkpoint, loaded)
    document = _evaluate_document(args, snn, loaded.model, evaluation, model_entry,
                                  {"calibration": calibration_entry})
    if not is_main_process():
        return 0
    with _staged_directory(out) as staging:
        save(snn, staging / SNN_FILE, {"model": model_entry, "preprocessing": model_entry["preprocessing"],
                                        "config": document["config"], "data": document["data"]}, ann=loaded.model)
        # the T-step model (snn.onnx) and the single-step one share their tracing, so both come at one price
        onnx_files = write_onnx_files(snn, staging, CONVERT_ONNX_FORMATS,
                                      input_shape=tuple(loaded.preprocessing.image_size))
        files = [SNN_FILE] + [path.name for path in onnx_files] + [path.name for path in write_report(document, staging)]
    _finish(document, out, files)
    return 0


@_data_parallel
def _eval_command(args: argparse.Namespace) -> int:
    _check_output_free(args.out, args.force)
    device = _device(args.device)
    data_spec = _data_spec(args.data, DEFAULT_EVALUATION, "--data")
    saved_file = _saved_network_file(args.target)
    if is_saved_network(saved_file):
        saved = load_saved(saved_file, map_location=device)
        snn, ann = saved.snn, saved.ann
        preprocessing = _saved_preprocessing(args, saved)
        model_entry = {**saved.metadata.get("model", {}), "preprocessing": preprocessing.to_dict()}
        document = _evaluate_document(args, snn, ann, _open_data(data_spec, args.eval_size, args.seed, preprocessing),
                                      model_entry, {})
    else:
        loaded = _load(args, args.target)
        evaluation = _open_data(data_spec, args.eval_size, args.seed, loaded.preprocessing)
        _check_model_input(loaded.model, evaluation[0], device_of(loaded.model), labelled=True)
        snn, calibration_entry = _convert_loaded(args, loaded, device)
        document = _evaluate_document(args, snn, loaded.model, evaluation, _model_entry(args.target, loaded),
                                      {"calibration": calibration_entry})
    if not is_main_process():
        return 0
    files: list[str] = []
    if args.out is not None:
        with _staged_directory(args.out) as staging:
            files = [path.name for path in write_report(document, staging)]
    _finish(document, args.out, files)
    return 0


@_data_parallel
def _analyze_command(args: argparse.Namespace) -> int:
    out = args.out or Path(f"{args.target.stem}-analysis")
    _check_output_free(out, args.force)
    device = _device(args.device)
    data_spec = _data_spec(args.data, DEFAULT_CALIBRATION, "--data")
    saved_file = _saved_network_file(args.target)
    if is_saved_network(saved_file):
        saved = load_saved(saved_file, map_location=device)
        snn = saved.snn
        preprocessing = _saved_preprocessing(args, saved)
    else:
        loaded = _load(args, args.target)
        snn, _ = _convert_loaded(args, loaded, device)
        preprocessing = loaded.preprocessing
    dataset, _ = _open_data(data_spec, args.eval_size, args.seed, preprocessing)
    analysis = analyze(snn, make_loader(shard(dataset, args.batch_size), args.batch_size),
                       args.T_list or _default_T_list(snn.T), chunk_size=args.chunk_size,
                       progress=not args.no_progress and is_main_process(), seed=args.seed)
    if not is_main_process():
        return 0
    with _staged_directory(out) as staging:
        files = [path.name for path in write_analysis(analysis, staging)]
    print(analysis_summary(analysis))
    print(f"\nWrote {out}/: {', '.join(files)}")
    return 0


def _saved_preprocessing(args: argparse.Namespace, saved) -> Preprocessing:
    """The preprocessing a saved conversion recorded, with the command line's overrides."""
    return Preprocessing.from_dict({**saved.metadata.get("preprocessing", {}), **_preprocessing_overrides(args)})


def _saved_network_file(target: Path) -> Path:
    """The snn.pt of a conversion directory, or `target` itself when it is a file."""
    if not target.is_dir():
        return target
    if not (target / SNN_FILE).is_file():
        raise FileNotFoundError(f"{target} holds no {SNN_FILE}: not an ann2snn conversion directory")
    return target / SNN_FILE


def _export_command(args: argparse.Namespace) -> int:
    saved_file = _saved_network_file(args.target)
    saved = load_saved(saved_file)
    image_size = _numbers(args.image_size, int) or saved.metadata.get("preprocessing", {}).get("image_size")
    if not image_size:
        raise UsageError(f"{saved_file} records no input size; pass --image-size C,H,W")
    out = args.out or saved_file.parent
    out.mkdir(parents=True, exist_ok=True)
    formats = FORMATS if args.format == "all" else (args.format,)
    for path in write_onnx_files(saved.snn, out, formats, input_shape=tuple(image_size), T=args.T):
        print(f"Wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _becomes(gm: fx.GraphModule, node: fx.Node) -> str:
    """What the conversion makes of a supported node."""
    if node.op == "placeholder":
        return "input: analog image, fed to the first layers directly"
    if node.op == "output":
        return "output: spike counts decoded (rate: mean over T; signed: sum)"
    role = role_of(gm, node)
    if role is Role.ACTIVATION:
        return "spiking neuron layer (threshold calibrated on the QANN)"
    if role is Role.WEIGHTED:
        bias = " + bias current" if gm.get_submodule(node.target).bias is not None else ""
        return f"synapses: weights with thresholds folded in{bias}"
    if role is Role.CHANNELWISE:
        return "per-channel synapses (BatchNorm that could not be folded)"
    if role is Role.MAX_POOLING:
        return "exact spiking max pooling (on accumulated spikes)"
    if role is Role.AVG_POOLING:
        return "average pooling: fixed synapses"
    if "tensor_meta" not in node.meta:
        return "shape computation, not on spikes"
    return "linear op on spike trains, kept as is"


def _inspect_command(args: argparse.Namespace) -> int:
    loaded = _load(args, args.checkpoint)
    # The conversion's own front end, except the support check: unsupported nodes are listed, not raised.
    gm = prepare_pipeline(check_supported=False).run(loaded.model)
    input_size = loaded.preprocessing.image_size
    try:
        ShapeProp(gm).propagate(torch.zeros(1, *input_size))
    except RuntimeError as error:
        raise ValueError(f"wrong input size: the model rejects 1x{'x'.join(map(str, input_size))} inputs "
                         f"({str(error).strip().splitlines()[0]}); set --image-size C,H,W") from error
    rows, unsupported = [], 0
    for node in gm.graph.nodes:
        reason = unsupported_reason(gm, node)
        unsupported += reason is not None
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        rows.append((node.name, f"{node.op} {target_name(gm, node)}",
                     "x".join(map(str, shape)) if shape is not None else "",
                     f"UNSUPPORTED: {reason}" if reason else _becomes(gm, node)))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    print(f"{loaded.arch} ({loaded.arch_source}), input {'x'.join(map(str, input_size))}: {len(rows)} nodes")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    if unsupported:
        print(f"{PROGRAM}: error: {unsupported} node(s) cannot be converted (marked UNSUPPORTED above)",
              file=sys.stderr)
        return 1
    print("Every node is supported: the model can be converted.")
    return 0


# ---------------------------------------------------------------------------------------------------
# Entry point


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ConversionError):
        message += f" (`{PROGRAM} inspect CHECKPOINT` lists every node and what it becomes)"
    elif not isinstance(error, (ValueError, OSError, UsageError)):
        message = f"{type(error).__name__}: {message}"
    if is_distributed():
        message = f"process {rank()} of {world_size()}: {message}"
    return message


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """The library's ConversionWarnings printed like errors: one line, `ann2snn: warning: <what>`."""
    with warnings.catch_warnings():
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, ConversionWarning):
                print(f"{PROGRAM}: warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, batch schedulers, torchrun stopping a job) ends the run like Ctrl-C does: the
    staged outputs are removed and a previous output directory stays as it was."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits after --help (0) and on usage errors (2), having printed why.
        return int(exit_request.code or 0)
    try:
        with _warnings_as_lines(), _terminate_as_interrupt():
            return args.handler(args)
    except UsageError as error:
        print(f"{PROGRAM}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`ann2snn inspect ... | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # every failure becomes one line and exit code 1, as the docstring promises
        print(f"{PROGRAM}: error: {_one_line(error)}", file=sys.stderr)
        return 1
