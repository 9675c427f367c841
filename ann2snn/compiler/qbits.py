"""The bits specification: how many bits each activation of the QANN gets.

`qbits` is one number of bits for every activation, or a mapping giving each its own: keys are
activation names (the quantizer's module name, e.g. `layer1.0.relu`), `first` (the activations no other
activation precedes), `last` (those no other activation follows) and `default` (every other one). A name
wins over `first`/`last`, which win over `default`. Every later stage follows each quantizer's own level
count: calibration, the signed neurons' spike budget (at most L spikes), and the value of a spike."""
from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from ann2snn.compiler.graph_utils import is_module
from ann2snn.compiler.quantizer import ClippedReLU, QCFSQuantizer

QBits = int | Mapping[str, int]
DEFAULT_KEY, FIRST_KEY, LAST_KEY = "default", "first", "last"
ROLE_KEYS = (FIRST_KEY, LAST_KEY)


def check_qbits(qbits: int) -> int:
    """The level count 2**qbits - 1 of a valid number of bits (an integer in 1..8)."""
    if not isinstance(qbits, int) or isinstance(qbits, bool) or not 1 <= qbits <= 8:
        raise ValueError(f"qbits must be an integer in 1..8, got {qbits!r}")
    return 2 ** qbits - 1


def check_qbits_spec(qbits: QBits) -> QBits:
    """`qbits` if it is a valid number of bits or a mapping of names to valid numbers of bits."""
    if not isinstance(qbits, Mapping):
        check_qbits(qbits)
        return qbits
    if not qbits:
        raise ValueError("the qbits mapping is empty: give bits per activation name, 'first', 'last' or 'default'")
    for key, bits in qbits.items():
        if not isinstance(key, str):
            raise ValueError(f"qbits mapping keys must be activation names, got {key!r}")
        try:
            check_qbits(bits)
        except ValueError:
            raise ValueError(f"qbits of {key!r} must be an integer in 1..8, got {bits!r}") from None
    return qbits


def activation_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The activation nodes (before or after quantization) in graph order."""
    return [node for node in gm.graph.nodes if is_module(gm, node, (ClippedReLU, QCFSQuantizer))]


def activation_roles(gm: fx.GraphModule) -> dict[str, set[str]]:
    """For each activation name, which of 'first' and 'last' it is: first when no other activation lies on
    a path from the input to it, last when none lies on a path from it to the output."""
    activations = activation_nodes(gm)
    names = {node: node.target for node in activations}
    upstream: dict[fx.Node, set[str]] = {}
    for node in gm.graph.nodes:  # graph order is topological
        upstream[node] = set().union(*(upstream[arg] | ({names[arg]} if arg in names else set())
                                       for arg in node.all_input_nodes))
    roles = {node.target: set() for node in activations}
    preceded = {name for node in activations for name in upstream[node]}
    for node in activations:
        if not upstream[node]:
            roles[node.target].add(FIRST_KEY)
        if node.target not in preceded:
            roles[node.target].add(LAST_KEY)
    return roles


def assigned_bits(gm: fx.GraphModule, qbits: Mapping[str, int]) -> dict[str, int]:
    """The bits a mapping assigns to activations of `gm`, by name; activations it does not cover (no name,
    role or 'default' entry) are left out."""
    check_qbits_spec(qbits)
    roles = activation_roles(gm)
    reserved = {DEFAULT_KEY, *ROLE_KEYS}
    if unknown := sorted(set(qbits) - reserved - set(roles)):
        raise ValueError(f"qbits names no activation called {', '.join(map(repr, unknown))}; the activations are "
                         f"{', '.join(roles)} (or use 'first', 'last', 'default')")
    bits: dict[str, int] = {}
    for name, name_roles in roles.items():
        by_role = {qbits[role] for role in sorted(name_roles) if role in qbits}
        if name in qbits:
            bits[name] = qbits[name]
        elif len(by_role) > 1:
            raise ValueError(f"activation '{name}' is both the first and the last, and qbits gives 'first' and "
                             f"'last' different bits ({qbits[FIRST_KEY]} and {qbits[LAST_KEY]}); name it directly")
        elif by_role:
            bits[name] = by_role.pop()
        elif DEFAULT_KEY in qbits:
            bits[name] = qbits[DEFAULT_KEY]
    return bits


def activation_bits(gm: fx.GraphModule, qbits: QBits) -> dict[str, int]:
    """The bits of every activation of `gm`, by name, as `qbits` (a number or mapping) assigns them."""
    check_qbits_spec(qbits)
    names = [node.target for node in activation_nodes(gm)]
    if not isinstance(qbits, Mapping):
        return dict.fromkeys(names, qbits)
    bits = assigned_bits(gm, qbits)
    if unassigned := [name for name in names if name not in bits]:
        raise ValueError(f"qbits gives no bits for {', '.join(unassigned)}: add a 'default' entry or name them")
    return bits


def quantizer_bits(gm: fx.GraphModule) -> dict[str, int]:
    """The bits of every quantizer of a QANN, by name in graph order (from its level count L = 2**bits - 1)."""
    return {node.target: gm.get_submodule(node.target).levels.bit_length() for node in activation_nodes(gm)
            if is_module(gm, node, QCFSQuantizer)}
