"""Pass 3: dropout and identity ops disappear (inference semantics)."""
from __future__ import annotations

import torch.fx as fx

from ann2snn.compiler.ops import Role, role_of


def remove_identities(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if role_of(gm, node) is Role.IDENTITY:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return gm
