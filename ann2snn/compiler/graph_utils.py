"""Small helpers shared by the passes."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn


def is_number(value) -> bool:
    """A Python int or float constant in a node's arguments (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Every pass ends here: drop dead nodes, check the graph and regenerate its code."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def is_module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), types)


def free_name(gm: fx.GraphModule, wanted: str) -> str:
    """A submodule path not yet taken in gm, close to `wanted`."""
    candidate, k = wanted, 1
    while _exists(gm, candidate):
        candidate = f"{wanted}_{k}"
        k += 1
    return candidate


def _exists(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def insert_module_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    """Insert `module` applied to node's output; every former user of node now reads the new node."""
    path = free_name(gm, name)
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("module_path", "stack_trace")})
    return new


def replace_with_module(gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module,
                        args: Iterable) -> fx.Node:
    """Replace `node` by a call of `module` (registered at `path`) on `args`."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, tuple(args))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def call_sites(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites.setdefault(node.target, []).append(node)
    return sites


def floating_dtype(module: nn.Module) -> torch.dtype:
    """The floating-point dtype a network computes in: its parameters' (float32 when it has none)."""
    return next((parameter.dtype for parameter in module.parameters() if parameter.is_floating_point()), torch.float32)
