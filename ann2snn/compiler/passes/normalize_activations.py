"""Pass 2: every ReLU-like activation becomes one form, a `ClippedReLU(upper)` module per call site.

Handled: nn.ReLU / ReLU6 / Hardtanh(0, m) modules, F.relu, torch.relu, F.relu6, F.hardtanh(x, 0, m),
torch.clamp/clip(x, min=0[, max=m]), torch.clamp_min(x, 0), and the method and in-place forms
(`.relu()`, `.relu_()`, `.clamp(min=0)`, ...). A module instance called at several places (torchvision
ResNet's shared `self.relu`) becomes one module per call site, because each will be its own neuron layer.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ann2snn.compiler.graph_utils import call_sites, free_name, is_number, replace_with_module
from ann2snn.compiler.quantizer import ClippedReLU

_NO_UPPER: Any = object()

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
RELU_METHODS = {"relu", "relu_"}
CLAMP_FUNCTIONS = {torch.clamp, torch.clip, torch.clamp_}
CLAMP_METHODS = {"clamp", "clamp_", "clip", "clip_"}
CLAMP_MIN_FUNCTIONS = {torch.clamp_min, torch.clamp_min_}
CLAMP_MIN_METHODS = {"clamp_min", "clamp_min_"}
HARDTANH_FUNCTIONS = {F.hardtanh, F.hardtanh_}


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _clamp_upper(lower: Any, upper: Any) -> Any:
    """The upper clip of clamp(x, lower, upper) if it is a ReLU (lower == 0), else _NO_UPPER."""
    if not (is_number(lower) and lower == 0):
        return _NO_UPPER
    if upper is None:
        return None
    return float(upper) if is_number(upper) and upper > 0 else _NO_UPPER


def activation_upper(gm: fx.GraphModule, node: fx.Node) -> Any:
    """For a ReLU-like node, its upper clip (None when unbounded); _NO_UPPER for anything else."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, ClippedReLU):
            return module.upper
        if isinstance(module, nn.ReLU6):
            return 6.0
        if isinstance(module, nn.ReLU):
            return None
        if isinstance(module, nn.Hardtanh):
            return _clamp_upper(module.min_val, module.max_val)
        return _NO_UPPER
    if node.op == "call_function":
        target = node.target
        if target in RELU_FUNCTIONS:
            return None
        if target is F.relu6:
            return 6.0
        if target in HARDTANH_FUNCTIONS:
            return _clamp_upper(_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))
        if target in CLAMP_FUNCTIONS:
            return _clamp_upper(_arg(node, 1, "min"), _arg(node, 2, "max"))
        if target in CLAMP_MIN_FUNCTIONS:
            return _clamp_upper(_arg(node, 1, "min"), None)
        return _NO_UPPER
    if node.op == "call_method":
        if node.target in RELU_METHODS:
            return None
        if node.target in CLAMP_METHODS:
            return _clamp_upper(_arg(node, 1, "min"), _arg(node, 2, "max"))
        if node.target in CLAMP_MIN_METHODS:
            return _clamp_upper(_arg(node, 1, "min"), None)
    return _NO_UPPER


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    return activation_upper(gm, node) is not _NO_UPPER


def _site_path(gm: fx.GraphModule, node: fx.Node, shared_sites: dict[str, list[fx.Node]]) -> str:
    if node.op == "call_module":
        sites = shared_sites[node.target]
        return node.target if sites[0] is node else free_name(gm, f"{node.target}_{sites.index(node)}")
    owner = node.meta.get("module_path")
    return free_name(gm, f"{owner}.{node.name}" if owner else node.name)


def normalize_activations(gm: fx.GraphModule) -> fx.GraphModule:
    sites = call_sites(gm)
    for node in list(gm.graph.nodes):
        upper = activation_upper(gm, node)
        if upper is _NO_UPPER:
            continue
        path = _site_path(gm, node, sites)
        replace_with_module(gm, node, path, ClippedReLU(upper), node.args[:1])
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
    return gm
