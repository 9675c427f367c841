"""Pass 7 follow-up (optional): block reconstruction of the calibrated QANN on the calibration images, in the
manner of BRECQ (Li et al., ICLR 2021) adapted to a network whose weights stay float and whose activations are
quantized.

The graph is cut into blocks where a single value is live (the output of a residual block, of a layer in a
chain), each block ending once it holds a quantizer, and a part without weights of its own (the activation after
a residual add) joining the block before it; the last block ends at the output. Block by block, in order,
the parameters the method names (by default the weights and biases of the block's own convolution and linear
layers) are fitted by Adam so that the block's output on the QANN's input to it (from the blocks already
reconstructed) matches, in mean squared error, the float ANN's output on the float input. Gradients pass the
quantizers' floor by the straight-through estimator of `QCFSQuantizer` (training mode), and each quantized
activation keeps its float value at random (QDrop, `QUANTIZATION_DROP`) while it is fitted. The QANN then
corrects, block after block, the error the quantized activations before it made; a block whose fitted error on
the calibration images is no lower keeps its calibrated values. The thresholds stay as calibrated: fitting them
too (LSQ-like, through the same estimator) measured no better on the shared ResNet-20 (2 bits: 63.9 % against
64.0 %, test-1000) in twice the time, and biases alone no better than none (52.4 % against 53.6 %).

Cost: ITERATIONS mini-batches of BATCH_SIZE images per block, forward and backward through the block alone,
and three forward passes of all images (the calibration images and their mirror images) through each block, one
float and two quantized (before and after fitting); the activations of every image at the current cut are held
twice (float and QANN). Adding a method is one entry in RECONSTRUCTIONS."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ann2snn.compiler.graph_utils import call_sites, floating_dtype
from ann2snn.compiler.ops import WEIGHTED, Role, role_of
from ann2snn.compiler.quantizer import QCFSQuantizer, float_network
from ann2snn.errors import ConversionError
from ann2snn.io.batches import device_of

NO_RECONSTRUCTION = "none"
# 100 mini-batches of 64 per block (six passes over 1,024 images: the 512 calibration images and their mirror
# images). Adam's steps move each weight by about the learning rate (weights of trained CIFAR ResNets are ~0.05),
# so that the steps stay a correction, not a retraining. On chenyaofo's ResNet-56 at 4 bits (test-1000, ANN
# 85.7 %, QANN 80.6 % calibrated; tools/BENCHMARKS.md has the table): 84.7 % with 50 steps of 32 images, no
# mirror images and no quantization drop; with the drop alone 85.8 / 84.7 % (100 of 64, seeds 0 / 1) and 85.0 %
# (50 of 32); with both, as set here, 85.0 % in each of three fits (seeds 0 and 1, and 200 steps)
ITERATIONS = 100
BATCH_SIZE = 64
LEARNING_RATE = 3e-4
# QDrop (Wei et al., ICLR 2022): while a block is fitted, each quantized activation in it keeps its float value
# with this probability, so that the weights fit a neighbourhood of quantization errors, not the one the 512
# images happen to give
QUANTIZATION_DROP = 0.5
# the largest number of images passed through a block at once when computing the inputs of the next one
FORWARD_CHUNK = 256


@dataclass(frozen=True)
class Block:
    """The nodes computed from `start`'s value alone (and constants), in graph order, up to `end`."""

    start: fx.Node
    nodes: tuple[fx.Node, ...]
    end: fx.Node


def _single_value_cuts(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes after which their own value is the only one still needed (constants aside), in graph order."""
    order = [node for node in gm.graph.nodes if node.op != "output"]
    position = {node: index for index, node in enumerate(order)}
    last_use = {node: max((position.get(user, len(order)) for user in node.users), default=-1) for node in order}
    live: set[fx.Node] = set()
    cuts = []
    for index, node in enumerate(order):
        if node.op != "get_attr":  # a constant can be read anywhere, it never separates two blocks
            live.add(node)
        live -= {value for value in live if last_use[value] <= index}
        if live == {node}:
            cuts.append(node)
    return cuts


def blocks(gm: fx.GraphModule) -> list[Block]:
    """The blocks the graph is reconstructed in (see the module docstring)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConversionError(f"block reconstruction needs a network of one input, this one has {len(placeholders)}")
    output = next(node for node in gm.graph.nodes if node.op == "output")
    result = output.args[0]
    cuts = set(_single_value_cuts(gm))
    found: list[Block] = []
    start, nodes, quantized = placeholders[0], [], False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        nodes.append(node)
        quantized = quantized or role_of(gm, node) is Role.QUANTIZER
        if node in cuts and (quantized or node is result):
            if found and not any(role_of(gm, member) is Role.WEIGHTED for member in nodes):
                # nothing of its own to fit (the activation after a residual add): it ends the block before
                previous = found.pop()
                start, nodes = previous.start, [*previous.nodes, *nodes]
            found.append(Block(start, tuple(nodes), node))
            start, nodes, quantized = node, [], False
    return found


def block_module(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """The block as a module of its input, sharing `gm`'s submodules (training it trains `gm`)."""
    graph = fx.Graph()
    env = {block.start: graph.placeholder(block.start.name)}

    def value(node: fx.Node) -> fx.Node:
        if node not in env:  # a constant (get_attr): every other value a block reads is its start or its own
            env[node] = graph.node_copy(node, value)
        return env[node]

    for node in block.nodes:
        env[node] = graph.node_copy(node, value)
    graph.output(env[block.end])
    return fx.GraphModule(gm, graph)


def _same_block(reference: fx.GraphModule, block: Block) -> Block:
    nodes = {node.name: node for node in reference.graph.nodes}
    return Block(nodes[block.start.name], tuple(nodes[node.name] for node in block.nodes), nodes[block.end.name])


def _own_modules(gm: fx.GraphModule, block: Block) -> list[nn.Module]:
    """The modules the block calls that nothing outside it calls, so that fitting one block never changes another."""
    sites = call_sites(gm)
    inside = set(block.nodes)
    return [gm.get_submodule(node.target) for node in block.nodes
            if node.op == "call_module" and all(site in inside for site in sites[node.target])]


def layer_weights(gm: fx.GraphModule, block: Block) -> list[nn.Parameter]:
    """The weights and biases of the block's own convolution and linear layers (a zero bias where one has none)."""
    parameters = []
    for layer in _own_modules(gm, block):
        if isinstance(layer, WEIGHTED):
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            parameters += [layer.weight, layer.bias]
    return parameters


# method -> the parameters of a block it fits (None: none, the pass returns the QANN as calibrated); adding a
# method is one entry
RECONSTRUCTIONS: dict[str, Callable[[fx.GraphModule, Block], list[nn.Parameter]] | None] = {
    NO_RECONSTRUCTION: None,
    "weights": layer_weights,
}


@contextmanager
def _dropping_quantization(module: fx.GraphModule, probability: float, generator: torch.Generator) -> Iterator[None]:
    """Each output of the block's quantizers is its float activation with `probability`."""
    def keep_some_float(quantizer: QCFSQuantizer, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        value = args[0]
        kept = torch.rand(value.shape, generator=generator).to(value.device) < probability
        return torch.where(kept, quantizer.float_activation()(value), output)

    handles = [quantizer.register_forward_hook(keep_some_float) for quantizer in module.modules()
               if isinstance(quantizer, QCFSQuantizer)] if probability else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _training(module: fx.GraphModule, parameters: list[nn.Parameter]) -> Iterator[None]:
    """The block in eval form except its quantizers, which train (straight-through floor); the fitted parameters
    require gradients meanwhile."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    flags = {parameter: parameter.requires_grad for parameter in parameters}
    module.eval()
    for submodule in module.modules():
        if isinstance(submodule, QCFSQuantizer):
            submodule.train()
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        for submodule, mode in modes.items():
            submodule.train(mode)


def _fit(module: fx.GraphModule, parameters: list[nn.Parameter], inputs: torch.Tensor, targets: torch.Tensor,
         iterations: int, batch_size: int, generator: torch.Generator) -> None:
    with _training(module, parameters), _dropping_quantization(module, QUANTIZATION_DROP, generator), \
            torch.enable_grad():
        optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
        for _ in range(iterations):
            index = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=generator).to(inputs.device)
            loss = F.mse_loss(module(inputs[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def _outputs(module: fx.GraphModule, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([module(chunk) for chunk in inputs.split(FORWARD_CHUNK)])


def block_errors(gm: fx.GraphModule, reference: fx.GraphModule, inputs: torch.Tensor) -> list[float]:
    """Per block, the mean squared error of the QANN `gm`'s block output (on the QANN's own input to it) against
    the float network `reference`'s (on its own): what reconstruction minimises."""
    errors = []
    quantized = floating = inputs
    with torch.no_grad():
        for block in blocks(gm):
            quantized = _outputs(block_module(gm, block), quantized)
            floating = _outputs(block_module(reference, _same_block(reference, block)), floating)
            errors.append(float(F.mse_loss(quantized, floating)))
    return errors


def reconstruct_blocks(gm: fx.GraphModule, inputs: Sequence[torch.Tensor] | torch.Tensor, method: str = "weights",
                       iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE, seed: int = 0,
                       mirror: bool = True) -> fx.GraphModule:
    """Reconstruct the calibrated QANN `gm` block by block on `inputs` (the calibration images, a tensor or its
    batches) by `method` of RECONSTRUCTIONS; mini-batches and quantization drops are drawn with `seed`. With
    `mirror`, image inputs ([N, C, H, W]) are joined by their mirror images (flipped left to right): the targets
    are the float network's outputs on the same inputs, so no label is assumed, only that a mirrored input is
    like the real ones (as for photographs; not for text or digits, where it is still an input to match on)."""
    if method not in RECONSTRUCTIONS:
        raise ValueError(f"unknown reconstruction {method!r}; choose one of {tuple(RECONSTRUCTIONS)}")
    fitted = RECONSTRUCTIONS[method]
    if fitted is None:
        return gm
    if any(not quantizer.calibrated for quantizer in gm.modules() if isinstance(quantizer, QCFSQuantizer)):
        raise ConversionError("block reconstruction needs a calibrated QANN: calibrate the thresholds first")
    images = torch.cat(list(inputs)) if not isinstance(inputs, torch.Tensor) else inputs
    if len(images) == 0:
        raise ConversionError("block reconstruction got no calibration images")
    if mirror and images.dim() == 4:
        images = torch.cat([images, images.flip(-1)])
    quantized = floating = images.to(device_of(gm), floating_dtype(gm))
    reference = float_network(gm)
    generator = torch.Generator().manual_seed(seed)
    for block in blocks(gm):
        module = block_module(gm, block)
        targets = _outputs(block_module(reference, _same_block(reference, block)), floating)
        parameters = fitted(gm, block)
        outputs = _outputs(module, quantized)
        if parameters:
            calibrated = [parameter.detach().clone() for parameter in parameters]
            _fit(module, parameters, quantized, targets, iterations, batch_size, generator)
            fitted_outputs = _outputs(module, quantized)
            if F.mse_loss(fitted_outputs, targets) < F.mse_loss(outputs, targets):
                outputs = fitted_outputs
            else:
                # the straight-through gradient is an estimate: where its steps did not lower the block's error
                # on the calibration images (a block whose input is exact, like the first), the block stays
                with torch.no_grad():
                    for parameter, value in zip(parameters, calibrated):
                        parameter.copy_(value)
        quantized, floating = outputs, targets
    return gm
