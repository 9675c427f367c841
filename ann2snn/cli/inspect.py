"""`ann2snn inspect CHECKPOINT`: the traced graph, what each node becomes, and the nodes that cannot."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ann2snn.cli import arguments
from ann2snn.cli.arguments import PROGRAM

if TYPE_CHECKING:
    import torch.fx as fx


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "inspect", parents=parents, help="show what each node of the traced graph will become",
        description="Trace CHECKPOINT's model and list each node, its output shape and what the conversion makes "
                    "of it, without converting.")
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    parser.set_defaults(handler=run)


def _becomes(gm: fx.GraphModule, node: fx.Node) -> str:
    """What the conversion makes of a supported node."""
    from ann2snn.compiler.ops import Role, role_of

    if node.op == "placeholder":
        return "input: analog image, fed to the first layers directly"
    if node.op == "output":
        return "output: spike counts decoded (rate: mean over T; signed: sum)"
    role = role_of(gm, node)
    if role is Role.ACTIVATION:
        return "spiking neuron layer (threshold calibrated on the QANN)"
    if role is Role.WEIGHTED:
        bias = " + bias current" if gm.get_submodule(node.target).bias is not None else ""
        return f"synapses: weights with thresholds folded in{bias}"
    if role is Role.CHANNELWISE:
        return "per-channel synapses (BatchNorm that could not be folded)"
    if role is Role.MAX_POOLING:
        return "exact spiking max pooling (on accumulated spikes)"
    if role is Role.AVG_POOLING:
        return "average pooling: fixed synapses"
    if "tensor_meta" not in node.meta:
        return "shape computation, not on spikes"
    return "linear op on spike trains, kept as is"


def run(args: argparse.Namespace) -> int:
    from ann2snn.compiler.passes.check_supported import unsupported_reason
    from ann2snn.errors import target_name
    from ann2snn.workflow import traced_for_inspection

    loaded = arguments.load(args, args.checkpoint)
    gm = traced_for_inspection(loaded)
    rows, unsupported = [], 0
    for node in gm.graph.nodes:
        reason = unsupported_reason(gm, node)
        unsupported += reason is not None
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        rows.append((node.name, f"{node.op} {target_name(gm, node)}",
                     "x".join(map(str, shape)) if shape is not None else "",
                     f"UNSUPPORTED: {reason}" if reason else _becomes(gm, node)))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    input_size = loaded.preprocessing.image_size
    print(f"{loaded.arch} ({loaded.arch_source}), input {'x'.join(map(str, input_size))}: {len(rows)} nodes")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    if unsupported:
        print(f"{PROGRAM}: error: {unsupported} node(s) cannot be converted (marked UNSUPPORTED above)",
              file=sys.stderr)
        return 1
    print("Every node is supported: the model can be converted.")
    return 0
