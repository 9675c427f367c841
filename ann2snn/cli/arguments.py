"""The argument definitions the commands share, and what they turn into: the conversion settings, the data
to read, the run options. Conversion options default to None (not given), so that the defaults stay those
of `ann2snn.config` and a command can tell which options were given."""
from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ann2snn.cli import vocabulary
from ann2snn.cli.vocabulary import ADAPTIVE, ADAPTIVE_OPTIONS, config_default

# The definitions import nothing that imports torch (see ann2snn.cli.vocabulary): `--help` answers at once.
# What the arguments mean is worked out by functions that import the library when they run.
if TYPE_CHECKING:
    import torch

    from ann2snn.io.model_loading import LoadedModel
    from ann2snn.io.output_directory import OutputClaim
    from ann2snn.workflow import Conversion, Execution, Pruning

PROGRAM = "ann2snn"
DEFAULT_CALIBRATION = Path("data/cifar10/subsets/train-calib-512.txt")
DEFAULT_EVALUATION = Path("data/cifar10/subsets/test-1000.txt")
DEFAULT_TRAINING = Path("data/cifar10/train")


class UsageError(Exception):
    """The command line asks for something impossible; nothing has been done yet."""


@contextmanager
def options_refused_as_usage() -> Iterator[None]:
    """While the options are checked, before any work: a value the library refuses (a ValueError, e.g. from
    building the configuration) is a usage error like argparse's own (exit 2), not a failed run (exit 1)."""
    try:
        yield
    except ValueError as error:
        raise UsageError(str(error)) from None


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors printed as one line, like every other error: argparse prints the whole
    usage first, twenty lines of options above the reason. Options are never abbreviated (`--eval` must not
    be taken for `--eval-size`). add_subparsers makes the subcommands' parsers of the same class."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROGRAM}: error: {message} (`{self.prog} --help` lists the options)\n")


def _parents() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False, allow_abbrev=False)


# ---------------------------------------------------------------------------------------------------
# Value types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _T_list(text: str) -> list[int]:
    """Time step counts separated by commas or spaces ('8,16,32' or '8 16 32'; "4 8" is not 48)."""
    values = sorted({positive_int(piece) for piece in text.replace(",", " ").split()})
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
_delay_fraction = _number_in("a fraction in [0, 1)", lambda value: 0 <= value < 1)
_fraction = _number_in("a fraction in (0, 1)", lambda value: 0 < value < 1)
_bit_budget = _number_in("a mean number of bits per neuron in [1, 8]", lambda value: 1 <= value <= 8)
_megabytes = _number_in("a positive number of MiB", lambda value: 0 < value < float("inf"))
_adapt_increase = _number_in("a threshold increase per spike >= 0", lambda value: 0 <= value < float("inf"))
_adapt_decay = _number_in("a decay factor in [0, 1)", lambda value: 0 <= value < 1)


def numbers(tokens: Sequence[str] | None, kind: type) -> list | None:
    """Numbers given as separate tokens or comma-separated ('3 32 32' or '3,32,32')."""
    if tokens is None:
        return None
    pieces = [piece for token in tokens for piece in token.replace(",", " ").split()]
    try:
        return [kind(piece) for piece in pieces]
    except ValueError:
        raise UsageError(f"expected {kind.__name__} values, got {' '.join(tokens)!r}") from None


# ---------------------------------------------------------------------------------------------------
# Argument groups

def model_arguments() -> argparse.ArgumentParser:
    parser = _parents()
    group = parser.add_argument_group("model")
    group.add_argument("--arch", help="architecture of a plain state dict: a name from the model zoo or "
                                      "torchvision:<name> (default: read from the checkpoint or its file name)")
    group.add_argument("--num-classes", type=positive_int,
                       help="number of classes (default: from the checkpoint's final layer)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow checkpoints holding pickled Python objects (can run arbitrary code)")
    group.add_argument("--mean", nargs="+", metavar="M", help="per-channel normalisation mean")
    group.add_argument("--std", nargs="+", metavar="S", help="per-channel normalisation std")
    group.add_argument("--image-size", nargs="+", metavar="N", help="model input size C,H,W (e.g. 3,32,32)")
    group.add_argument("--resize", action="store_true", default=None,
                       help="resize images of another size to the model's (stretching non-square ones) and convert "
                            "grayscale and colour to its channels, with a warning (default: such images are refused)")
    return parser


def conversion_arguments() -> argparse.ArgumentParser:
    """The options of a conversion; every default is None here (see the module docstring)."""
    parser = _parents()
    group = parser.add_argument_group("conversion")
    group.add_argument("--T", type=positive_int, help="time steps the SNN simulates (default "
                            f"{config_default('SimulationConfig', 'T')})")
    group.add_argument("--qbits", type=_bits, help="activation quantization bits, 1..8 (default: the bits a "
                       f"fine-tuned checkpoint was trained at, else {config_default('QuantizationConfig', 'qbits')})")
    group.add_argument("--recalibrate", action="store_true", default=None,
                       help="calibrate thresholds even when the checkpoint has fine-tuned ones")
    group.add_argument("--neuron", choices=vocabulary.NEURON_KINDS,
                       help=f"spiking neuron model (default {config_default('NeuronConfig', 'kind')}: "
                            "integrate-and-fire)")
    group.add_argument("--threshold-rule", choices=vocabulary.THRESHOLD_RULES,
                       help="how thresholds are calibrated (default "
                            f"{config_default('QuantizationConfig', 'threshold_rule')})")
    group.add_argument("--percentile", type=_percentile,
                       help="for --threshold-rule percentile (default "
                            f"{config_default('QuantizationConfig', 'percentile')})")
    group.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                       help="one threshold per channel, or per layer (--no-per-channel); default: per channel "
                            "where thresholds are chosen for T steps (see --threshold-levels), per layer otherwise")
    group.add_argument("--reconstruction", choices=vocabulary.RECONSTRUCTIONS,
                       help="after threshold calibration, fit the weights and biases of each block of the QANN to "
                            "the float ANN's block output on the calibration images and their mirror images "
                            "(weights: 2-7 minutes for a CIFAR ResNet-20 to ResNet-56 on one busy CPU core), or "
                            "not (none); "
                            f"default {config_default('QuantizationConfig', 'reconstruction')}")
    group.add_argument("--quantize-streams", action="store_true", default=None,
                       help="also quantize, symmetrically, the linear values convolutions read (MobileNetV2's "
                            "bottleneck outputs and residual stream), so that every synaptic layer after the "
                            "first is spike-driven; needs --neuron signed or signed-rate (a checkpoint fine-tuned "
                            "so sets it, and signed neurons, itself)")
    group.add_argument("--threshold-levels", choices=vocabulary.THRESHOLD_LEVELS,
                       help="rate-coded neurons: choose thresholds for the T levels a neuron resolves in T steps "
                            "(steps) or for the QANN's 2**qbits - 1 (bits); default "
                            f"{config_default('SpikingCalibrationConfig', 'threshold_levels')}")
    group.add_argument("--snn-calibration", choices=vocabulary.SPIKING_CALIBRATIONS,
                       help="rate-coded neurons: after conversion, correct each layer's bias so that its mean "
                            "firing rate matches the ANN's activation, layer by layer (bias), refit each layer's "
                            "weights to the rates the SNN gives it first (weights), or neither (none); default: "
                            "the neuron's, weights for if, bias for lif, adaptive and signed-rate")
    group.add_argument("--readout-delay", type=_delay_fraction, metavar="F",
                       help="rate-coded neurons: leave the first F x T steps out of the output's average, while "
                            "the layers settle (0 averages all; default: the neuron's, 0.5 for if, lif and "
                            "adaptive, 0 for signed-rate)")
    group.add_argument("--snn-calibration-images", type=positive_int, metavar="N",
                       help=f"calibration images the SNN calibration simulates (default "
                            f"{config_default('SpikingCalibrationConfig', 'images')})")
    group.add_argument("--max-spikes-per-step", type=positive_int,
                       help="bursts of up to N spikes per step (default "
                            f"{config_default('NeuronConfig', 'max_spikes_per_step')})")
    group.add_argument("--encoding", choices=vocabulary.ENCODINGS,
                       help="how the image reaches the first layer: direct (the analog image, default), poisson "
                            "(random spikes of the pixel intensity's rate) or regular (evenly spaced spikes); "
                            "spike encodings need rate-coded neurons")
    group.add_argument("--encoding-seed", type=int, metavar="N",
                       help=f"seed of --encoding poisson (default {config_default('EncodingConfig', 'seed')})")
    group.add_argument("--adapt-increase", type=_adapt_increase, metavar="A",
                       help="--neuron adaptive: threshold increase per spike, in thresholds (default "
                            f"{ADAPTIVE_OPTIONS['adapt_increase']})")
    group.add_argument("--adapt-decay", type=_adapt_decay, metavar="D",
                       help="--neuron adaptive: decay of the threshold increase per step (default "
                            f"{ADAPTIVE_OPTIONS['adapt_decay']})")
    group.add_argument("--calib", metavar="DATA", help=f"calibration data (default <shared>/{DEFAULT_CALIBRATION})")
    group.add_argument("--calib-size", type=positive_int, metavar="N",
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
    research.add_argument("--prune-mode", choices=vocabulary.PRUNE_MODES,
                          help="magnitude: global L1 over conv/linear weights (default); channel: the weakest output "
                               "channels of every convolution, with their bias and BatchNorm")
    research.add_argument("--prune-finetune-epochs", type=positive_int, metavar="N",
                          help="fine-tune the pruned model for N epochs, pruned weights held at zero")
    research.add_argument("--prune-finetune-data", metavar="DATA",
                          help=f"labelled fine-tuning data (default <shared>/{DEFAULT_TRAINING})")
    return parser


# The conversion options by destination, for refusing them where a network is converted already.
CONVERSION_OPTIONS = {dest: "--" + dest.replace("_", "-") for dest in vars(conversion_arguments().parse_args([]))}


def run_arguments() -> argparse.ArgumentParser:
    parser = _parents()
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-size", type=positive_int, metavar="N",
                       help="evaluate a stratified subset of N images")
    group.add_argument("--T-list", type=_T_list, metavar="T,T,...",
                       help="time steps to report accuracy at (default T/4,T/2,T,2T)")
    group.add_argument("--seed", type=int, default=0, help="seed of the stratified subsets (default 0)")
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--chunk-size", type=positive_int, help="time steps simulated per batched call")
    group.add_argument("--max-memory", type=_megabytes, metavar="MiB",
                       help="memory the simulation may plan to use (default: half of what is available at the "
                            "start); fewer time steps are simulated per chunk to fit, and a batch too large to "
                            "fit fails before any simulation")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda when available, else cpu")
    group.add_argument("--stop-when-quiet", action="store_true",
                       help="signed neurons: simulate each batch only until no neuron fires (its outputs are "
                            "final); the report gives the steps per image")
    group.add_argument("--energy-preset", choices=vocabulary.ENERGY_PRESETS, default=vocabulary.DEFAULT_ENERGY_PRESET,
                       help="the hardware the report's memory-aware energy assumes: operation costs, bit widths and "
                            f"memory access costs (default {vocabulary.DEFAULT_ENERGY_PRESET})")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--force", action="store_true",
                       help="replace an existing output directory that ann2snn wrote (its .ann2snn-output marker "
                            "lists every file in it); any other directory is refused")
    group.add_argument("--dist-timeout", type=positive_int, metavar="SECONDS",
                       default=int(vocabulary.DEFAULT_DIST_TIMEOUT.total_seconds()),
                       help="under torchrun: how long a process waits for the others in a collective before "
                            f"failing (default {int(vocabulary.DEFAULT_DIST_TIMEOUT.total_seconds())})")
    return parser


def add_data_argument(parser: argparse.ArgumentParser, default: Path, what: str) -> None:
    parser.add_argument("--data", metavar="DATA", help=f"{what} (default <shared>/{default})")


# ---------------------------------------------------------------------------------------------------
# What the arguments mean


def device(choice: str) -> torch.device:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); use --device cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def data_parallel(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Under torchrun, run `command` as one process of the group: each process calibrates and
    evaluates its shard of the data, the statistics are combined exactly, and the first process
    prints and writes the outputs (see ann2snn.distributed)."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from ann2snn.distributed import process_group

        with process_group(device(args.device), timedelta(seconds=args.dist_timeout)):
            return command(args)
    return run


def execution(args: argparse.Namespace) -> Execution:
    from ann2snn.distributed import is_main_process
    from ann2snn.runtime.memory import MEBIBYTE
    from ann2snn.workflow import Execution

    return Execution(batch_size=args.batch_size, seed=args.seed, device=device(args.device),
                     progress=not args.no_progress and is_main_process(), stop_when_quiet=args.stop_when_quiet,
                     energy_preset=args.energy_preset,
                     max_memory=int(args.max_memory * MEBIBYTE) if args.max_memory is not None else None)


def preprocessing_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {"mean": numbers(args.mean, float), "std": numbers(args.std, float),
             "image_size": numbers(args.image_size, int), "resize": args.resize}
    return {key: value for key, value in given.items() if value is not None}


def data_spec(given: str | None, default: Path, option: str) -> str:
    from ann2snn.io.data import shared_dir

    if given is not None:
        return given
    path = shared_dir() / default
    if not path.is_file():
        raise UsageError(f"no {option} given, and the default {path} does not exist; pass {option} DATA")
    return str(path)


def load(args: argparse.Namespace, checkpoint: Path) -> LoadedModel:
    from ann2snn.io.model_loading import load_model

    return load_model(checkpoint, arch=args.arch, num_classes=args.num_classes,
                      preprocessing=preprocessing_overrides(args), trust_pickle=args.trust_pickle)


@contextmanager
def output_claim(out: Path | None, force: bool, command: str, reads: Path) -> Iterator[OutputClaim | None]:
    """The output directory `out` claimed before any work (see ann2snn.io.output_directory), or a usage error
    that says why it cannot be; None when there is no `out`. `reads` is what the command reads, which the
    output must not hold."""
    from ann2snn.distributed import is_main_process
    from ann2snn.io.output_directory import OutputRefused, claimed_output

    # Under torchrun only the first process writes; the others' file systems do not matter.
    if out is None or not is_main_process():
        yield None
        return
    with ExitStack() as stack:
        try:
            claim = stack.enter_context(claimed_output(out, force=force, written_by=f"{PROGRAM} {command}",
                                                       inputs=[reads]))
        except OutputRefused as error:
            raise UsageError(str(error)) from error
        yield claim


def refuse_conversion_options(args: argparse.Namespace, target: Path) -> None:
    """A saved network is converted already: conversion options cannot apply to it."""
    given = [flag for dest, flag in CONVERSION_OPTIONS.items() if getattr(args, dest) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: conversion option{'s' * (len(given) > 1)}, but {target} is a saved "
                         "network, converted already; convert its checkpoint again to change them")


def _requested_bits(args: argparse.Namespace) -> int | dict[str, int] | None:
    """The bits the command line sets (see ann2snn.compiler.qbits): --qbits-config, then --qbits as
    'default' and --qbits-first-last as 'first' and 'last'; None when it sets none."""
    from ann2snn.training.bit_allocation import read_qbits_config

    requested = read_qbits_config(args.qbits_config) if args.qbits_config is not None else {}
    if args.qbits is not None:
        requested["default"] = args.qbits
    if args.qbits_first_last is not None:
        requested["first"] = requested["last"] = args.qbits_first_last
    if args.qbits_budget is not None and "default" in requested:
        raise UsageError("--qbits-budget chooses the bits of every activation that --qbits-first-last or "
                         "--qbits-config names do not pin; drop --qbits (or the config's 'default')")
    if set(requested) == {"default"}:
        return requested["default"]
    return requested or None


def _neuron_options(args: argparse.Namespace) -> dict[str, float] | None:
    """The adaptive neuron's options, defaults spelled out so that the report shows them; refused for other
    neurons, which would ignore them."""
    kind = args.neuron or config_default("NeuronConfig", "kind")
    if kind != ADAPTIVE:
        if args.adapt_increase is not None or args.adapt_decay is not None:
            raise UsageError(f"--adapt-increase and --adapt-decay are options of --neuron adaptive, not of --neuron "
                             f"{kind}")
        return None
    given = {"adapt_increase": args.adapt_increase, "adapt_decay": args.adapt_decay}
    return {**ADAPTIVE_OPTIONS, **{key: value for key, value in given.items() if value is not None}}


def conversion_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The conversion settings the command line gives, as `ann2snn.config` records name them (the others keep
    their defaults); checked here, before any work, by building the configuration they describe."""
    from ann2snn.config import ConversionConfig

    with options_refused_as_usage():
        given = {"qbits": _requested_bits(args), "T": args.T, "chunk_size": args.chunk_size, "neuron": args.neuron,
                 "max_spikes_per_step": args.max_spikes_per_step, "neuron_options": _neuron_options(args),
                 "threshold_rule": args.threshold_rule, "percentile": args.percentile,
                 "per_channel": args.per_channel, "reconstruction": args.reconstruction,
                 "quantize_streams": args.quantize_streams, "encoding": args.encoding,
                 "encoding_seed": args.encoding_seed,
                 "threshold_levels": args.threshold_levels, "snn_calibration": args.snn_calibration,
                 "snn_calibration_images": args.snn_calibration_images, "readout_delay": args.readout_delay}
        settings = {key: value for key, value in given.items() if value is not None}
        ConversionConfig.from_dict(settings)
    return settings


def pruning(args: argparse.Namespace) -> Pruning | None:
    from ann2snn.distributed import is_distributed
    from ann2snn.workflow import Pruning

    if args.prune is None:
        if args.prune_mode or args.prune_finetune_epochs or args.prune_finetune_data:
            raise UsageError("--prune-mode, --prune-finetune-epochs and --prune-finetune-data need --prune FRACTION")
        return None
    finetune_data = None
    if args.prune_finetune_epochs:
        if is_distributed():
            raise UsageError("--prune-finetune-epochs trains in one process: fine-tune without torchrun, or convert "
                             "a pruned checkpoint")
        finetune_data = data_spec(args.prune_finetune_data, DEFAULT_TRAINING, "--prune-finetune-data")
    return Pruning(args.prune, args.prune_mode or vocabulary.PRUNE_MODES[0], args.prune_finetune_epochs or 0,
                   finetune_data)


def requested_conversion(args: argparse.Namespace, checkpoint: Path, evaluate: bool = True) -> Conversion:
    """The conversion of `checkpoint` the arguments ask for, evaluated on --data unless not `evaluate`."""
    from ann2snn.runtime.neuron_kinds import NEURON_KINDS
    from ann2snn.workflow import check_stop_when_quiet, convert_checkpoint

    settings = conversion_settings(args)
    requested_pruning = pruning(args)
    run = execution(args)
    # before the model is loaded: the neuron kind is the command line's (a checkpoint sets only its bits)
    kind = settings.get("neuron", config_default("NeuronConfig", "kind"))
    with options_refused_as_usage():
        check_stop_when_quiet(run, NEURON_KINDS[kind].coding)
    data = data_spec(args.data, DEFAULT_EVALUATION, "--data") if evaluate else None
    calib = data_spec(args.calib, DEFAULT_CALIBRATION, "--calib")
    return convert_checkpoint(load(args, checkpoint), source=checkpoint, calib=calib, eval=data,
                              calib_size=args.calib_size, eval_size=args.eval_size, T_list=args.T_list,
                              recalibrate=bool(args.recalibrate), pruning=requested_pruning,
                              qbits_budget=args.qbits_budget, execution=run, **settings)
