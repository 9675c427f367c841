"""The spiking network: a converted graph plus its simulator."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ann2snn.runtime.coding import Coding
from ann2snn.runtime.coding import coding as coding_named
from ann2snn.runtime.kernels import DEFAULT_KERNELS, check_kernels
from ann2snn.runtime.layers import AddBias, TemporalModule
from ann2snn.runtime.neurons import SpikingNeuron

_SHAPE_QUERIES = {"size", "dim"}
# What `plan` aims at for the largest activation of one body call: small enough that the neuron update
# finds in cache the current the convolution before it has just written, large enough that the Python
# cost of a call is spread over many rows. Measured (2-core EPYC, SNN time / (T x ANN time) at batch 64,
# IF neurons): ResNet-20, T=32, 2 threads: 1 MiB 1.59, 2 MiB 1.26, 4 MiB 1.11, 8 MiB 1.18;
# MobileNetV2-CIFAR, T=2, 1 thread: 1 MiB 0.74, 4 MiB 0.41, 8 MiB 0.43.
WORKING_SET_BYTES = 4 << 20
# Layout of image-shaped (4-D) activations during simulation, by device type. On CPU oneDNN runs
# convolutions on channels-last tensors without the reorders NCHW ones need: measured (2-core EPYC,
# 2 threads, batch 64), the 3x3 convolutions of ResNet-20 take 10-30 % less time on spikes.
SIMULATION_MEMORY_FORMAT = {"cpu": torch.channels_last}
# With stop_when_quiet, the network is checked for quiet after every chunk: short chunks stop sooner.
QUIET_CHECK_STEPS = 4


@dataclass
class SimulationResult:
    """What one simulation up to max(T_list) produced.

    outputs[T]: the network output after T steps (for rate coding the time average over the read-out window,
    steps `readout_start(T)` .. T - 1; for accumulate coding the sum);
    spikes[T][layer]: spikes per sample emitted by that neuron layer during the first T steps;
    steps_used: per sample, the steps simulated before its output was final (T_max without
    `stop_when_quiet`)."""

    outputs: dict[int, torch.Tensor]
    spikes: dict[int, dict[str, torch.Tensor]]
    steps_used: torch.Tensor
    steps_simulated: int = 0


def _is_temporal_dynamic(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Nodes that must see the time-folded tensors: stateful spiking modules and shape queries."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, TemporalModule) and not isinstance(module, AddBias)
    if node.op == "call_method" and node.target in _SHAPE_QUERIES:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


class _ActivationSizes(fx.Interpreter):
    """Runs a graph to record its largest output, without module hooks (measuring must not count as a
    use, e.g. for operation counters) and without neuron dynamics (a neuron's output is shaped like its
    input)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.largest = 0

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        return args[0] if isinstance(module, SpikingNeuron) else module.forward(*args, **kwargs)

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor) and node.op != "get_attr":
            self.largest = max(self.largest, result.numel() * result.element_size())
        return result


class _ChunkInputs:
    """The body's inputs for each chunk: the static prefix's values as the coding frames them
    (`Coding.frames`: repeated at every step, or given at step 0 only). Rows are step-major, so a chunk
    shorter than the longest takes the leading rows of frames built once per sub-batch and pattern of
    injected steps (the body never writes its inputs)."""

    def __init__(self, values: tuple, coding: Coding, chunk: int, batch: int):
        self.values, self.coding, self.chunk, self.batch = values, coding, chunk, batch
        self._built: dict[int, tuple] = {}

    def frames(self, t0: int, steps: int) -> tuple:
        # frames depend on t0 only through how many leading steps receive the values
        injected = self.coding.injected_steps(t0, self.chunk)
        if injected not in self._built:
            self._built[injected] = tuple(
                self.coding.frames(value, t0, self.chunk) if isinstance(value, torch.Tensor) else value
                for value in self.values)
        return tuple(frames[:steps * self.batch] if isinstance(frames, torch.Tensor) else frames
                     for frames in self._built[injected])


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

    def __init__(self, graph: fx.GraphModule, T: int, coding: Coding | str, qann: nn.Module | None = None,
                 chunk_size: int | None = None, config: dict | None = None, kernels: str = DEFAULT_KERNELS,
                 readout_delay: float = 0.0):
        super().__init__()
        self.coding = coding_named(coding)
        check_steps("T", T)
        self.T = T
        self.readout_delay = check_readout_delay(readout_delay, self.coding)
        self.kernels = kernels
        self.chunk_size = chunk_size
        self.config = dict(config or {})
        self.prefix, self.body = split_static_prefix(graph)
        self.qann = qann
        self.t = 0

    def __setstate__(self, state: dict) -> None:
        # networks saved before codings were objects hold the coding's name, and no kernels setting
        super().__setstate__(state)
        self.coding = coding_named(self.coding)
        self.__dict__.setdefault("_kernels", DEFAULT_KERNELS)
        self.__dict__.setdefault("readout_delay", 0.0)

    def readout_start(self, T: int) -> int:
        """The first step the read-out counts after T steps: rate-coded neurons fire their first spikes
        late and unevenly while the layers before them settle, so the outputs of the first
        `readout_delay` x T steps (rounded down) are left out of the average. Every step still runs and
        spikes (latency and energy count all T)."""
        return int(T * self.readout_delay)

    @property
    def kernels(self) -> str:
        """How the neurons run their multi-step update: "auto", "native", "compiled" or "eager" (see
        `ann2snn.runtime.kernels`; every setting gives the same spikes). Default "auto", or "eager" where
        the environment says ANN2SNN_FUSED_NEURONS=0."""
        return self._kernels

    @kernels.setter
    def kernels(self, kernels: str) -> None:
        self._kernels = check_kernels(kernels)

    def _prepare_neurons(self) -> None:
        for neuron in self.neurons.values():
            neuron.kernels = self._kernels

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
        """The input frame of step t for a static image x: the image at every step (rate coding; a spike
        encoding's `InputEncoder` inside the network makes the spikes) or at step 0 only (accumulate coding)."""
        return self.coding.frame(x, t)

    def in_simulation_layout(self, x: torch.Tensor) -> torch.Tensor:
        """x, and the convolution weights, in the layout that simulates fastest on x's device (see
        SIMULATION_MEMORY_FORMAT); the values are the same, the order of a convolution's sums may differ."""
        memory_format = SIMULATION_MEMORY_FORMAT.get(x.device.type)
        if memory_format is None or x.dim() != 4:
            return x
        for part in (self.prefix, self.body):
            for module in part.modules():
                if isinstance(module, nn.Conv2d) and not module.weight.is_contiguous(memory_format=memory_format):
                    module.weight.data = module.weight.data.contiguous(memory_format=memory_format)
        return x.contiguous(memory_format=memory_format)

    @torch.no_grad()
    def step(self, x_t: torch.Tensor) -> torch.Tensor:
        """One time step on an encoded input frame; returns this step's output contribution."""
        self._prepare_neurons()
        for module in self._temporal():
            module.set_window(self.t, 1)
        out = self.body(*self.prefix(self.in_simulation_layout(x_t)))
        self.t += 1
        return out

    @torch.no_grad()
    def run_all_steps(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """The outputs of steps 0 .. steps - 1 on the static batch x ([steps * batch, ...]), from one call of the
        body: every layer sees all steps of its input at once, which layer-by-layer calibration relies on
        (see `ann2snn.compiler.passes.calibrate_spiking`). Memory grows with steps x batch."""
        check_steps("steps", steps)
        self.reset()
        self._prepare_neurons()
        for module in self._temporal():
            module.set_window(0, steps)
        x = self.in_simulation_layout(x)
        try:
            return self.body(*_ChunkInputs(self.prefix(x), self.coding, steps, x.shape[0]).frames(0, steps))
        finally:
            self.reset()

    def default_chunk(self, batch: int) -> int:
        """The most time steps one body call may fold together for `batch` samples (the simulator may
        fold fewer, see `plan`)."""
        return self.chunk_size or max(1, 1024 // max(batch, 1))

    def largest_activation(self, x: torch.Tensor) -> int:
        """Bytes of the largest tensor one sample makes in one step of the body, for inputs like x."""
        # (made here rather than in __init__: networks saved before it existed load without it)
        cache = self.__dict__.setdefault("_activation_bytes", {})
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in cache:
            self.reset()
            try:
                for module in self._temporal():
                    module.set_window(0, 1)
                probe = _ActivationSizes(self.body)
                probe.run(*_ActivationSizes(self.prefix).run(x[:1]))
                cache[key] = max(1, probe.largest)
            finally:
                self.reset()
        return cache[key]

    def plan(self, x: torch.Tensor, chunk_size: int | None = None, sub_batch: int | None = None) -> tuple[int, int]:
        """(samples per sub-batch, time steps per chunk) for simulating x: body calls whose largest
        activation is about WORKING_SET_BYTES, so that each layer's output is still in cache when the
        next reads it, and the network's state grows with the sub-batch, not with the batch. A chunk has
        at most `chunk_size` (default `default_chunk`) steps."""
        batch = min(sub_batch or x.shape[0], x.shape[0])
        rows = max(1, WORKING_SET_BYTES // self.largest_activation(x))
        steps = max(1, min(chunk_size or self.default_chunk(batch), rows // batch))
        return sub_batch or min(batch, max(1, rows // steps)), steps

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, T_list: list[int] | None = None, *, chunk_size: int | None = None,
                 stop_when_quiet: bool = False, quiet_steps: int = 1,
                 sub_batch: int | None = None, on_chunk: Callable[[int], None] | None = None) -> SimulationResult:
        """Simulate max(T_list) steps on the static input batch x, the outputs at every T of T_list.

        The batch is simulated in sub-batches of `sub_batch` samples, each in chunks of at most
        `chunk_size` time steps folded into one body call (see `plan`); results do not depend on either.
        With `stop_when_quiet` (accumulate coding) a sub-batch stops once all its samples are quiet.
        `on_chunk`, if given, is called after every chunk with the sample-steps it simulated (steps x samples),
        for progress bars."""
        T_list = sorted(set(T_list or [self.T]))
        for T in T_list:
            check_steps("every T", T)
        if chunk_size is not None:
            check_steps("chunk_size", chunk_size)
        if sub_batch is not None and (not isinstance(sub_batch, int) or isinstance(sub_batch, bool) or sub_batch < 1):
            raise ValueError(f"sub_batch must be a positive number of samples, got {sub_batch!r}")
        if stop_when_quiet and not self.coding.settles:
            raise ValueError("stop_when_quiet needs accumulate coding (neuron='signed'): a rate-coded "
                             "network keeps integrating its input, so a quiet step says nothing")
        if stop_when_quiet and chunk_size is None:
            chunk_size = QUIET_CHECK_STEPS
        x = self.in_simulation_layout(x)
        samples, steps = self.plan(x, chunk_size, sub_batch)
        parts = [self._simulate_samples(x[i:i + samples], T_list, steps, stop_when_quiet, quiet_steps, on_chunk)
                 for i in range(0, x.shape[0], samples)]
        if len(parts) == 1:
            return parts[0]
        return SimulationResult(
            outputs={T: torch.cat([part.outputs[T] for part in parts]) for T in T_list},
            spikes={T: {name: torch.cat([part.spikes[T][name] for part in parts]) for name in parts[0].spikes[T]}
                    for T in T_list},
            steps_used=torch.cat([part.steps_used for part in parts]),
            steps_simulated=max(part.steps_simulated for part in parts))

    def _simulate_samples(self, x: torch.Tensor, T_list: list[int], chunk: int, stop_when_quiet: bool,
                          quiet_steps: int, on_chunk: Callable[[int], None] | None) -> SimulationResult:
        self.reset()
        self._prepare_neurons()
        batch = x.shape[0]
        temporal = self._temporal()
        for module in temporal:
            module.set_window(0, 1)
        inputs = _ChunkInputs(self.prefix(x), self.coding, chunk, batch)
        neurons = self.neurons
        total: torch.Tensor | None = None
        outputs, spikes = {}, {}
        done_at = torch.full((batch,), T_list[-1], dtype=torch.long, device=x.device)
        quiet_run = torch.zeros(batch, dtype=torch.long, device=x.device)
        t = 0
        # the read-out subtracts the sum at a T's readout_start from the sum at T
        starts = {T: self.readout_start(T) for T in T_list}
        totals: dict[int, torch.Tensor | int] = {0: 0}
        for stop in sorted(set(T_list) | set(starts.values()) - {0}):
            while t < stop and not (stop_when_quiet and bool((done_at < T_list[-1]).all())):
                steps = min(chunk, stop - t)
                for module in temporal:
                    module.set_window(t, steps)
                out = self.body(*inputs.frames(t, steps))
                step_sum = out.reshape((steps, batch) + tuple(out.shape[1:])).sum(0)
                total = step_sum if total is None else total + step_sum
                if stop_when_quiet:
                    activity = sum((n.activity for n in neurons.values()), torch.zeros(steps, batch, device=x.device))
                    for j in range(steps):
                        quiet_run = (quiet_run + 1) * (activity[j] == 0)
                        newly = (quiet_run >= quiet_steps) & (done_at == T_list[-1])
                        done_at[newly] = t + j + 1
                t += steps
                if on_chunk is not None:
                    on_chunk(steps * batch)
            totals[stop] = total  # (never changed in place: each chunk's sum makes a new tensor)
            if stop in starts:
                outputs[stop] = self.coding.read_out(totals[stop] - totals[starts[stop]], t - starts[stop])
                spikes[stop] = {name: n.spike_count.clone() for name, n in neurons.items() if n.spike_count is not None}
        return SimulationResult(outputs, spikes, torch.minimum(done_at, torch.tensor(t)), t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.simulate(x, [self.T]).outputs[self.T]


def check_readout_delay(delay, coding: Coding) -> float:
    """A read-out delay as a fraction of T: in [0, 1), and 0 where the coding sums every step's output."""
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay < 1:
        raise ValueError(f"the read-out delay must be a fraction of T in [0, 1), got {delay!r}")
    if delay and not coding.averages:
        raise ValueError(f"a read-out delay needs rate coding: {coding} coding sums every step's output "
                         f"(it settles on the QANN's value), got {delay!r}")
    return float(delay)


def check_steps(what: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer number of time steps, got {value!r}")
