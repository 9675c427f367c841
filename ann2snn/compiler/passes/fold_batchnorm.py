"""Pass 4: BatchNorm folds into the convolution or linear layer that feeds it (grouped and depthwise
convolutions included, since BN scales output channels); a BN that cannot be folded (its input is not
the sole output of a conv/linear) becomes a per-channel affine op."""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ann2snn.compiler.graph_utils import call_sites, is_module, replace_with_module
from ann2snn.compiler.ops import Role, role_of
from ann2snn.errors import ConversionError, describe_node
from ann2snn.runtime.layers import ChannelAffine


def _foldable_producer(gm: fx.GraphModule, bn_node: fx.Node, sites: dict[str, list[fx.Node]]) -> fx.Node | None:
    producer = bn_node.args[0]
    if not isinstance(producer, fx.Node) or role_of(gm, producer) is not Role.WEIGHTED:
        return None
    if len(producer.users) != 1 or len(sites[producer.target]) != 1:
        return None
    if is_module(gm, producer, nn.Linear) and _rank(producer) != 2:
        # BatchNorm1d normalises dim 1; a Linear's features are its last dim: the same only for 2-D
        return None
    return producer


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    sites = call_sites(gm)
    for node in list(gm.graph.nodes):
        if role_of(gm, node) is not Role.NORMALIZATION:
            continue
        bn = gm.get_submodule(node.target)
        if bn.training or bn.running_mean is None:
            raise ConversionError(
                f"{describe_node(gm, node)}: BatchNorm without running statistics (training mode or "
                "track_running_stats=False) normalises with batch statistics and cannot be converted; "
                "call model.eval() and use BatchNorm with running statistics")
        producer = _foldable_producer(gm, node, sites)
        if producer is not None:
            layer = gm.get_submodule(producer.target)
            fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
            fused = fuse(copy.deepcopy(layer).eval(), bn)
            gm.add_submodule(producer.target, fused)
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            continue
        scale = bn.weight.detach() / (bn.running_var + bn.eps).sqrt() if bn.affine else \
            1.0 / (bn.running_var + bn.eps).sqrt()
        shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
        replace_with_module(gm, node, node.target, ChannelAffine(scale, shift), node.args[:1])
    return gm
