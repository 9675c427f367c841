"""Memory: what simulating a spiking network will take, how many time steps to fold into one chunk so
that it fits a limit, and how much a run actually used.

The simulator folds `chunk` time steps into the batch dimension, so its working memory grows with
batch x chunk while the neuron state grows with the batch alone. `simulation_footprint` measures both
per sample on a one-image, one-step run of the network; `plan_chunk_size` then picks the largest chunk
that fits a memory limit, or says, before any simulation, that the batch is too large."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
import torch.fx as fx

from ann2snn.runtime.layers import TemporalModule
from ann2snn.runtime.network import SpikingNetwork

try:
    import resource
except ImportError:  # Windows: no peak resident memory to read
    resource = None

MEBIBYTE = 2 ** 20
# The share of the memory available at the start that a run may plan to use when given no limit:
# the rest is head room for the data loader, the ANN and QANN references and the estimate's slack.
DEFAULT_SHARE_OF_AVAILABLE = 0.5
_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
_PROC_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    return 0


def megabytes(count: int | float) -> str:
    return f"{count / MEBIBYTE:.1f} MiB"


@dataclass(frozen=True)
class Footprint:
    """Bytes one sample occupies during a simulation: `state` for the whole run (the static prefix's
    values, membranes, spike counters, pooling sums) and `per_step` for each step of a chunk (the
    body's largest set of simultaneously live activations, plus one output's worth of scratch)."""

    state: int
    per_step: int

    def bytes_for(self, batch: int, chunk: int) -> int:
        return batch * (self.state + chunk * self.per_step)


class _SizeRecorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.sizes: dict[fx.Node, int] = {}

    def run_node(self, node: fx.Node) -> object:
        result = super().run_node(node)
        if node.op != "get_attr":  # weights are shared by all samples
            self.sizes[node] = _tensor_bytes(result)
        return result


def _peak_live_bytes(graph: fx.Graph, sizes: dict[fx.Node, int]) -> int:
    """The most bytes of node outputs alive at once when the graph runs in order (an output dies after its
    last reader). Inputs stay alive for the whole call: the caller holds them. Each node is charged once
    more for its own output while it runs, for the temporaries it makes on the way."""
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    dies_after: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if node.op != "placeholder":
            last = max((position[user] for user in node.users), default=position[node])
            dies_after.setdefault(last, []).append(node)
    live = peak = 0
    for index, node in enumerate(nodes):
        size = sizes.get(node, 0)
        peak = max(peak, live + 2 * size)
        live += size
        live -= sum(sizes.get(dead, 0) for dead in dies_after.get(index, []))
    return peak


@torch.no_grad()
def simulation_footprint(snn: SpikingNetwork, example: torch.Tensor) -> Footprint:
    """Per-sample memory of simulating `snn` on inputs like `example` ([batch, ...]; one sample is run).

    The network's simulation state is cleared afterwards."""
    temporal = [module for module in snn.modules() if isinstance(module, TemporalModule)]
    snn.reset()
    try:
        for module in temporal:
            module.set_window(0, 1)
        static = snn.prefix(example[:1])
        recorder = _SizeRecorder(snn.body)
        recorder.run(*static)
        state = _tensor_bytes(static) + sum(_tensor_bytes(list(vars(module).values())) for module in temporal)
        return Footprint(state=state, per_step=_peak_live_bytes(snn.body.graph, recorder.sizes))
    finally:
        snn.reset()


def plan_chunk_size(footprint: Footprint, batch: int, max_memory: int, preferred: int) -> int:
    """The most time steps per chunk, at most `preferred`, whose estimated memory for `batch` samples
    stays within `max_memory` bytes; a ValueError, before anything is simulated, when not even one step
    at a time fits."""
    room = max_memory - batch * footprint.state
    steps = room // (batch * footprint.per_step) if footprint.per_step else preferred
    if steps < 1:
        fitting = max_memory // (footprint.state + footprint.per_step)
        advice = (f"use batches of at most {fitting} images" if fitting else
                  "not even one image fits: raise the limit")
        raise ValueError(f"a batch of {batch} images needs about {megabytes(footprint.bytes_for(batch, 1))} to "
                         f"simulate one time step at a time, more than the memory limit of {megabytes(max_memory)}; "
                         f"{advice} (--batch-size, --max-memory on the command line)")
    return min(preferred, int(steps))


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup (v2) may still allocate, where it has a limit."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        used = int((_CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: free CUDA memory, or the system's available memory
    (capped by a container's cgroup limit); None where the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        match = re.search(r"MemAvailable:\s+(\d+) kB", _PROC_MEMINFO.read_text())
    except OSError:
        match = None
    candidates = [int(match[1]) * 1024] if match else []
    room = _cgroup_room()
    candidates += [room] if room is not None else []
    return min(candidates, default=None)


def default_memory_limit(device: torch.device) -> int | None:
    available = available_memory(device)
    return None if available is None else int(available * DEFAULT_SHARE_OF_AVAILABLE)


def _resident_peak_kib() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text())
    except OSError:
        return None
    return int(match[1]) if match else None


def _reset_resident_peak() -> bool:
    """Restart the kernel's record of this process's peak resident memory (Linux), so that it measures
    from now on; False where that is not possible."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _resident_peak_kib() is not None


class PeakMemory:
    """The peak memory used while the `with` block runs: on CUDA the most torch allocated on the device;
    on Linux the process's peak resident memory, restarted at entry; elsewhere (where the platform keeps
    it) the process's peak resident memory since it started. `measure` says which."""

    def __init__(self, device: torch.device):
        self.device = device
        self.measure = "unavailable"
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.measure = "CUDA memory allocated by torch"
        elif _reset_resident_peak():
            self.measure = "peak resident memory of the process"
        else:
            self.measure = "peak resident memory of the process since it started"
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            return
        peak_kib = _resident_peak_kib()
        if peak_kib is None:
            peak_kib = _max_rss_kib()
        self.bytes = None if peak_kib is None else peak_kib * 1024


def _max_rss_kib() -> int | None:
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, Linux and the BSDs kibibytes.
    return usage // 1024 if sys.platform == "darwin" else usage
