"""The evaluator: one pass over labelled data measuring the ANN, the QANN and the SNN side by side.

Every batch runs through the ANN, the QANN and one SNN simulation up to max(T_list); the outputs
at every T of the list come from that single simulation. Alongside accuracy it records spikes per
layer, the neurons that never fired, synaptic operations and two energy estimates: operations only (see
`ann2snn.evaluation.synops` for how operations are counted) and memory-aware (`ann2snn.evaluation.energy`)."""
from __future__ import annotations

import itertools
import platform
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ann2snn.distributed import reduce_over_processes, require_on_every_process, world_size
from ann2snn.errors import ConversionWarning
from ann2snn.evaluation.energy import (
    DEFAULT_ENERGY_PRESET,
    NetworkTraffic,
    NeuronTraffic,
    check_energy_preset,
    layer_traffic,
    memory_energy,
)
from ann2snn.evaluation.provenance import provenance
from ann2snn.evaluation.statistics import INTERVAL_METHOD, accuracy_interval
from ann2snn.evaluation.synops import (
    E_AC_PJ,
    E_MAC_PJ,
    ENERGY_REFERENCE,
    PICOJOULES_PER_MICROJOULE,
    SynapticOperationCounter,
    operation_energy_pj,
    total,
)
from ann2snn.io.batches import (
    batch_input,
    batch_labels,
    check_input_batch,
    check_labels,
    check_model_accepts,
    device_of,
)
from ann2snn.runtime.layers import TemporalModule
from ann2snn.runtime.memory import MEBIBYTE, PeakMemory, plan_chunk_size, simulation_footprint
from ann2snn.runtime.network import SpikingNetwork, check_steps

REPORT_FORMAT = "ann2snn-report"
# An evaluation estimated to take longer is announced with its estimate, after its first chunk of steps.
LONG_EVALUATION_S = 600.0
REPORT_VERSION = 1


@dataclass
class LayerActivity:
    """One spiking layer over the evaluated images, at the largest T."""

    name: str
    neurons: int
    spikes_per_image: float
    firing_rate: float
    never_fired_fraction: float


@dataclass
class EvaluationReport:
    """What `evaluate` measured. Accuracies are fractions in [0, 1]; per-image figures are means over
    the evaluated images; maps keyed by T hold the value after T simulated steps."""

    images: int
    T_list: list[int]
    accuracy_ann: float | None
    accuracy_qann: float | None
    accuracy_snn: dict[int, float]
    agreement_snn_qann: dict[int, float] | None
    spikes_per_image: dict[int, float]
    layers: list[LayerActivity]
    synops_per_image: dict[int, float]
    snn_macs_per_image: dict[int, float]
    ann_macs_per_image: float | None
    config: dict[str, Any]
    timing: dict[str, Any]
    # with stop_when_quiet: the steps simulated until each image's output was final, mean and max over images
    quiet_steps: dict[str, float] | None = None
    # the software, machine, command line and date of the measurement (`ann2snn.evaluation.provenance`)
    provenance: dict[str, Any] | None = None
    # what each layer of the ANN and of the SNN (at each T) did per image, priced with `energy_preset`
    # (`ann2snn.evaluation.energy`)
    ann_traffic: NetworkTraffic | None = None
    snn_traffic: dict[int, NetworkTraffic] = field(default_factory=dict)
    energy_preset: str = DEFAULT_ENERGY_PRESET

    @property
    def ann_energy_uj(self) -> float | None:
        if self.ann_macs_per_image is None:
            return None
        return operation_energy_pj(self.ann_macs_per_image) / PICOJOULES_PER_MICROJOULE

    def snn_energy_uj(self, T: int) -> float:
        return operation_energy_pj(self.snn_macs_per_image[T], self.synops_per_image[T]) / PICOJOULES_PER_MICROJOULE

    def to_json(self) -> dict[str, Any]:
        """The report.json document: a JSON-compatible dict (maps keyed by T have string keys)."""
        ann_energy = self.ann_energy_uj
        snn_energy = {T: self.snn_energy_uj(T) for T in self.T_list}
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "images": self.images,
            "T_list": list(self.T_list),
            "accuracy": {"ann": self.accuracy_ann, "qann": self.accuracy_qann, "snn": _by_T(self.accuracy_snn)},
            "accuracy_ci95": {
                "method": INTERVAL_METHOD, "ann": accuracy_interval(self.accuracy_ann, self.images),
                "qann": accuracy_interval(self.accuracy_qann, self.images),
                "snn": _by_T({T: accuracy_interval(value, self.images) for T, value in self.accuracy_snn.items()})},
            "agreement_snn_qann": _by_T(self.agreement_snn_qann) if self.agreement_snn_qann is not None else None,
            "spikes": {
                "T": max(self.T_list),
                "per_image": _by_T(self.spikes_per_image),
                "per_layer": [vars(layer).copy() for layer in self.layers],
            },
            "synops_per_image": _by_T(self.synops_per_image),
            "snn_macs_per_image": _by_T(self.snn_macs_per_image),
            "ann_macs_per_image": self.ann_macs_per_image,
            "energy": {
                "e_mac_pj": E_MAC_PJ,
                "e_ac_pj": E_AC_PJ,
                "reference": ENERGY_REFERENCE,
                "method": "ANN: MACs x E_MAC. SNN: (MACs on analog values, the first layer on the input "
                          "included) x E_MAC + synaptic operations (spikes x fan-out) x E_AC.",
                "ann_uj_per_image": ann_energy,
                "snn_uj_per_image": _by_T(snn_energy),
                "ann_over_snn": (_by_T({T: ann_energy / energy for T, energy in snn_energy.items() if energy})
                                 if ann_energy is not None else None),
            },
            "energy_memory": memory_energy(self.energy_preset, self.ann_traffic, self.snn_traffic),
            "quiet_steps": dict(self.quiet_steps) if self.quiet_steps is not None else None,
            "config": dict(self.config),
            "timing": dict(self.timing),
            "provenance": dict(self.provenance) if self.provenance is not None else None,
        }


def _by_T(values: dict[int, Any]) -> dict[str, Any]:
    return {str(T): value for T, value in sorted(values.items())}


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class _FiringMonitor:
    """Which neurons of each layer have fired at least once (any image, any step)."""

    def __init__(self, snn: SpikingNetwork):
        self.neurons = snn.neurons
        self.fired: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _FiringMonitor:
        for name, neuron in self.neurons.items():
            self._handles.append(neuron.register_forward_hook(
                lambda module, inputs, spikes, name=name: self._record(name, spikes)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _record(self, name: str, spikes: torch.Tensor) -> None:
        fired = (spikes != 0).flatten(1).any(0)
        self.fired[name] = fired if name not in self.fired else self.fired[name] | fired


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: time only what has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_window(snn: SpikingNetwork) -> tuple[int, int]:
    """(first step, steps) of the body call in progress: every temporal module holds the same window."""
    clock = next(module for module in snn.body.modules() if isinstance(module, TemporalModule))
    return clock.t0, clock.steps


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _StepProgress:
    """The evaluation's progress in image-steps (images x time steps simulated), moved after every chunk of
    steps rather than once per batch, so that it moves (with its own estimate) even when there is one batch.
    A ConversionWarning gives the estimated duration when it exceeds LONG_EVALUATION_S: after the first chunk,
    or, when batches stop once quiet (`settles_early`), after the first batch, whose steps until quiet the
    first chunk cannot tell (it assumed every step and overstated a signed run many times)."""

    def __init__(self, images: int | None, steps: int, enabled: bool, settles_early: bool = False) -> None:
        self.steps = steps
        self.total = images * steps if images is not None else None
        self.settles_early = settles_early
        self.bar = tqdm(total=self.total, desc="evaluating", unit="image-step", unit_scale=True,
                        disable=not enabled, leave=False)
        self.start: float | None = None
        self.done = self.batch_done = 0

    def __enter__(self) -> _StepProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()

    def begin_batch(self) -> None:
        self.start = self.start or time.perf_counter()
        self.batch_done = 0

    def advance(self, image_steps: int) -> None:
        first = self.done == 0
        self.done += image_steps
        self.batch_done += image_steps
        self.bar.update(image_steps)
        if first and not self.settles_early:
            self._announce(f"at the pace of its first {image_steps} image-steps")

    def end_batch(self, images: int) -> None:
        """A batch stopped when quiet simulated fewer steps: the bar moves to where the batch ends."""
        first = self.done == self.batch_done
        remaining = images * self.steps - self.batch_done
        if remaining > 0:
            self.done += remaining
            self.bar.update(remaining)
        if first and self.settles_early and self.total is not None and self.done < self.total:
            self._announce(f"at the pace of its first batch of {images} images, quiet after "
                           f"{self.batch_done // images} steps")

    def _announce(self, pace: str) -> None:
        if self.total is None:
            return
        estimate = (time.perf_counter() - self.start) * self.total / self.done
        if estimate > LONG_EVALUATION_S:
            warnings.warn(f"this evaluation will take about {_duration(estimate)}: {self.total // self.steps} "
                          f"images x {self.steps} time steps, {pace}; a smaller --T, --T-list or --eval-size "
                          "shortens it", ConversionWarning, stacklevel=3)


def _images_in(loader: Iterable[Any]) -> int | None:
    """How many images a loader yields, where it tells (a DataLoader over a sized data set)."""
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


def _checked_batches(loader: Iterable[Any], device: torch.device,
                     reference: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) of every batch, on `device`; a ValueError naming the batch where the inputs are not
    floating tensors of one size that `reference` accepts (tried on one sample when the first batch is
    drawn) or the labels are not class indices of its outputs."""
    first = classes = None
    for index, batch in enumerate(loader):
        where = f"evaluation batch {index}"
        labels = batch_labels(batch)
        if labels is None:
            raise ValueError("evaluate needs labelled batches: (inputs, labels) tuples or dicts with a label key")
        x = check_input_batch(batch_input(batch), where, first).to(device)
        if first is None:
            first, classes = x, check_model_accepts(reference, x).shape[-1]
        check_labels(labels, x.shape[0], classes, where)
        yield x, labels.to(device)


@torch.no_grad()
def evaluate(snn: SpikingNetwork, loader: Iterable[Any], T_list: Iterable[int] | None = None, *,
             ann: nn.Module | None = None, chunk_size: int | None = None, progress: bool = False,
             max_memory: int | None = None, stop_when_quiet: bool = False,
             energy_preset: str = DEFAULT_ENERGY_PRESET) -> EvaluationReport:
    """Measure `snn` (and the `ann` it was converted from, if given, and its QANN) on labelled batches.

    Batches are (inputs, labels) tuples or dicts with image and label keys; inputs are moved to the
    device of `snn`, where `ann` must live too. One simulation per batch runs to max(T_list) (default:
    [snn.T]). The ANN's MACs are counted on `ann`, else on the QANN (the same layers, BatchNorm folded).
    Bad batches are refused before they are simulated (see `_checked_batches`). With `max_memory`
    (bytes), each batch is simulated in the largest chunks of time steps, at most `chunk_size`, whose
    estimated memory fits (`ann2snn.runtime.memory`); `timing` reports the peak memory the run used.
    In a torch.distributed process group every process passes its own shard of the data (see
    `ann2snn.distributed.shard`) and gets the report of all shards; timings are the slowest process's.
    With `stop_when_quiet` (signed neurons), a batch stops once every image's network is quiet (its output is
    final); `quiet_steps` reports how many steps each image needed, and the counts cover only the steps run.
    The memory-aware energy is priced with the preset `energy_preset` (`ann2snn.evaluation.energy`).
    """
    check_energy_preset(energy_preset)
    T_list = [snn.T] if T_list is None else list(T_list)
    if not T_list:
        raise ValueError("T_list is empty: give at least one number of time steps to report")
    for T in T_list:
        check_steps("every T of T_list", T)
    if chunk_size is not None:
        check_steps("chunk_size", chunk_size)
    if max_memory is not None and not max_memory > 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    T_list = sorted(set(T_list))
    T_max = T_list[-1]
    device = device_of(snn)
    if ann is not None and device_of(ann) != device:
        raise ValueError(f"the ANN is on {device_of(ann)} but the spiking network on {device}: move both to one device")
    qann = snn.qann
    mac_model = ann if ann is not None else qann

    images = 0
    correct_ann = correct_qann = 0
    correct_snn = dict.fromkeys(T_list, 0)
    agreeing = dict.fromkeys(T_list, 0)
    spikes_by_T = {T: 0.0 for T in T_list}
    layer_spikes: dict[int, dict[str, float]] = {T: {} for T in T_list}
    quiet_steps_sum = quiet_steps_max = 0
    snn_seconds = 0.0

    with ExitStack() as stack:
        peak_memory = stack.enter_context(PeakMemory(device))
        for model in (ann, qann):
            if model is not None:
                stack.enter_context(_eval_mode(model))
        # The first batch is drawn, checked and sized before the counters start, which must not count
        # the check's trial run.
        steps_done = stack.enter_context(_StepProgress(_images_in(loader), T_max, progress, stop_when_quiet))
        batches = _checked_batches(loader, device, next(model for model in (ann, qann, snn) if model is not None))
        first = next(batches, None)
        footprint = simulation_footprint(snn, first[0]) if first is not None and max_memory is not None else None
        first_chunk = None
        body_ops = stack.enter_context(SynapticOperationCounter(
            snn.body, event_driven=True, steps=T_max, window=lambda: _time_window(snn)))
        prefix_ops = stack.enter_context(SynapticOperationCounter(snn.prefix, event_driven=False))
        ann_ops = (stack.enter_context(SynapticOperationCounter(mac_model, event_driven=False))
                   if mac_model is not None else None)
        firing = stack.enter_context(_FiringMonitor(snn))

        _synchronize(device)
        start = time.perf_counter()
        for x, labels in itertools.chain([first] if first is not None else [], batches):
            batch_chunk = chunk_size or snn.default_chunk(x.shape[0])
            if footprint is not None:
                batch_chunk = plan_chunk_size(footprint, x.shape[0], max_memory, batch_chunk)
            first_chunk = first_chunk or batch_chunk
            images += labels.numel()
            if ann is not None:
                correct_ann += int((ann(x).argmax(-1) == labels).sum())
            qann_predictions = qann(x).argmax(-1) if qann is not None else None
            if qann_predictions is not None:
                correct_qann += int((qann_predictions == labels).sum())

            _synchronize(device)
            simulation_start = time.perf_counter()
            steps_done.begin_batch()
            result = snn.simulate(x, T_list, chunk_size=batch_chunk, stop_when_quiet=stop_when_quiet,
                                  on_chunk=steps_done.advance)
            _synchronize(device)
            snn_seconds += time.perf_counter() - simulation_start
            steps_done.end_batch(labels.numel())

            for T in T_list:
                predictions = result.outputs[T].argmax(-1)
                correct_snn[T] += int((predictions == labels).sum())
                if qann_predictions is not None:
                    agreeing[T] += int((predictions == qann_predictions).sum())
                for name, count in result.spikes[T].items():
                    spikes = float(count.sum(dtype=torch.float64))
                    layer_spikes[T][name] = layer_spikes[T].get(name, 0.0) + spikes
                    spikes_by_T[T] += spikes
            quiet_steps_sum += int(result.steps_used.sum())
            quiet_steps_max = max(quiet_steps_max, int(result.steps_used.max()))
        _synchronize(device)
        wall_seconds = time.perf_counter() - start

    require_on_every_process(images > 0, "the evaluation loader yielded no batches")
    # Under torchrun each process measured its own shard; the report is of all of them. Every count is
    # an integer (spikes and synaptic operations too), so the sums are exact whatever the order.
    ann_counts = ann_ops.counts if ann_ops is not None else None
    (images, correct_ann, correct_qann, correct_snn, agreeing, spikes_by_T, layer_spikes, body_counts, prefix_counts,
     ann_counts, quiet_steps_sum) = reduce_over_processes(
        (images, correct_ann, correct_qann, correct_snn, agreeing, spikes_by_T, layer_spikes, body_ops.counts,
         prefix_ops.counts, ann_counts, quiet_steps_sum), "sum")
    firing.fired, wall_seconds, snn_seconds, quiet_steps_max = reduce_over_processes(
        (firing.fired, wall_seconds, snn_seconds, quiet_steps_max), "max")
    peak_bytes = reduce_over_processes(peak_memory.bytes, "max")
    device_text = device_name(device)
    layers = [
        LayerActivity(
            name=name,
            neurons=firing.fired[name].numel(),
            spikes_per_image=spikes / images,
            firing_rate=spikes / images / (firing.fired[name].numel() * T_max),
            never_fired_fraction=1.0 - float(firing.fired[name].float().mean()),
        )
        for name, spikes in layer_spikes[T_max].items()
    ]
    # The static prefix runs once per image on the analog input; a rate-coded network receives that
    # input again at every step, an accumulate-coded one only once.
    prefix_macs = float(total(prefix_counts, "multiply_accumulates", 1).sum()) / images
    prefix_runs = {T: snn.coding.prefix_runs(T) for T in T_list}
    synops = total(body_counts, "accumulates", T_max).cumsum(0) / images
    body_macs = total(body_counts, "multiply_accumulates", T_max).cumsum(0) / images
    ann_macs = total(ann_counts, "multiply_accumulates", 1) if ann_counts is not None else None
    snn_traffic = {T: NetworkTraffic(
        layer_traffic(prefix_counts, prefix_ops.sizes, images, runs=prefix_runs[T])
        + layer_traffic(body_counts, body_ops.sizes, images, steps=T),
        [NeuronTraffic(layer.name, layer.neurons, T, layer_spikes[T].get(layer.name, 0.0) / images)
         for layer in layers])
        for T in T_list}
    return EvaluationReport(
        images=images,
        T_list=T_list,
        accuracy_ann=correct_ann / images if ann is not None else None,
        accuracy_qann=correct_qann / images if qann is not None else None,
        accuracy_snn={T: correct_snn[T] / images for T in T_list},
        agreement_snn_qann={T: agreeing[T] / images for T in T_list} if qann is not None else None,
        spikes_per_image={T: spikes_by_T[T] / images for T in T_list},
        layers=layers,
        synops_per_image={T: float(synops[T - 1]) for T in T_list},
        snn_macs_per_image={T: prefix_macs * prefix_runs[T] + float(body_macs[T - 1]) for T in T_list},
        ann_macs_per_image=float(ann_macs.sum()) / images if ann_macs is not None else None,
        config={**snn.config, "coding": snn.coding.name, "T_list": T_list},
        timing={
            "wall_s": wall_seconds,
            "images_per_s": images / wall_seconds,
            "snn_s": snn_seconds,
            "snn_images_per_s": images / snn_seconds,
            "device": device_text,
            "processes": world_size(),
            "peak_memory_mb": peak_bytes / MEBIBYTE if peak_bytes is not None else None,
            "peak_memory_measure": peak_memory.measure,
            "memory_limit_mb": max_memory / MEBIBYTE if max_memory is not None else None,
            "chunk_size": first_chunk,
        },
        quiet_steps={"mean": quiet_steps_sum / images, "max": quiet_steps_max, "of": T_max} if stop_when_quiet
        else None,
        provenance=provenance(device_text),
        ann_traffic=NetworkTraffic(layer_traffic(ann_counts, ann_ops.sizes, images), []) if ann_counts is not None
        else None,
        snn_traffic=snn_traffic,
        energy_preset=energy_preset,
    )
