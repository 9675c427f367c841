"""What the command line does, as library functions: the CLI parses, calls these and prints.

    conversion = ann2snn.convert_checkpoint("models/resnet20-q4.pt", calib=CALIB, eval=TEST, neuron="signed",
                                            max_spikes_per_step=2, T=16)
    conversion.report["accuracy"]; ann2snn.write_conversion("resnet20-q4-snn", conversion)

`convert_checkpoint` applies the checkpoint's policy as `ann2snn convert` does: a fine-tuned checkpoint's own
thresholds when it is converted at the bits it was fine-tuned at, pruning before conversion, bits chosen under
a budget. Under torchrun each process passes the same arguments and works on its shard of the data (see
`ann2snn.distributed`); only the first process should write the outputs."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.data import Dataset
from tqdm import tqdm

from ann2snn.compiler.convert import convert, prepare_pipeline
from ann2snn.compiler.passes import trace
from ann2snn.compiler.qbits import DEFAULT_KEY, check_qbits
from ann2snn.config import ConversionConfig, QuantizationConfig
from ann2snn.distributed import shard
from ann2snn.errors import ConversionWarning
from ann2snn.evaluation.analysis import Analysis, analyze
from ann2snn.evaluation.energy import DEFAULT_ENERGY_PRESET
from ann2snn.evaluation.evaluate import evaluate
from ann2snn.evaluation.report import write_report
from ann2snn.interop.onnx import write_onnx_files
from ann2snn.io import saved_network
from ann2snn.io.batches import check_model_accepts, device_of
from ann2snn.io.data import (
    absolute_spec,
    check_classes,
    check_image_files,
    class_names,
    known_labels,
    make_loader,
    open_dataset,
    stratified_subset,
)
from ann2snn.io.model_loading import LoadedModel, Preprocessing, load_model
from ann2snn.io.output_directory import OutputClaim, claimed_output
from ann2snn.runtime.coding import Coding
from ann2snn.runtime.memory import default_memory_limit
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neuron_kinds import NEURON_KINDS
from ann2snn.training.bit_allocation import allocate_bits
from ann2snn.training.pruning import PRUNE_MODES, PruningSummary, check_amount, prune

SNN_FILE = "snn.pt"
# the T-step model (snn.onnx) and the single-step one share their tracing, so both come at one price
CONVERSION_ONNX_FORMATS = ("t-step", "single-step")
# the neuron a checkpoint fine-tuned with quantized streams converts with by default: the one that equals its QANN
SYMMETRIC_DEFAULT_NEURON = "signed"


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Execution:
    """How the work runs, not what it computes: batches of `batch_size` (the unit of sharding under
    torchrun), stratified subsets drawn with `seed`, on `device`, simulating within `max_memory` bytes
    (default: half of what is available), and with `stop_when_quiet` (signed neurons) each batch only until
    its outputs are final. `energy_preset` names the hardware the report's memory-aware energy assumes
    (`ann2snn.evaluation.energy.ENERGY_PRESETS`)."""

    batch_size: int = 128
    seed: int = 0
    device: torch.device | str = "cpu"
    progress: bool = True
    max_memory: int | None = None
    stop_when_quiet: bool = False
    energy_preset: str = DEFAULT_ENERGY_PRESET


@dataclass(frozen=True)
class Pruning:
    """Pruning before conversion (see `ann2snn.training.pruning`): `amount` of the weights (`magnitude`) or
    of each convolution's channels (`channel`), then `finetune_epochs` of fine-tuning on `finetune_data`."""

    amount: float
    mode: str = PRUNE_MODES[0]
    finetune_epochs: int = 0
    finetune_data: str | None = None

    def __post_init__(self) -> None:
        check_amount(self.amount)
        if self.mode not in PRUNE_MODES:
            raise ValueError(f"unknown pruning mode {self.mode!r}; choose one of {PRUNE_MODES}")
        if self.finetune_epochs and self.finetune_data is None:
            raise ValueError("fine-tuning a pruned model needs labelled data: give finetune_data")


class Conversion(NamedTuple):
    """A converted checkpoint: the SNN, its report.json document (None when not evaluated), the ANN it
    came from (pruned, with pruning) and the model's preprocessing."""

    snn: SpikingNetwork
    report: dict[str, Any] | None
    ann: nn.Module
    preprocessing: Preprocessing


def open_data(spec: str, preprocessing: Preprocessing, size: int | None = None, seed: int = 0) -> tuple[Dataset, dict]:
    """The data set named by `spec` (see `ann2snn.io.data.open_dataset`), a stratified subset of `size`
    images of it, and its entry for the report (with its class names, where it has them). Every image file
    of it is decoded and checked against the model's input size once, here, before any work on it (see
    `check_image_files`)."""
    dataset = open_dataset(spec, transform=preprocessing.transform())
    available = len(dataset)
    if size is not None and size < available:
        dataset = stratified_subset(dataset, size, seed)
    elif size is not None and size > available:
        warnings.warn(f"{spec} holds {available} images, fewer than the {size} asked for: all {available} are used",
                      ConversionWarning, stacklevel=2)
    check_image_files(dataset, preprocessing.image_size, adapt=preprocessing.resize, where=spec)
    classes = class_names(dataset)
    return dataset, {"spec": absolute_spec(spec), "images": len(dataset), "available": available, "seed": seed,
                     **({"classes": classes} if classes is not None else {})}


def check_model_input(model: nn.Module, dataset: Dataset, device: torch.device | str, labelled: bool = False, *,
                      where: str = "the data", calibration_classes: Sequence[str] | None = None) -> None:
    """Fail early, with the sizes in the message, when the model cannot take the data's images or (for
    `labelled` evaluation data) when the data's classes are not the model's outputs: where the data names its
    classes, these must be one per output and those of `calibration_classes` (see `check_classes`)."""
    outputs = check_model_accepts(model, dataset[0][0].unsqueeze(0).to(device),
                                  "; set --image-size C,H,W or check the data")
    classes = class_names(dataset)
    if classes is not None:
        check_classes(where, classes, outputs.shape[-1], calibration_classes, calibration=not labelled)
        return
    labels = known_labels(dataset) if labelled else None
    if labels and max(labels) >= outputs.shape[-1]:
        raise ValueError(f"labels out of range: the evaluation data has {max(labels) + 1} classes but the model has "
                         f"{outputs.shape[-1]} outputs; check the data, or the model's --num-classes")


def model_entry(checkpoint: str | Path | None, loaded: LoadedModel) -> dict[str, Any]:
    """The report's record of the model converted: the checkpoint's absolute path (None: not named), like every
    path a report records, so that it names the file read wherever the report is read."""
    return {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None, "arch": loaded.arch,
            "arch_kwargs": loaded.arch_kwargs, "arch_source": loaded.arch_source,
            "preprocessing": loaded.preprocessing.to_dict()}


def checkpoint_config(loaded: LoadedModel, config: ConversionConfig | None = None,
                      **settings: Any) -> ConversionConfig:
    """`config` (default: the defaults, at the bits a fine-tuned checkpoint was trained at, with its streams
    quantized and signed neurons if it was fine-tuned so) with the keyword `settings` changed. A qbits mapping
    without 'default' gives the activations it does not name those same bits; spike encodings recover the
    intensity with the checkpoint's normalisation unless told otherwise."""
    fine_tuned = loaded.quantization or {}
    default_bits = fine_tuned.get("qbits") or QuantizationConfig.qbits
    qbits = settings.get("qbits")
    if isinstance(qbits, Mapping) and DEFAULT_KEY not in qbits:
        settings = {**settings, "qbits": {DEFAULT_KEY: default_bits, **qbits}}
    given = config.to_dict() if config is not None else {"qbits": default_bits}
    if config is None and fine_tuned.get("quantize_streams"):
        given |= {"quantize_streams": True, "neuron": SYMMETRIC_DEFAULT_NEURON}
    normalisation = {"input_mean": loaded.preprocessing.mean, "input_std": loaded.preprocessing.std}
    return ConversionConfig.from_dict({**normalisation, **given, **settings})


def _fine_tuned_thresholds(loaded: LoadedModel, config: ConversionConfig, *, recalibrate: bool, reallocate: bool,
                           log: Callable[[str], None]) -> dict | None:
    """The checkpoint's own thresholds when it is converted at the bits it was fine-tuned at, for the levels
    they were fine-tuned for, unless asked to calibrate anew. Thresholds chosen for T levels (rate-coded neurons,
    `threshold_levels="steps"`) are calibrated anew unless T is the fine-tuned level count: on
    `models/mobilenet_v2.pt` (4 bits, 15 levels) at T = 32 the default 0/1 recipe gave 83.7 % on test-1000 with
    the fine-tuned thresholds and 84.9 % with thresholds calibrated for 32 levels (tools/ablation.py)."""
    fine_tuned = loaded.quantization
    if fine_tuned is None:
        return None
    qbits = config.quantization.qbits
    if qbits != fine_tuned["qbits"] or recalibrate or reallocate:
        bits = f"{qbits} bits" if isinstance(qbits, int) else "per-layer bits"
        log(f"the checkpoint was fine-tuned at {fine_tuned['qbits']} bits; calibrating new thresholds at {bits} "
            "instead of using its own")
        return None
    levels = config.threshold_level_count
    trained = check_qbits(qbits) if isinstance(qbits, int) else None
    if levels is not None and levels != trained:
        log(f"thresholds are chosen for the T = {levels} levels of rate-coded neurons, the checkpoint's were "
            f"fine-tuned for {trained if trained is not None else 'per-layer'} levels: calibrating new ones "
            "(--threshold-levels bits keeps them)")
        return None
    return fine_tuned["thresholds"]


def _pruned(model: nn.Module, pruning: Pruning, preprocessing: Preprocessing,
            execution: Execution) -> tuple[nn.Module, PruningSummary]:
    finetune_loader = None
    if pruning.finetune_epochs:
        dataset, _ = open_data(pruning.finetune_data, preprocessing, seed=execution.seed)
        finetune_loader = make_loader(dataset, execution.batch_size, shuffle=True)
    return prune(model, pruning.amount, pruning.mode, finetune_loader=finetune_loader,
                 finetune_epochs=pruning.finetune_epochs, progress=execution.progress)


def convert_loaded(loaded: LoadedModel, calibration: Dataset, config: ConversionConfig, *, recalibrate: bool = False,
                   pruning: Pruning | None = None, qbits_budget: float | None = None,
                   execution: Execution = Execution(),
                   log: Callable[[str], None] = _note) -> tuple[SpikingNetwork, nn.Module]:
    """Calibrate on `calibration` and convert a loaded model as `ann2snn convert` does: the SNN and the ANN
    it reproduces (the pruned model, with `pruning`). With `qbits_budget`, the bits of the activations
    `config`'s qbits mapping does not name are chosen by sensitivity (see `allocate_bits`); the checkpoint's
    fine-tuned thresholds are used when it is converted at its own bits, unless `recalibrate`."""
    device = torch.device(execution.device)
    model = loaded.model.to(device)
    check_model_input(model, calibration, device, where="the calibration data")
    pruning_summary = None
    if pruning is not None:
        model, pruning_summary = _pruned(model, pruning, loaded.preprocessing, execution)
    batches: Iterable[Any] = tqdm(make_loader(shard(calibration, execution.batch_size), execution.batch_size),
                                  desc="calibrating", unit="batch", disable=not execution.progress, leave=False)
    thresholds = _fine_tuned_thresholds(loaded, config, recalibrate=recalibrate, reallocate=qbits_budget is not None,
                                        log=log)
    allocation = None
    if qbits_budget is not None:
        batches = list(batches)  # read once, for the allocation and the calibration
        qbits = config.quantization.qbits
        pinned = {key: bits for key, bits in qbits.items() if key != DEFAULT_KEY} if isinstance(qbits, Mapping) else {}
        allocation = allocate_bits(model, batches, qbits_budget, pinned=pinned, quantization=config.quantization)
        config = config.replace(qbits=allocation.bits)
    snn = convert(model, batches, config, thresholds=thresholds)
    if pruning_summary is not None:
        snn.config["pruning"] = pruning_summary.to_json()
    if allocation is not None:
        snn.config["qbits_allocation"] = allocation.to_json()
    return snn, model


def check_stop_when_quiet(execution: Execution, coding: Coding) -> None:
    """Before any work: stopping when quiet needs a network whose output settles."""
    if execution.stop_when_quiet and not coding.settles:
        raise ValueError(f"stop when quiet needs signed neurons (accumulate coding), not {coding.name} coding: a "
                         "rate-coded network keeps integrating its input, so a quiet step says nothing")


# Up to this T the default T list goes on to 2T, to show what more steps would give; beyond it, simulating twice
# the steps asked for costs minutes to hours per batch, and the list stops at T.
DOUBLED_T_LIMIT = 256


def default_T_list(T: int) -> list[int]:
    """The time steps a report shows by default: T/4, T/2, T, and 2T up to T = DOUBLED_T_LIMIT."""
    return sorted({max(1, T // 4), max(1, T // 2), T} | ({2 * T} if T <= DOUBLED_T_LIMIT else set()))


def evaluate_document(snn: SpikingNetwork, ann: nn.Module | None, evaluation: tuple[Dataset, dict],
                      model: dict[str, Any], data: dict[str, Any], *, T_list: Sequence[int] | None = None,
                      chunk_size: int | None = None, execution: Execution = Execution()) -> dict[str, Any]:
    """Evaluate `snn` (against `ann`) on the evaluation data set and its entry, `chunk_size` steps per
    batched call (default: the network's), and return the report.json document, with the `model` and
    `data` sections."""
    dataset, evaluation_entry = evaluation
    max_memory = execution.max_memory if execution.max_memory is not None else default_memory_limit(device_of(snn))
    report = evaluate(snn, make_loader(shard(dataset, execution.batch_size), execution.batch_size),
                      T_list or default_T_list(snn.T), ann=ann, chunk_size=chunk_size,
                      progress=execution.progress, max_memory=max_memory, stop_when_quiet=execution.stop_when_quiet,
                      energy_preset=execution.energy_preset)
    return {**report.to_json(), "model": model, "data": {**data, "evaluation": evaluation_entry}}


def convert_checkpoint(checkpoint: str | Path | LoadedModel, config: ConversionConfig | None = None, *, calib: str,
                       eval: str | None = None, calib_size: int | None = None, eval_size: int | None = None,
                       T_list: Sequence[int] | None = None, recalibrate: bool = False, pruning: Pruning | None = None,
                       qbits_budget: float | None = None, execution: Execution = Execution(),
                       source: str | Path | None = None, log: Callable[[str], None] = _note,
                       **settings: Any) -> Conversion:
    """Load a checkpoint (a path, or a `LoadedModel` from `load_model` with its options, then `source`
    names its file), convert it on the `calib` data and, with `eval` data, evaluate it: what `ann2snn
    convert` does before writing (`write_conversion`). `config` and keyword `settings` as in
    `checkpoint_config`; data specs as in `ann2snn.io.data.open_dataset`."""
    if isinstance(checkpoint, LoadedModel):
        loaded = checkpoint
    else:
        loaded, source = load_model(checkpoint), checkpoint
    config = checkpoint_config(loaded, config, **settings)
    check_stop_when_quiet(execution, NEURON_KINDS[config.neuron.kind].coding)
    calibration, calibration_entry = open_data(calib, loaded.preprocessing, calib_size, execution.seed)
    evaluation = None
    if eval is not None:
        evaluation = open_data(eval, loaded.preprocessing, eval_size, execution.seed)
        check_model_input(loaded.model, evaluation[0], device_of(loaded.model), labelled=True,
                          where=f"evaluation data {eval}", calibration_classes=calibration_entry.get("classes"))
    snn, ann = convert_loaded(loaded, calibration, config, recalibrate=recalibrate, pruning=pruning,
                              qbits_budget=qbits_budget, execution=execution, log=log)
    report = None
    if evaluation is not None:
        report = evaluate_document(snn, ann, evaluation, model_entry(source, loaded),
                                   {"calibration": calibration_entry}, T_list=T_list, execution=execution)
    return Conversion(snn, report, ann, loaded.preprocessing)


def saved_network_file(target: str | Path) -> Path:
    """The snn.pt of a conversion directory, or `target` itself when it is a file."""
    target = Path(target)
    if not target.is_dir():
        return target
    if not (target / SNN_FILE).is_file():
        raise FileNotFoundError(f"{target} holds no {SNN_FILE}: not an ann2snn conversion directory")
    return target / SNN_FILE


def is_saved_conversion(target: str | Path) -> bool:
    """Whether `target` is a conversion directory or a saved network file, intact or damaged (else: a
    checkpoint). A directory can only be a conversion: `load_conversion` says what is wrong with one."""
    target = Path(target)
    return target.is_dir() or saved_network.is_saved_network(target)


def load_conversion(target: str | Path, *, preprocessing: Mapping[str, Any] | None = None,
                    device: torch.device | str = "cpu") -> tuple[saved_network.SavedNetwork, Preprocessing]:
    """A saved conversion (directory or snn.pt) and the preprocessing it recorded, with `preprocessing`'s
    entries overriding it."""
    saved = saved_network.load_saved(saved_network_file(target), map_location=device)
    return saved, Preprocessing.from_dict({**saved.metadata.get("preprocessing", {}), **(preprocessing or {})})


def evaluate_saved(target: str | Path, data: str, *, eval_size: int | None = None, T_list: Sequence[int] | None = None,
                   chunk_size: int | None = None, preprocessing: Mapping[str, Any] | None = None,
                   execution: Execution = Execution()) -> dict[str, Any]:
    """The report.json document of a saved conversion evaluated on `data` (see `evaluate_document`)."""
    saved, resolved = load_conversion(target, preprocessing=preprocessing, device=execution.device)
    check_stop_when_quiet(execution, saved.snn.coding)
    model = {**saved.metadata.get("model", {}), "preprocessing": resolved.to_dict()}
    evaluation = open_data(data, resolved, eval_size, execution.seed)
    reference = next(network for network in (saved.ann, saved.snn.qann, saved.snn) if network is not None)
    check_model_input(reference, evaluation[0], execution.device, labelled=True, where=f"evaluation data {data}",
                      calibration_classes=saved.metadata.get("data", {}).get("calibration", {}).get("classes"))
    return evaluate_document(saved.snn, saved.ann, evaluation, model, {}, T_list=T_list, chunk_size=chunk_size,
                             execution=execution)


def analyze_network(snn: SpikingNetwork, data: str, preprocessing: Preprocessing, *, size: int | None = None,
                    T_list: Sequence[int] | None = None, chunk_size: int | None = None,
                    execution: Execution = Execution()) -> Analysis:
    """`ann2snn.evaluation.analysis.analyze` of `snn` on the images of `data`, `chunk_size` steps per batched
    call (default: the network's)."""
    dataset, _ = open_data(data, preprocessing, size, execution.seed)
    return analyze(snn, make_loader(shard(dataset, execution.batch_size), execution.batch_size),
                   T_list or default_T_list(snn.T), chunk_size=chunk_size, progress=execution.progress,
                   seed=execution.seed)


def save(snn: SpikingNetwork, path: str | Path, metadata: dict[str, Any] | None = None, *,
         ann: nn.Module | None = None) -> Path:
    """Save `snn` (with its QANN), and optionally the `ann` it was converted from (stored as its torch.fx
    trace, so that reloading needs no model code), to `path`; see `ann2snn.io.saved_network.save`."""
    if not isinstance(snn, SpikingNetwork):
        raise TypeError(f"expected a SpikingNetwork, got {type(snn).__name__}")
    return saved_network.save(snn, path, metadata, ann=trace(ann) if ann is not None else None)


def write_conversion(out: str | Path | OutputClaim, conversion: Conversion, *, force: bool = False) -> list[str]:
    """Write an evaluated conversion to the directory `out`: snn.pt, the ONNX models, report.json, report.md
    and the figures. Returns the names of the files written. An existing `out` is replaced whole, only with
    `force` and only if ann2snn wrote it (see `ann2snn.io.output_directory`). `out` may also be a claim taken
    before the work (`claimed_output`), as `ann2snn convert` does."""
    snn, report, ann, preprocessing = conversion
    if report is None:
        raise ValueError("the conversion was not evaluated: convert_checkpoint(..., eval=DATA) writes a report")
    if not isinstance(out, OutputClaim):
        with claimed_output(out, force=force, written_by="ann2snn.write_conversion") as claim:
            return write_conversion(claim, conversion)
    staging = out.directory
    save(snn, staging / SNN_FILE, {"model": report["model"], "preprocessing": report["model"]["preprocessing"],
                                    "config": report["config"], "data": report["data"]}, ann=ann)
    onnx_files = write_onnx_files(snn, staging, CONVERSION_ONNX_FORMATS, input_shape=tuple(preprocessing.image_size))
    files = [SNN_FILE] + [path.name for path in onnx_files] + [path.name for path in write_report(report, staging)]
    out.commit()
    return files


def traced_for_inspection(loaded: LoadedModel) -> fx.GraphModule:
    """The conversion's own front end, except the support check (`ann2snn inspect` lists unsupported nodes
    instead of refusing them), with every node's output shape for one input of the model's size."""
    gm = prepare_pipeline(check_supported=False).run(loaded.model)
    input_size = loaded.preprocessing.image_size
    try:
        ShapeProp(gm).propagate(torch.zeros(1, *input_size))
    except RuntimeError as error:
        raise ValueError(f"wrong input size: the model rejects 1x{'x'.join(map(str, input_size))} inputs "
                         f"({str(error).strip().splitlines()[0]}); set --image-size C,H,W") from error
    return gm
