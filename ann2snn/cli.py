"""The `ann2snn` command line: convert, eval and inspect.

    ann2snn convert CHECKPOINT --T 32 --qbits 4 [--calib DATA] [--eval DATA] [--T-list 8,16,32,64] ...
    ann2snn eval DIR-or-FILE --data DATA [--T-list ...] [--out DIR]
    ann2snn inspect CHECKPOINT

Exit codes: 0 on success, 1 when the work fails (unconvertible model, unreadable checkpoint, missing
data, ...), 2 for usage errors; errors are printed as one line `ann2snn: error: <reason>`."""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.data import Dataset
from tqdm import tqdm

from .api import DEFAULT_THRESHOLD_RULE, convert, prepare_pipeline
from .data import make_loader, open_dataset, shared_dir, stratified_subset
from .errors import ConversionError, target_name
from .evaluate import evaluate
from .layers import AVG_POOLS, MAX_POOLS, WEIGHTED, ChannelAffine, ClippedReLU
from .model_loading import LoadedModel, Preprocessing, load_model
from .observers import THRESHOLD_RULES
from .passes.check_supported import unsupported_reason
from .passes.emit_neurons import NEURON_KINDS
from .pipeline import Pipeline
from .report import summary, write_report
from .serialization import is_saved_network, load_saved, save
from .snn import SpikingNetwork

PROGRAM = "ann2snn"
SNN_FILE = "snn.pt"
DEFAULT_CALIBRATION = Path("data/cifar10/subsets/train-calib-512.txt")
DEFAULT_EVALUATION = Path("data/cifar10/subsets/test-1000.txt")
_MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                       F.adaptive_avg_pool3d}


class UsageError(Exception):
    """The command line asks for something impossible; nothing has been done yet."""


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
    return sorted({_positive_int(piece) for piece in text.replace(" ", "").split(",") if piece})


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
    group.add_argument("--qbits", type=int, default=4, help="activation quantization bits, 1..8 (default 4)")
    group.add_argument("--neuron", choices=NEURON_KINDS, default="if",
                       help="spiking neuron model (default if: integrate-and-fire)")
    group.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default=DEFAULT_THRESHOLD_RULE,
                       help=f"how thresholds are calibrated (default {DEFAULT_THRESHOLD_RULE})")
    group.add_argument("--percentile", type=float, default=99.99, help="for --threshold-rule percentile")
    group.add_argument("--per-channel", action="store_true", help="one threshold per channel")
    group.add_argument("--max-spikes-per-step", type=_positive_int, default=1)
    group.add_argument("--calib", metavar="DATA", help=f"calibration data (default <shared>/{DEFAULT_CALIBRATION})")
    group.add_argument("--calib-size", type=_positive_int, metavar="N",
                       help="use a stratified subset of N calibration images")
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
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda when available, else cpu")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--force", action="store_true", help="replace an existing output directory")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="Compile trained PyTorch ANNs into spiking "
                                     "neural networks, and measure them.")
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


def _check_model_input(model: nn.Module, dataset: Dataset, device: torch.device) -> None:
    """Fail early, with the sizes in the message, when the model cannot take the data's images."""
    image = dataset[0][0]
    try:
        with torch.no_grad():
            model(image.unsqueeze(0).to(device))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"wrong input size: the model rejects {'x'.join(map(str, image.shape))} inputs ({reason}); "
                         "set --image-size C,H,W or check the data") from error


def _check_output_free(out: Path | None, force: bool) -> None:
    if out is not None and out.exists() and not force:
        raise UsageError(f"output directory {out} already exists; pass --force to replace it")


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
            staging.rename(out)
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


def _convert_loaded(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> tuple[SpikingNetwork, dict]:
    """Calibrate and convert a loaded model: the SNN and the calibration data's report entry."""
    calibration, calibration_entry = _open_data(_data_spec(args.calib, DEFAULT_CALIBRATION, "--calib"),
                                                args.calib_size, args.seed, loaded.preprocessing)
    model = loaded.model.to(device)
    _check_model_input(model, calibration, device)
    calibration_batches = tqdm(make_loader(calibration, args.batch_size), desc="calibrating", unit="batch",
                               disable=args.no_progress, leave=False)
    snn = convert(model, calibration_batches,
                  qbits=args.qbits, T=args.T, neuron=args.neuron, threshold_rule=args.threshold_rule,
                  percentile=args.percentile, per_channel=args.per_channel,
                  max_spikes_per_step=args.max_spikes_per_step, chunk_size=args.chunk_size)
    return snn, calibration_entry


def _evaluate_document(args: argparse.Namespace, snn: SpikingNetwork, ann: nn.Module | None,
                       evaluation: tuple[Dataset, dict], model_entry: dict, data_entries: dict) -> dict:
    """Evaluate and return the report.json document, with the model and data sections."""
    dataset, evaluation_entry = evaluation
    T_list = args.T_list or _default_T_list(snn.T)
    report = evaluate(snn, make_loader(dataset, args.batch_size), T_list, ann=ann, chunk_size=args.chunk_size,
                      progress=not args.no_progress)
    return {**report.to_json(), "model": model_entry, "data": {**data_entries, "evaluation": evaluation_entry}}


def _finish(document: dict, out: Path | None, written: list[str]) -> None:
    print(summary(document))
    if out is not None:
        print(f"\nWrote {out}/: {', '.join(written)}")


# ---------------------------------------------------------------------------------------------------
# Commands


def _convert_command(args: argparse.Namespace) -> int:
    out = args.out or Path(f"{args.checkpoint.stem}-snn")
    _check_output_free(out, args.force)
    device = _device(args.device)
    evaluation_spec = _data_spec(args.eval, DEFAULT_EVALUATION, "--eval")
    loaded = _load(args, args.checkpoint)
    evaluation = _open_data(evaluation_spec, args.eval_size, args.seed, loaded.preprocessing)
    snn, calibration_entry = _convert_loaded(args, loaded, device)
    model_entry = _model_entry(args.checkpoint, loaded)
    document = _evaluate_document(args, snn, loaded.model, evaluation, model_entry,
                                  {"calibration": calibration_entry})
    with _staged_directory(out) as staging:
        save(snn, staging / SNN_FILE, {"model": model_entry, "preprocessing": model_entry["preprocessing"],
                                        "config": document["config"]}, ann=loaded.model)
        files = [SNN_FILE] + [path.name for path in write_report(document, staging)]
    _finish(document, out, files)
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    _check_output_free(args.out, args.force)
    device = _device(args.device)
    data_spec = _data_spec(args.data, DEFAULT_EVALUATION, "--data")
    saved_file = args.target / SNN_FILE if args.target.is_dir() else args.target
    if args.target.is_dir() and not saved_file.is_file():
        raise FileNotFoundError(f"{args.target} holds no {SNN_FILE}: not an ann2snn conversion directory")
    if is_saved_network(saved_file):
        saved = load_saved(saved_file, map_location=device)
        snn, ann = saved.snn, saved.ann
        settings = {**saved.metadata.get("preprocessing", {}), **_preprocessing_overrides(args)}
        preprocessing = Preprocessing.from_dict(settings)
        model_entry = {**saved.metadata.get("model", {}), "preprocessing": preprocessing.to_dict()}
        document = _evaluate_document(args, snn, ann, _open_data(data_spec, args.eval_size, args.seed, preprocessing),
                                      model_entry, {})
    else:
        loaded = _load(args, args.target)
        evaluation = _open_data(data_spec, args.eval_size, args.seed, loaded.preprocessing)
        snn, calibration_entry = _convert_loaded(args, loaded, device)
        document = _evaluate_document(args, snn, loaded.model, evaluation, _model_entry(args.target, loaded),
                                      {"calibration": calibration_entry})
    files: list[str] = []
    if args.out is not None:
        with _staged_directory(args.out) as staging:
            files = [path.name for path in write_report(document, staging)]
    _finish(document, args.out, files)
    return 0


def _becomes(gm: fx.GraphModule, node: fx.Node) -> str:
    """What the conversion makes of a supported node."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if node.op == "placeholder":
        return "input: analog image, fed to the first layers directly"
    if node.op == "output":
        return "output: spike counts decoded (rate: mean over T; signed: sum)"
    if isinstance(module, ClippedReLU):
        return "spiking neuron layer (threshold calibrated on the QANN)"
    if isinstance(module, WEIGHTED):
        bias = " + bias current" if module.bias is not None else ""
        return f"synapses: weights with thresholds folded in{bias}"
    if isinstance(module, ChannelAffine):
        return "per-channel synapses (BatchNorm that could not be folded)"
    if isinstance(module, MAX_POOLS) or (node.op == "call_function" and node.target in _MAX_POOL_FUNCTIONS):
        return "exact spiking max pooling (on accumulated spikes)"
    if isinstance(module, AVG_POOLS) or (node.op == "call_function" and node.target in _AVG_POOL_FUNCTIONS):
        return "average pooling: fixed synapses"
    if "tensor_meta" not in node.meta:
        return "shape computation, not on spikes"
    return "linear op on spike trains, kept as is"


def _inspect_command(args: argparse.Namespace) -> int:
    loaded = _load(args, args.checkpoint)
    # The conversion's own front end, except the support check: unsupported nodes are listed, not raised.
    gm = Pipeline([step for step in prepare_pipeline().passes if step[0] != "check_supported"]).run(loaded.model)
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
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits after --help (0) and on usage errors (2), having printed why.
        return int(exit_request.code or 0)
    try:
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
