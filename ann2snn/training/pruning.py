"""Pruning before conversion: fewer synapses, so fewer synaptic operations in the SNN.

Two modes, both on the ANN (the conversion then folds BatchNorm and thresholds into weights that stay
zero, since folding and balancing only rescale rows and columns of the weights):

* `magnitude`: global L1 (magnitude) pruning: the `amount` fraction of all conv/linear weights with the
  smallest absolute values, compared across layers, become zero.
* `channel`: in every convolution, the `amount` fraction of output channels (filters) with the smallest
  L1 norm are removed. A removed channel must output exactly zero, or its neurons would keep firing on a
  constant current: with the filter go the convolution's bias for that channel and, where a BatchNorm
  reads the convolution, that BatchNorm's affine weight and bias and its running mean for the channel
  (BatchNorm would otherwise turn the zero into beta - mean * gamma / std, a bias that folding keeps).

The optional fine-tune trains the pruned model through `ann2snn.training.finetune.fit` with torch's pruning
reparametrisation in place, so pruned weights get no updates and stay zero; the masks are then made
permanent, and the returned model is a plain module with the same parameter names.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from ann2snn.compiler.ops import BATCHNORMS, CONVS, WEIGHTED
from ann2snn.compiler.passes.trace import trace
from ann2snn.training.finetune import TrainingConfig, fit

PRUNE_MODES = ("magnitude", "channel")
DEFAULT_FINETUNE_LR = 0.01


@dataclass
class PruningSummary:
    """What `prune` did: the mode and amount asked for, and the zero weights and removed channels found in
    the conv/linear layers of the result (after any fine-tuning)."""

    mode: str
    amount: float
    weights: int
    zero_weights: int
    channels: int
    removed_channels: int
    finetune_epochs: int

    @property
    def sparsity(self) -> float:
        return self.zero_weights / self.weights if self.weights else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sparsity": self.sparsity}


def check_amount(amount: float) -> float:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise ValueError(f"the pruning amount must be a fraction in (0, 1), got {amount!r}")
    return float(amount)


def _weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, WEIGHTED)}


def _batchnorms_reading(model: nn.Module) -> dict[str, list[nn.Module]]:
    """For each convolution (by name), the BatchNorm layers whose input is its output."""
    graph = trace(model)
    readers: dict[str, list[nn.Module]] = {}
    for node in graph.graph.nodes:
        if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), BATCHNORMS):
            continue
        source = node.args[0]
        if getattr(source, "op", None) == "call_module" and isinstance(graph.get_submodule(source.target), CONVS):
            readers.setdefault(source.target, []).append(model.get_submodule(node.target))
    return readers


def _prune_magnitude(model: nn.Module, amount: float) -> None:
    layers = _weighted_layers(model).values()
    torch_prune.global_unstructured([(layer, "weight") for layer in layers], pruning_method=torch_prune.L1Unstructured,
                                    amount=amount)


def _prune_channels(model: nn.Module, amount: float) -> None:
    batchnorms = _batchnorms_reading(model)
    for name, layer in _weighted_layers(model).items():
        if not isinstance(layer, CONVS):
            continue
        torch_prune.ln_structured(layer, "weight", amount, n=1, dim=0)
        kept = layer.weight_mask.flatten(1).any(1).to(layer.weight_mask.dtype)
        if layer.bias is not None:
            torch_prune.custom_from_mask(layer, "bias", kept)
        for batchnorm in batchnorms.get(name, []):
            if batchnorm.running_mean is not None:
                batchnorm.running_mean.mul_(kept)
            if batchnorm.affine:
                torch_prune.custom_from_mask(batchnorm, "weight", kept)
                torch_prune.custom_from_mask(batchnorm, "bias", kept)


def _make_permanent(model: nn.Module) -> None:
    """Bake every pruning mask into its tensor: `weight` is a plain parameter again, with its zeros."""
    for module in model.modules():
        for name, _ in list(module.named_buffers(recurse=False)):
            if name.endswith("_mask"):
                torch_prune.remove(module, name.removesuffix("_mask"))


def _summary(model: nn.Module, mode: str, amount: float, epochs: int) -> PruningSummary:
    layers = _weighted_layers(model).values()
    weights = [layer.weight.detach() for layer in layers]
    filters = [layer.weight.detach().flatten(1) for layer in layers if isinstance(layer, CONVS)]
    return PruningSummary(
        mode=mode, amount=amount, weights=sum(w.numel() for w in weights),
        zero_weights=sum(int((w == 0).sum()) for w in weights),
        channels=sum(f.shape[0] for f in filters),
        removed_channels=sum(int((~f.any(1)).sum()) for f in filters),
        finetune_epochs=epochs)


def prune(model: nn.Module, amount: float, mode: str = "magnitude", *,
          finetune_loader: Iterable[Any] | None = None, finetune_epochs: int = 0, lr: float = DEFAULT_FINETUNE_LR,
          config: TrainingConfig | None = None, **fit_options: Any) -> tuple[nn.Module, PruningSummary]:
    """A pruned copy of `model` (eval mode) and what was pruned.

    `mode` is 'magnitude' (global L1 over all conv/linear weights) or 'channel' (the weakest output channels
    of every convolution, their biases and BatchNorm affine included). With `finetune_loader` and
    `finetune_epochs` > 0 (or a `config`), the pruned model is fine-tuned on labelled batches with pruned
    weights held at zero; `fit_options` go to `ann2snn.training.finetune.fit`."""
    amount = check_amount(amount)
    if mode not in PRUNE_MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of {PRUNE_MODES}")
    if config is None and finetune_epochs:
        config = TrainingConfig(epochs=finetune_epochs, lr=lr)
    if config is not None and finetune_loader is None:
        raise ValueError("fine-tuning after pruning needs a finetune_loader of labelled training batches")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    pruned = copy.deepcopy(model).eval()
    if not _weighted_layers(pruned):
        raise ValueError("the model has no convolution or linear layer to prune")
    with torch.no_grad():
        (_prune_magnitude if mode == "magnitude" else _prune_channels)(pruned, amount)
    if config is not None:
        fit(pruned, finetune_loader, config, **fit_options)
    _make_permanent(pruned)
    return pruned.eval(), _summary(pruned, mode, amount, config.epochs if config is not None else 0)
