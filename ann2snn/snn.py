"""The spiking network: a converted graph plus its simulator."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .layers import AddBias, TemporalModule
from .neurons import SpikingNeuron

CODINGS = ("rate", "accumulate")
_SHAPE_QUERIES = {"size", "dim"}


@dataclass
class SimulationResult:
    """What one simulation up to max(T_list) produced.

    outputs[T]: the network output after T steps (time average for rate coding, sum for accumulate);
    spikes[T][layer]: spikes per sample emitted by that neuron layer during the first T steps;
    steps_used: per sample, the steps simulated before its output was final (T_max without
    `stop_when_quiet`)."""

    outputs: dict[int, torch.Tensor]
    spikes: dict[int, dict[str, torch.Tensor]]
    steps_used: torch.Tensor
    steps_simulated: int = 0
    extra: dict = field(default_factory=dict)


def _is_temporal_dynamic(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Nodes that must see the time-folded tensors: stateful spiking modules and shape queries."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, TemporalModule) and not isinstance(module, AddBias)
    if node.op == "call_method" and node.target in _SHAPE_QUERIES:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def split_static_prefix(gm: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split the graph into the part that depends on the input alone (computed once per batch on the
    analog input, e.g. the first convolution) and the time-dependent body fed by its boundary values."""
    static: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (
            node.op not in ("output", "get_attr")
            and not _is_temporal_dynamic(gm, node)
            and all(arg in static or arg.op == "get_attr" for arg in node.all_input_nodes)
        ):
            static.add(node)
    boundary = [n for n in gm.graph.nodes if n in static and any(u not in static for u in n.users)]

    prefix_graph, prefix_env = fx.Graph(), {}
    body_graph, body_env = fx.Graph(), {}
    for node in boundary:
        body_env[node] = body_graph.placeholder(f"{node.name}_static")
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            prefix_env[node] = prefix_graph.node_copy(node, lambda n: prefix_env[n])
            body_env[node] = body_graph.node_copy(node, lambda n: body_env[n])
        elif node in static:
            prefix_env[node] = prefix_graph.node_copy(node, lambda n: prefix_env[n])
        elif node.op == "output":
            body_graph.node_copy(node, lambda n: body_env[n])
        elif node not in body_env:
            body_env[node] = body_graph.node_copy(node, lambda n: body_env[n])
    prefix_graph.output(tuple(prefix_env[n] for n in boundary))
    prefix, body = fx.GraphModule(gm, prefix_graph, "StaticPrefix"), fx.GraphModule(gm, body_graph, "SpikingBody")
    for part in (prefix, body):
        part.graph.eliminate_dead_code()
        part.delete_all_unused_submodules()
        part.graph.lint()
        part.recompile()
    return prefix, body


class SpikingNetwork(nn.Module):
    """A converted SNN. `snn(x)` simulates `T` steps on a static input batch and returns the output
    (time-averaged for rate coding, summed for accumulate coding: either way comparable to the QANN
    logits); `simulate` returns the outputs at several T from one run; `reset`/`step` stream.

    Time is processed in chunks of `chunk_size` steps folded into the batch dimension; neuron state
    carries over between chunks, so memory is bounded by the chunk, not by T."""

    def __init__(self, graph: fx.GraphModule, T: int, coding: str, qann: nn.Module | None = None,
                 chunk_size: int | None = None, config: dict | None = None):
        super().__init__()
        if coding not in CODINGS:
            raise ValueError(f"coding must be one of {CODINGS}, got {coding!r}")
        check_steps("T", T)
        self.T = T
        self.coding = coding
        self.chunk_size = chunk_size
        self.config = dict(config or {})
        self.prefix, self.body = split_static_prefix(graph)
        self.qann = qann
        self.t = 0

    @property
    def neurons(self) -> dict[str, SpikingNeuron]:
        return {name: m for name, m in self.body.named_modules() if isinstance(m, SpikingNeuron)}

    def _temporal(self) -> list[TemporalModule]:
        return [m for m in self.modules() if isinstance(m, TemporalModule)]

    def reset(self) -> None:
        for module in self._temporal():
            module.reset()
        self.t = 0

    def encode_step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The input frame of step t for a static image x (direct encoding)."""
        return x if self.coding == "rate" or t == 0 else torch.zeros_like(x)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor) -> torch.Tensor:
        """One time step on an encoded input frame; returns this step's output contribution."""
        for module in self._temporal():
            module.set_window(self.t, 1)
        out = self.body(*self.prefix(x_t))
        self.t += 1
        return out

    def _broadcast(self, value: torch.Tensor, t0: int, steps: int) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            return value
        if self.coding == "rate":
            return value.unsqueeze(0).expand((steps,) + tuple(value.shape)).flatten(0, 1)
        frames = torch.zeros((steps,) + tuple(value.shape), dtype=value.dtype, device=value.device)
        if t0 == 0:
            frames[0] = value
        return frames.flatten(0, 1)

    def default_chunk(self, batch: int) -> int:
        return self.chunk_size or max(1, 1024 // max(batch, 1))

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, T_list: list[int] | None = None, *, chunk_size: int | None = None,
                 stop_when_quiet: bool = False, quiet_steps: int = 1) -> SimulationResult:
        T_list = sorted(set(T_list or [self.T]))
        for T in T_list:
            check_steps("every T", T)
        if stop_when_quiet and self.coding != "accumulate":
            raise ValueError("stop_when_quiet needs accumulate coding (neuron='signed'): a rate-coded "
                             "network keeps integrating its input, so a quiet step says nothing")
        chunk = chunk_size or (min(4, self.default_chunk(x.shape[0])) if stop_when_quiet else self.default_chunk(x.shape[0]))
        self.reset()
        batch = x.shape[0]
        for module in self._temporal():
            module.set_window(0, 1)
        static = self.prefix(x)
        neurons = self.neurons
        total: torch.Tensor | None = None
        outputs, spikes = {}, {}
        done_at = torch.full((batch,), T_list[-1], dtype=torch.long, device=x.device)
        quiet_run = torch.zeros(batch, dtype=torch.long, device=x.device)
        t = 0
        for T in T_list:
            while t < T and not (stop_when_quiet and bool((done_at < T_list[-1]).all())):
                steps = min(chunk, T - t)
                for module in self._temporal():
                    module.set_window(t, steps)
                out = self.body(*(self._broadcast(v, t, steps) for v in static))
                step_sum = out.reshape((steps, batch) + tuple(out.shape[1:])).sum(0)
                total = step_sum if total is None else total + step_sum
                if stop_when_quiet:
                    activity = sum((n.activity for n in neurons.values()), torch.zeros(steps, batch, device=x.device))
                    for j in range(steps):
                        quiet_run = (quiet_run + 1) * (activity[j] == 0)
                        newly = (quiet_run >= quiet_steps) & (done_at == T_list[-1])
                        done_at[newly] = t + j + 1
                t += steps
            outputs[T] = total / t if self.coding == "rate" else total.clone()
            spikes[T] = {name: n.spike_count.clone() for name, n in neurons.items() if n.spike_count is not None}
        return SimulationResult(outputs, spikes, torch.minimum(done_at, torch.tensor(t)), t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simulate(x, [self.T]).outputs[self.T]


def check_steps(what: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer number of time steps, got {value!r}")
