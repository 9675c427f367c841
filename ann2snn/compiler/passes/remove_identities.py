"""Pass 3: dropout and identity ops disappear (inference semantics)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout, torch.dropout}
IDENTITY_METHODS = {"contiguous", "clone", "detach"}


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), IDENTITY_MODULES)
    if node.op == "call_function":
        return node.target in IDENTITY_FUNCTIONS
    return node.op == "call_method" and node.target in IDENTITY_METHODS


def remove_identities(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if _is_identity(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return gm
