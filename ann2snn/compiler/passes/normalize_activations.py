"""Pass 2: every ReLU-like activation becomes one form, a `ClippedReLU(upper)` module per call site.

Handled: nn.ReLU / ReLU6 / Hardtanh(0, m) modules, F.relu, torch.relu, F.relu6, F.hardtanh(x, 0, m),
torch.clamp/clip(x, min=0[, max=m]), torch.clamp_min(x, 0), and the method and in-place forms
(`.relu()`, `.relu_()`, `.clamp(min=0)`, ...). A module instance called at several places (torchvision
ResNet's shared `self.relu`) becomes one module per call site, because each will be its own neuron layer.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from ann2snn.compiler.graph_utils import call_sites, free_name, replace_with_module
from ann2snn.compiler.ops import NOT_RELU, relu_upper
from ann2snn.compiler.quantizer import ClippedReLU


def _site_path(gm: fx.GraphModule, node: fx.Node, shared_sites: dict[str, list[fx.Node]]) -> str:
    if node.op == "call_module":
        sites = shared_sites[node.target]
        return node.target if sites[0] is node else free_name(gm, f"{node.target}_{sites.index(node)}")
    owner = node.meta.get("module_path")
    return free_name(gm, f"{owner}.{node.name}" if owner else node.name)


def normalize_activations(gm: fx.GraphModule) -> fx.GraphModule:
    sites = call_sites(gm)
    for node in list(gm.graph.nodes):
        upper = relu_upper(gm, node)
        if upper is NOT_RELU:
            continue
        path = _site_path(gm, node, sites)
        replace_with_module(gm, node, path, ClippedReLU(upper), node.args[:1])
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
    return gm
