"""Pass 9 (threshold balancing): fold the value of a spike into the weights that receive it.

After emission every neuron layer is followed by a `Scale(a)`: its spikes are integers and `a` is
what one spike is worth (scalar, or per channel). This pass moves each Scale forward through ops that
commute with a positive scaling (pooling, exact max pooling, zero padding, slicing, reshaping) and
folds it into the next convolution or linear layer (per input channel, groups respected), so those
layers receive plain integer spikes. At a residual add `layer(h) + a * s` feeding a neuron alone, with
`layer` a convolution or linear layer of its own, the add is balanced instead: `layer`'s outputs are
divided by a (weights and bias, per output channel) and the neuron's thresholds too, so the neuron
sees the sum divided by a and fires the same spikes, and the shortcut carries plain spikes (one pass
over the activation less at every step). Where branches of other scales meet (concatenations, other
adds) or the output is reached, the Scale stays as an explicit 1-to-1 weighted synapse."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ann2snn.compiler.graph_utils import call_sites, free_name, is_module
from ann2snn.compiler.ops import Commutes, Role, node_arg, op_of, role_of
from ann2snn.runtime.layers import Scale, SpikingMaxPool
from ann2snn.runtime.neurons import SpikingNeuron

# The smallest factor relative to the largest at which a residual add is balanced (see `_balanced_add`).
_BALANCED_ADD_RANGE = 2.0 ** -20


def _commutes(gm: fx.GraphModule, user: fx.Node, factor: torch.Tensor) -> bool:
    """Whether user(a * x) == a' * user(x) with a' computable: always for channel-preserving ops, and
    for ops that move or drop elements when a is a scalar."""
    if is_module(gm, user, SpikingMaxPool):
        return True  # max pooling, of accumulated spikes
    op = op_of(gm, user)
    if op is None:
        return False
    if op.commutes is Commutes.PER_CHANNEL:
        return True
    if factor.numel() == 1:
        return op.commutes is Commutes.SCALAR
    # a per-channel factor moves through constant (zero) padding of the dimensions after the channels
    return op.role is Role.PADDING and user.op == "call_function" and len(node_arg(user, 1, "pad")) <= 2 * (
        factor.dim() - 2) and node_arg(user, 2, "mode", "constant") == "constant"


def _folds_into(layer: nn.Module, factor: torch.Tensor) -> bool:
    """A Linear reads features on its last dimension: a per-channel factor (on dim 1) matches it only
    for 2-D inputs."""
    return not isinstance(layer, nn.Linear) or factor.numel() == 1 or factor.dim() == 2


def _scale_input_channels(layer: nn.Module, factor: torch.Tensor) -> None:
    """layer(a * x) == layer'(x): multiply each weight by the factor of the input channel it reads."""
    weight = layer.weight.data
    if factor.numel() == 1:
        weight.mul_(factor.reshape(()))
        return
    per_channel = factor.flatten()
    if isinstance(layer, nn.Linear):
        weight.mul_(per_channel.unsqueeze(0))
        return
    out_channels, in_per_group = weight.shape[:2]
    group = torch.arange(out_channels, device=weight.device) // (out_channels // layer.groups)
    channel = group.unsqueeze(1) * in_per_group + torch.arange(in_per_group, device=weight.device)
    weight.mul_(per_channel[channel].reshape((out_channels, in_per_group) + (1,) * (weight.dim() - 2)))


def _scale_output_channels(layer: nn.Module, factor: torch.Tensor) -> None:
    """layer(x) * factor == layer'(x), the factor scalar or one per output channel."""
    per_channel = factor.reshape(()) if factor.numel() == 1 else factor.flatten()
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.data.mul_(per_channel.reshape(shape) if per_channel.dim() else per_channel)
    if layer.bias is not None:
        layer.bias.data.mul_(per_channel)


def _balanced_add(gm: fx.GraphModule, node: fx.Node, add: fx.Node, sites: dict[str, list[fx.Node]]) -> bool:
    """Fold the Scale `node` feeding the residual `add` into the add's other operand and the neuron after
    it (see the module docstring); False where the pattern does not hold."""
    if add.op != "call_function" or role_of(gm, add) is not Role.ADD or len(add.args) != 2 \
            or add.kwargs or len(add.users) != 1:
        return False
    other = add.args[1] if add.args[0] is node else add.args[0]
    (neuron_node,) = add.users
    if not (isinstance(other, fx.Node) and role_of(gm, other) is Role.WEIGHTED and len(other.users) == 1
            and len(sites[other.target]) == 1 and is_module(gm, neuron_node, SpikingNeuron)
            and len(sites[neuron_node.target]) == 1):
        return False
    factor = gm.get_submodule(node.target).factor
    layer = gm.get_submodule(other.target)
    if factor.numel() > 1 and (isinstance(layer, nn.Linear) or factor.numel() != layer.weight.shape[0]):
        return False
    # a channel that never fired in calibration has a vanishing threshold: dividing by it would overflow
    if not bool((factor >= factor.max() * _BALANCED_ADD_RANGE).all()):
        return False
    _scale_output_channels(layer, 1.0 / factor)
    gm.get_submodule(neuron_node.target).scale_input(1.0 / factor)
    return True


def _split_per_user(gm: fx.GraphModule, node: fx.Node) -> None:
    """Give each user of a shared Scale its own copy, so each can be moved or folded on its own."""
    module = gm.get_submodule(node.target)
    for user in list(node.users)[1:]:
        path = free_name(gm, node.target)
        gm.add_submodule(path, copy.deepcopy(module))
        with gm.graph.inserting_after(node):
            copy_node = gm.graph.call_module(path, node.args)
        user.replace_input_with(node, copy_node)


def _step(gm: fx.GraphModule, node: fx.Node, sites: dict[str, list[fx.Node]]) -> bool:
    """Move or fold one Scale node one step forward; False if it must stay where it is."""
    if len(node.users) > 1:
        _split_per_user(gm, node)
        return True
    if not node.users:
        return False
    user = next(iter(node.users))
    scale = gm.get_submodule(node.target)
    source = node.args[0]
    if is_module(gm, user, Scale):
        gm.get_submodule(user.target).factor.mul_(scale.factor)
    elif (role_of(gm, user) is Role.WEIGHTED and user.args[0] is node and len(sites[user.target]) == 1
          and _folds_into(gm.get_submodule(user.target), scale.factor)):
        _scale_input_channels(gm.get_submodule(user.target), scale.factor)
    elif _balanced_add(gm, node, user, sites):
        pass  # the add's other operand and the neuron after it took the factor
    elif user.args and user.args[0] is node and list(user.all_input_nodes).count(node) == 1 \
            and _commutes(gm, user, scale.factor):
        with gm.graph.inserting_after(user):
            moved = gm.graph.call_module(node.target, (user,))
        user.replace_all_uses_with(moved, delete_user_cb=lambda u: u is not moved)
    else:
        return False
    user.replace_input_with(node, source)
    gm.graph.erase_node(node)
    return True


def balance_thresholds(gm: fx.GraphModule) -> fx.GraphModule:
    progress = True
    while progress:
        progress = False
        sites = call_sites(gm)
        for node in list(gm.graph.nodes):
            if node.graph is gm.graph and is_module(gm, node, Scale) and _step(gm, node, sites):
                progress = True
                break
    return gm
