"""Training and quantization-aware fine-tuning (QCFS, Bu et al. ICLR 2022).

Post-training clipping loses accuracy at 2-4 bits. Fine-tuning with the clip-floor-shift activation in
place lets the weights adapt to the quantization and learns each layer's threshold theta (straight-through
gradient through the floor), which is what makes a low number of time steps possible.

The fine-tuning graph is the traced model with its activations normalised and quantized but BatchNorm
kept (it keeps training); `quantize(..., thresholds=...)` later folds BatchNorm and takes the learned
thresholds by quantizer name, which both graphs share.
"""
from __future__ import annotations

import copy
import io
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ann2snn.compiler.convert import prepare_pipeline
from ann2snn.compiler.graph_utils import is_module
from ann2snn.compiler.ops import WEIGHTED
from ann2snn.compiler.pass_manager import PassManager
from ann2snn.compiler.passes import calibrate_thresholds, insert_quantizers
from ann2snn.compiler.qbits import QBits
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.config import QUANTIZATION_KEYS, QuantizationConfig, channelwise_thresholds, quantization_config
from ann2snn.evaluation.synops import fan_out
from ann2snn.io.atomic import atomic_write
from ann2snn.io.batches import batch_input, batch_labels, device_of

# Enough calibration batches to start the thresholds near their optimum; fine-tuning does the rest.
DEFAULT_CALIBRATION_BATCHES = 8


@dataclass
class TrainingConfig:
    """SGD with Nesterov momentum and a cosine learning-rate schedule stepped every batch. Weight decay
    applies to conv/linear weights only, not to biases, BatchNorm or thresholds.

    `spike_penalty` (quantization-aware fine-tuning only) adds lambda x the spikes per neuron and image of
    the SNN the quantized network becomes to the cross-entropy (see `_SpikeCount`): fewer spikes for the
    accuracy it costs. `synops_penalty` adds lambda x that SNN's synaptic operations per image as a fraction
    of the ANN's MACs: each spike weighted by the synapses it drives, so the penalty falls where the
    operation energy is (in MobileNetV2 a bottleneck output's spike reaches 6 x its channels, an expanded
    neuron's 9 synapses)."""

    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    spike_penalty: float = 0.0
    synops_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")
        # A negative weight would reward spikes; NaN would pass every comparison below
        for name, term in (("spike_penalty", "the spikes per neuron"),
                           ("synops_penalty", "the synaptic operations over the ANN's MACs")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (the weight of {term} in the loss), "
                                 f"got {value}")

    @property
    def penalised(self) -> bool:
        return self.spike_penalty > 0 or self.synops_penalty > 0


def _saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A training state's settings with the fields added since it was written at their defaults, which is
    what that run trained with: a run from before `spike_penalty` still resumes."""
    defaults = {f.name: f.default for f in fields(TrainingConfig) if f.default is not MISSING}
    return {**defaults, **saved}


@dataclass
class Trained:
    """The architecture's module with the trained weights (eval mode) and, after quantization-aware
    fine-tuning, the learned thresholds to convert it with."""

    model: nn.Module
    qbits: QBits | None
    thresholds: dict[str, torch.Tensor] | None
    history: list[dict[str, float]] = field(default_factory=list)
    quantize_streams: bool = False

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The checkpoint entry `ann2snn convert` reads (see `model_loading.save_checkpoint`)."""
        if self.qbits is None:
            return None
        entry = {"qbits": self.qbits, "thresholds": {name: theta.cpu() for name, theta in self.thresholds.items()}}
        return entry | ({"quantize_streams": True} if self.quantize_streams else {})


def quantization_aware(model: nn.Module, calib_batches: Iterable[Any],
                       quantization: QuantizationConfig | QBits | None = None, **settings: Any) -> fx.GraphModule:
    """The model as a trainable graph whose activations are QCFS quantizers with learnable thresholds,
    initialised by calibration on `calib_batches` as `quantization` (a `QuantizationConfig`, or the bits;
    keyword `settings` qbits, threshold_rule, percentile, per_channel build or change it) says."""
    quantization = quantization_config(quantization, **settings)
    batches = iter(calib_batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("the calibration loader yielded no batches")
    example = batch_input(first)[:1].to(device_of(model))
    # BatchNorm keeps training; the conversion checks support on the folded graph
    front_end = prepare_pipeline(example, fold_batchnorm=False, check_supported=False,
                                 quantize_streams=quantization.quantize_streams)
    graph = PassManager(front_end.passes + [
        ("insert_quantizers", partial(insert_quantizers, qbits=quantization.qbits,
                                      per_channel=channelwise_thresholds(quantization, None))),
        ("calibrate_thresholds", partial(calibrate_thresholds, batches=itertools.chain([first], batches),
                                         rule=quantization.threshold_rule, percentile=quantization.percentile)),
    ]).run(copy.deepcopy(model).eval())
    for quantizer in _quantizers(graph).values():
        quantizer.theta = nn.Parameter(quantizer.theta.detach().clone())
    return graph


def _quantizers(module: nn.Module) -> dict[str, QCFSQuantizer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, QCFSQuantizer)}


class _SpikeCount:
    """The spikes per neuron and image that the SNN of a quantization-aware graph fires, from forward hooks
    on its QCFS quantizers. A rate-coded neuron fires once per quantization level of its activation in
    T = levels steps, and a signed one settles on the same count, so the SNN fires sum over quantizers of
    output / step = output / theta x levels per image. (A signed network fires more on the way: spikes on
    partial input in early steps that later negative ones cancel; 1.8x the levels for `resnet20-q4.pt` at
    T = 16 with 2 spikes per step, 1.0x in its first layer. The term does not see those.)

    Taken from the training forward's own output, the count has the straight-through gradient the quantizer
    trains with (floor as the identity; none at level 0 or at the top level, where the clamp's gradient is
    zero), so a penalty on it reaches theta and the weights. Divided by the neurons, one `spike_penalty`
    means the same on networks of any size. Only training-mode calls count: `accuracy` runs the same graph
    in eval mode.

    In a traced graph (finetune's) each quantizer's spikes are also weighted by the synapses one spike
    drives: the dense MACs per image of the weighted layers it feeds (through any op but another quantizer)
    over its neurons, the mean fan-out (exact but at a padded convolution's borders). Their sum over the
    graph's dense MACs per image is the synops ratio: the SNN's synaptic operations over the ANN's MACs,
    which the operation-energy ratio is E_MAC / E_AC over (the dense first layer aside)."""

    def __init__(self, module: nn.Module, differentiable: bool):
        self.differentiable = differentiable
        quantizers = _quantizers(module)
        self.counting = bool(quantizers)
        self._handles = [q.register_forward_hook(partial(self._count, name)) for name, q in quantizers.items()]
        self._consumers = _synaptic_consumers(module) if isinstance(module, fx.GraphModule) else None
        self._dense_macs: dict[str, float] = {}
        self._mean_fan_out: dict[str, float] = {}
        if self.counts_synops:
            self._handles += [layer.register_forward_hook(partial(self._measure, name))
                              for name, layer in module.named_modules() if isinstance(layer, WEIGHTED)]
        self._clear()

    @property
    def counts_synops(self) -> bool:
        return self._consumers is not None

    def __enter__(self) -> _SpikeCount:
        return self

    def __exit__(self, *exception: object) -> None:
        # An interrupted run must not leave the caller's module counting
        for handle in self._handles:
            handle.remove()

    def _clear(self) -> None:
        self._levels: dict[str, torch.Tensor] = {}
        self._neurons: dict[str, int] = {}
        self._samples = 0

    def _measure(self, name: str, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if name not in self._dense_macs:
            self._dense_macs[name] = float(fan_out(layer, inputs[0].shape[1:]).sum())

    def _count(self, name: str, quantizer: QCFSQuantizer, inputs: tuple[torch.Tensor, ...],
               output: torch.Tensor) -> None:
        if not quantizer.training or quantizer.observer is not None:
            return
        # Without a penalty the count is only recorded: no graph for it
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            self._levels[name] = (output / quantizer.step).abs().sum()
        self._neurons[name] = output[0].numel()
        self._samples = output.shape[0]

    def _synapses_per_spike(self, quantizer: str) -> float:
        # fixed once the first forward pass has measured every layer: the shapes do not change in training
        if quantizer not in self._mean_fan_out:
            self._mean_fan_out[quantizer] = sum(
                self._dense_macs[layer] for layer in self._consumers[quantizer]) / self._neurons[quantizer]
        return self._mean_fan_out[quantizer]

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Spikes per neuron and image of the forward pass since the last `take`, and the synops ratio
        (None outside a traced graph)."""
        if not self._levels:
            raise RuntimeError("no quantizer ran in training mode since the last count")
        spikes = sum(self._levels.values()) / (self._samples * sum(self._neurons.values()))
        synops = None
        if self.counts_synops:
            operations = sum(levels * self._synapses_per_spike(name) for name, levels in self._levels.items())
            synops = operations / (self._samples * sum(self._dense_macs.values()))
        self._clear()
        return spikes, synops


def _synaptic_consumers(graph: fx.GraphModule) -> dict[str, list[str]]:
    """For each quantizer of a traced graph, the weighted layers its spikes reach: through any op but
    another quantizer (pooling, reshaping, a residual sum)."""
    consumers = {}
    for node in graph.graph.nodes:
        if not is_module(graph, node, QCFSQuantizer):
            continue
        reached, frontier, seen = [], list(node.users), set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            if is_module(graph, user, WEIGHTED):
                reached.append(user.target)
            elif not is_module(graph, user, QCFSQuantizer):
                frontier.extend(user.users)
        consumers[node.target] = reached
    return consumers


def accuracy(module: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy in percent, in eval mode (the caller's mode is restored)."""
    was_training = module.training
    module.eval()
    device = device_of(module)
    correct = seen = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch_labels(batch).to(device)
            correct += int((module(batch_input(batch).to(device)).argmax(1) == labels).sum())
            seen += len(labels)
    module.train(was_training)
    if seen == 0:
        raise ValueError("the evaluation loader yielded no batches")
    return 100.0 * correct / seen


def _optimizer(module: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    decayed, undecayed = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (decayed if parameter.dim() > 1 else undecayed).append(parameter)
    return torch.optim.SGD([{"params": decayed, "weight_decay": config.weight_decay},
                            {"params": undecayed, "weight_decay": 0.0}],
                           lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


def _cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def fit(module: nn.Module, train_loader: Iterable[Any], config: TrainingConfig, *,
        eval_loader: Iterable[Any] | None = None, state_path: str | Path | None = None, progress: bool = True,
        log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train `module` in place; returns one history entry per epoch (loss, train and eval accuracy, time).
    `loss` is the cross-entropy; a module with QCFS quantizers also records `spikes_per_neuron`, the mean
    spike term, and a traced one `synops_ratio` (see `_SpikeCount`), whatever the penalties; the loss
    minimised is loss + spike_penalty x spikes_per_neuron + synops_penalty x synops_ratio.

    With `state_path`, the full training state (weights, optimizer, schedule, epoch, random state) is
    written there atomically after every epoch, and a run that finds the file resumes from it.

    On CPU, the module and image batches train channels-last: oneDNN's depthwise and pointwise convolutions
    are about twice as fast in that layout (MobileNetV2, one thread); the results are the same."""
    if config.penalised and not _quantizers(module):
        raise ValueError("spike_penalty and synops_penalty need QCFS quantizers: they penalise the spikes of "
                         "the quantized network's SNN (fine-tune with qbits)")
    if config.synops_penalty > 0 and not isinstance(module, fx.GraphModule):
        raise ValueError("synops_penalty needs a traced quantization-aware graph (finetune's): it follows each "
                         "quantizer's spikes to the layers they feed")
    device = device_of(module)
    memory_format = torch.channels_last if device.type == "cpu" else torch.preserve_format
    module.to(memory_format=memory_format)
    optimizer = _optimizer(module, config)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(
        config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)))
    history: list[dict[str, float]] = []
    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if _saved_settings(state["config"]) != asdict(config):
            raise ValueError(f"{state_path}: was written for training settings {state['config']}, not "
                             f"{asdict(config)}; delete it to start over")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        history = state["history"]
        log(f"resuming from {state_path} after epoch {len(history)}")
    with _SpikeCount(module, differentiable=config.penalised) as spikes:
        for epoch in range(len(history), config.epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            module.train()
            started = time.perf_counter()
            loss_sum = spike_sum = synops_sum = correct = seen = 0.0
            batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                           disable=not progress, leave=False)
            for batch in batches:
                inputs, labels = batch_input(batch).to(device), batch_labels(batch).to(device)
                if inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=memory_format)
                logits = module(inputs)
                loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
                objective, synops_term = loss, None
                if spikes.counting:
                    spike_term, synops_term = spikes.take()
                    spike_sum += spike_term.item() * len(labels)
                    if synops_term is not None:
                        synops_sum += synops_term.item() * len(labels)
                    if config.spike_penalty > 0:
                        objective = objective + config.spike_penalty * spike_term
                    if config.synops_penalty > 0:
                        objective = objective + config.synops_penalty * synops_term
                if not torch.isfinite(objective):
                    raise FloatingPointError(f"epoch {epoch + 1}: the loss became {objective.item()}; "
                                             f"lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
                batches.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                                    **({"spikes": f"{spike_sum / seen:.3f}"} if spikes.counting else {}),
                                    **({"synops": f"{synops_sum / seen:.3f}"} if synops_term is not None else {}))
            entry = {"epoch": epoch + 1, "loss": loss_sum / seen}
            if spikes.counting:
                entry["spikes_per_neuron"] = spike_sum / seen
                if spikes.counts_synops:
                    entry["synops_ratio"] = synops_sum / seen
            entry |= {"train_accuracy": 100 * correct / seen, "seconds": time.perf_counter() - started}
            if eval_loader is not None:
                entry["eval_accuracy"] = accuracy(module, eval_loader)
            history.append(entry)
            log(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in entry.items()))
            if state_path is not None:
                buffer = io.BytesIO()
                torch.save({"config": asdict(config), "module": module.state_dict(),
                            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "rng": torch.get_rng_state(), "history": history}, buffer)
                atomic_write(state_path, buffer.getvalue())
    module.to(memory_format=torch.contiguous_format).eval()
    return history


def _trained_weights(model: nn.Module, graph: fx.GraphModule) -> nn.Module:
    """`model` with the weights the traced graph trained: the graph keeps the modules' qualified names."""
    trained = graph.state_dict()
    state = {key: trained.get(key, value) for key, value in model.state_dict().items()}
    result = copy.deepcopy(model)
    result.load_state_dict(state)
    return result.eval()


def train(model: nn.Module, train_loader: Iterable[Any], config: TrainingConfig, **fit_options: Any) -> Trained:
    """Train the ANN itself (no quantizers), e.g. from scratch. `fit_options` go to `fit`."""
    trained = copy.deepcopy(model)
    history = fit(trained, train_loader, config, **fit_options)
    return Trained(trained.eval(), None, None, history)


def finetune(model: nn.Module, train_loader: Iterable[Any], quantization: QuantizationConfig | QBits | None = None, *,
             epochs: int = 5, lr: float = 0.01, calib_loader: Iterable[Any] | None = None,
             calibration_batches: int = DEFAULT_CALIBRATION_BATCHES, config: TrainingConfig | None = None,
             **options: Any) -> Trained:
    """Quantization-aware fine-tuning: the model trains with QCFS quantizers of 2**qbits - 1 levels in place
    and learnable thresholds, initialised from `calibration_batches` batches of `calib_loader` (default
    `train_loader`) as `quantization` says (a `QuantizationConfig` or the bits; default 4 bits, and
    `options` qbits, threshold_rule, percentile and per_channel build or change it). Convert the result with
    `convert(result.model, loader, qbits=qbits, thresholds=result.thresholds)`, or save it with
    `model_loading.save_checkpoint(..., quantization=result.quantization)` for `ann2snn convert`. The other
    `options` go to `fit`."""
    quantization = quantization_config(quantization, **{key: options.pop(key) for key in QUANTIZATION_KEYS
                                                          if key in options})
    config = config or TrainingConfig(epochs=epochs, lr=lr)
    calibration = itertools.islice(calib_loader if calib_loader is not None else train_loader, calibration_batches)
    graph = quantization_aware(model, calibration, quantization)
    history = fit(graph, train_loader, config, **options)
    thresholds = {name: quantizer.theta.detach().clone() for name, quantizer in _quantizers(graph).items()}
    return Trained(_trained_weights(model, graph), quantization.qbits, thresholds, history,
                   quantization.quantize_streams)
