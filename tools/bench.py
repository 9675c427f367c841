"""Simulation speed and memory of converted networks, measured in one run, against the dense floor
(T forward passes of the ANN) and against SpikingJelly.

    python tools/bench.py [--models resnet20,mobilenet_v2_cifar] [--T-list 8,32,128] [--batches 1,64,256]
                          [--repeats 3] [--threads N] [--device cpu|cuda] [--no-spikingjelly] [--markdown FILE]

Sections (each a markdown table; `--markdown` also writes them, with the machine, to FILE):
- simulation: median seconds of `snn.simulate(x, [T])` over `--repeats` runs against T x the median
  seconds of one ANN forward pass on the same batch, in the same process (ratio 1.0 = the dense floor),
  for the model as given and for the model and batch in the memory layout the simulation uses on the
  device (`snn.SIMULATION_MEMORY_FORMAT`: channels-last on CPU), which is faster for the ANN too;
- SpikingJelly (`pip install -e '.[bench]'`): the same network converted by SpikingJelly's
  `RateCodingRecipe` with its best settings (channel-wise 99.9 % percentile thresholds, membranes starting
  at half threshold) and simulated its way, one `net(x)` per step after `functional.reset_net`; the ratio
  is its time over ours. SpikingJelly rejects functional ReLUs, `F.pad` and ReLU6, so it gets the model
  after our tracing and BatchNorm folding with those written as modules it accepts (`spikingjelly_model`):
  the same arithmetic (ReLU6 becomes ReLU, which costs the same);
- conversion: seconds of `ann2snn.convert` (trace, calibrate, balance) on 512 calibration images;
- memory: the peak memory of evaluating the SNN at the largest T and batch against the ANN's forward pass,
  both as growth of the process's peak resident memory over its resident memory at the start (CPU) or as
  CUDA memory allocated by torch, each measured on its own;
- adaptive time: signed neurons stopping once a sample is quiet (`stop_when_quiet`), on the shipped
  4-bit ResNet-20: mean steps used, accuracy against the QANN's, and the cost as a ratio to 32 ANN passes.

Models: `models/resnet20.pt` (trained here); `mobilenet_v2_cifar` with random weights (no trained
checkpoint ships; speed does not depend on the weights). Inputs and calibration images are CIFAR-10 from
the shared directory (ANN2SNN_SHARED, default ../shared) when present, else random images."""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ann2snn  # noqa: E402
from ann2snn.compiler.convert import prepare_pipeline  # noqa: E402
from ann2snn.compiler.quantizer import ClippedReLU  # noqa: E402
from ann2snn.evaluation.evaluate import device_name  # noqa: E402
from ann2snn.io.atomic import atomic_write  # noqa: E402
from ann2snn.io.data import ListFileDataset, cifar10_transform, make_loader, shared_dir  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402
from ann2snn.runtime.memory import PeakMemory  # noqa: E402
from ann2snn.runtime.network import SIMULATION_MEMORY_FORMAT  # noqa: E402
from ann2snn.zoo import build_model  # noqa: E402

IMAGE_SHAPE = (3, 32, 32)
CALIBRATION_IMAGES = 512
ADAPTIVE_T = 32
# Once the runs of a configuration have taken this long, it is not repeated further: the long runs
# (T=128 at batch 256) are also the least noisy.
LONG_RUN_SECONDS = 20.0


class Images:
    """Calibration and evaluation images: CIFAR-10 subsets when the shared data is there, else random."""

    def __init__(self, largest_batch: int):
        subsets = shared_dir() / "data" / "cifar10" / "subsets"
        if (subsets / "test-1000.txt").is_file():
            self.source = "CIFAR-10 (shared test-1000 and train-calib-512 subsets)"
            transform = cifar10_transform()
            self.calibration = [x for x, _ in make_loader(ListFileDataset(subsets / "train-calib-512.txt",
                                                                          transform=transform), 128)]
            test = make_loader(ListFileDataset(subsets / "test-1000.txt", transform=transform), 1000)
            self.test, self.labels = next(iter(test))
        else:
            self.source = "random images (shared data not found)"
            generator = torch.Generator().manual_seed(0)
            self.calibration = [torch.randn(128, *IMAGE_SHAPE, generator=generator) for _ in range(4)]
            self.test, self.labels = torch.randn(max(largest_batch, 256), *IMAGE_SHAPE, generator=generator), None

    def batch(self, size: int) -> torch.Tensor:
        repeats = -(-size // self.test.shape[0])
        return self.test.repeat(repeats, 1, 1, 1)[:size]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each run after one warm-up call each (kernel compilation, allocator growth).
    The runs take turns, so a change in the machine's load during the measurement (another process,
    frequency scaling) reaches all of them alike and their ratios stay meaningful."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
        if max(sum(values) for values in times.values()) > LONG_RUN_SECONDS:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def trained_resnet20(device: torch.device) -> nn.Module:
    return load_model(REPO / "models" / "resnet20.pt").model.eval().to(device)


def random_mobilenet_v2(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model("mobilenet_v2_cifar").eval().to(device)


MODELS: dict[str, Callable[[torch.device], nn.Module]] = {
    "resnet20": trained_resnet20,
    "mobilenet_v2_cifar": random_mobilenet_v2,
}


# --- SpikingJelly ------------------------------------------------------------------------------------

def _identity_subsample_conv(pad_node: fx.Node, channels: int) -> nn.Conv2d:
    """The option-A shortcut `F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))` as a fixed 1x1 convolution of
    stride 2 that copies channel c to channel p + c and leaves the padding channels zero."""
    pad = pad_node.args[1]
    before, after = pad[4], pad[5]
    conv = nn.Conv2d(channels, before + channels + after, kernel_size=1, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(channels):
            conv.weight[before + c, c, 0, 0] = 1.0
    return conv


def _is_option_a_shortcut(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not F.pad or len(node.args[1]) != 6 or any(node.args[1][:4]):
        return False
    source = node.args[0]
    return (isinstance(source, fx.Node) and source.op == "call_function" and source.target.__name__ == "getitem"
            and source.args[1] == (slice(None), slice(None), slice(None, None, 2), slice(None, None, 2)))


def _node_values(graph: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, object]:
    """What every node computes on `example` (shapes, and sizes read from them)."""
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            values[node] = super().run_node(node)
            return values[node]

    Recorder(graph).run(example)
    return values


def spikingjelly_model(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """`model` traced and normalised by ann2snn (BatchNorm folded, every ReLU a module), in the forms
    SpikingJelly's converter accepts: ReLU modules, the option-A shortcut as a fixed strided 1x1
    convolution, average pooling as a module. Outputs equal the model's (ReLU6 aside, see the module
    docstring)."""
    graph = prepare_pipeline(example[:1]).run(model)
    for name, module in list(graph.named_modules()):
        if isinstance(module, ClippedReLU):
            graph.add_submodule(name, nn.ReLU())
    values = _node_values(graph, example[:1])
    for node in list(graph.graph.nodes):
        if _is_option_a_shortcut(node):
            source = node.args[0].args[0]
            name = f"{node.name}_conv"
            graph.add_submodule(name, _identity_subsample_conv(node, values[source].shape[1]).to(example.device))
            with graph.graph.inserting_before(node):
                node.replace_all_uses_with(graph.graph.call_module(name, (source,)))
        elif node.op == "call_function" and node.target is F.avg_pool2d:
            name = f"{node.name}_module"
            arguments = fx.node.map_arg((node.args[1:], node.kwargs), lambda argument: values[argument])
            graph.add_submodule(name, nn.AvgPool2d(*arguments[0], **arguments[1]))
            with graph.graph.inserting_before(node):
                node.replace_all_uses_with(graph.graph.call_module(name, node.args[:1]))
    graph.graph.eliminate_dead_code()
    graph.graph.lint()
    graph.recompile()
    return graph


class SpikingJelly:
    """SpikingJelly's conversion and simulation of a model (None when it is not installed)."""

    def __init__(self):
        import importlib.metadata

        from spikingjelly.activation_based import ann2snn as conversion
        from spikingjelly.activation_based import functional
        self.conversion, self.functional = conversion, functional
        self.version = importlib.metadata.version("spikingjelly")

    def convert(self, model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
        rewritten = spikingjelly_model(model, calibration[0])
        recipe = self.conversion.RateCodingRecipe([(x, None) for x in calibration], mode="99.9%",
                                                  channel_wise=True, half_threshold=True)
        with _quiet_progress_bars():
            return self.conversion.Converter(recipe).convert(rewritten).eval()

    def simulate(self, net: nn.Module, x: torch.Tensor, T: int) -> torch.Tensor:
        self.functional.reset_net(net)
        total = net(x)
        for _ in range(T - 1):
            total += net(x)
        return total / T


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """SpikingJelly's calibration draws a tqdm bar per call; the benchmark prints tables only."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def spikingjelly_or_reason() -> tuple[SpikingJelly | None, str]:
    try:
        return SpikingJelly(), ""
    except ImportError as error:
        return None, f"SpikingJelly not installed ({error}); `pip install -e '.[bench]'` adds it"


# --- measurements ------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def simulation_section(name: str, model: nn.Module, snn: ann2snn.SpikingNetwork, images: Images,
                       args: argparse.Namespace, jelly: SpikingJelly | None) -> str:
    header = HEADER + (JELLY_HEADER if jelly else [])
    jelly_net = jelly.convert(model, images.calibration) if jelly else None
    # The floor as the user's model runs, and as it would run in the layout our simulation uses.
    layout = SIMULATION_MEMORY_FORMAT.get(args.device.type, torch.contiguous_format)
    model_in_layout = copy.deepcopy(model).to(memory_format=layout)
    rows = []
    for batch in args.batches:
        x = images.batch(batch).to(args.device)
        x_in_layout = x.contiguous(memory_format=layout)
        with torch.no_grad():
            for T in args.T_list:
                runs = {"ann": lambda: model(x), "ann_in_layout": lambda: model_in_layout(x_in_layout),
                        "ours": lambda: snn.simulate(x, [T])}
                if jelly_net is not None:
                    runs["theirs"] = lambda: jelly.simulate(jelly_net, x, T)
                seconds = interleaved_medians(runs, args.repeats, args.device)
                ann_seconds, ours = seconds["ann"], seconds["ours"]
                row = [name, batch, T, f"{ann_seconds * 1e3:.2f}", f"{ours:.3f}", f"{ours / (T * ann_seconds):.3f}",
                       f"{ours / (T * seconds['ann_in_layout']):.3f}", f"{batch / ours:.1f}"]
                if jelly_net is not None:
                    row += [f"{seconds['theirs']:.3f}", f"{seconds['theirs'] / ours:.2f}"]
                rows.append(row)
                print(table(header, [row]).splitlines()[-1], flush=True)
    return table(header, rows)


# The networks simulated: the default recipe with the bias calibration, whose graph is the weight calibration's (that
# changes weights and biases, not layers), so a step costs the same, at a fraction of the conversion time; the
# conversion section times the default itself.
SIMULATED_RECIPE = {"snn_calibration": "bias"}
HEADER = ["model", "batch", "T", "ANN ms", "SNN s", "SNN / (T x ANN)", "SNN / (T x ANN in SNN layout)", "SNN img/s"]
JELLY_HEADER = ["SpikingJelly s", "SpikingJelly / ours"]


def conversion_seconds(model: nn.Module, images: Images) -> float:
    start = time.perf_counter()
    ann2snn.convert(model, images.calibration)
    return time.perf_counter() - start


def resident_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def peak_growth(run: Callable[[], object], device: torch.device) -> int:
    """Bytes by which the peak memory while `run` runs exceeds what was in use when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resident_bytes()
    with PeakMemory(device) as peak:
        run()
    return peak.bytes - before


def measure_memory(name: str, batch: int, T: int, device: torch.device) -> None:
    """(run in a child process, see `memory_row`) Print the peak memory growth of the ANN's forward pass
    and of the SNN's simulation, as JSON."""
    images = Images(batch)
    model = MODELS[name](device)
    snn = ann2snn.convert(model, images.calibration, **SIMULATED_RECIPE).to(device)
    x = images.batch(batch).to(device)
    with torch.no_grad():
        model(x), snn.simulate(x, [1])  # first-call costs (kernel compilation, plans) are not measured
        print(json.dumps({"ann": peak_growth(lambda: model(x), device),
                          "snn": peak_growth(lambda: snn.simulate(x, [T]), device)}))


def memory_row(name: str, args: argparse.Namespace) -> list[object]:
    """Peak memory at the largest batch and T, measured in a child process in which glibc returns every
    large block to the system when it is freed (MALLOC_MMAP_THRESHOLD_), so that the resident memory
    follows what is live rather than what the allocator keeps."""
    batch, T = max(args.batches), max(args.T_list)
    if args.device.type != "cuda" and not Path("/proc/self/clear_refs").exists():
        return [name, batch, T, "unavailable (needs Linux /proc)", "", ""]
    command = [sys.executable, __file__, "--memory-of", name, "--batches", str(batch), "--T-list", str(T),
               "--device", str(args.device), "--threads", str(torch.get_num_threads())]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    ann, ours = measured["ann"], measured["snn"]
    # a tiny batch's ANN pass can fit in memory the process already holds: no growth, no ratio
    ratio = f"{ours / ann:.2f}" if ann > 0 else "– (the ANN pass grew no memory)"
    return [name, batch, T, f"{ann / 2**20:.1f}", f"{ours / 2**20:.1f}", ratio]


def adaptive_time_section(images: Images, args: argparse.Namespace) -> str:
    """Signed neurons stopping when quiet, on the shipped 4-bit fine-tuned ResNet-20."""
    loaded = load_model(REPO / "models" / "resnet20-q4.pt")
    model = loaded.model.eval().to(args.device)
    thresholds = loaded.quantization["thresholds"] if loaded.quantization else None
    snn = ann2snn.convert(model, images.calibration, qbits=4, T=ADAPTIVE_T, neuron="signed",
                          max_spikes_per_step=2, thresholds=thresholds).to(args.device)
    batch = 64 if 64 in args.batches else max(args.batches)
    x = images.batch(batch).to(args.device)
    rows = []
    with torch.no_grad():
        qann_prediction = snn.qann(x).argmax(1)
        seconds = interleaved_medians({
            "ann": lambda: model(x),
            False: lambda: snn.simulate(x, [ADAPTIVE_T]),
            True: lambda: snn.simulate(x, [ADAPTIVE_T], stop_when_quiet=True)}, args.repeats, args.device)
        ann_seconds = seconds["ann"]
        for stop in (False, True):
            result = snn.simulate(x, [ADAPTIVE_T], stop_when_quiet=stop)
            prediction = result.outputs[ADAPTIVE_T].argmax(1)
            accuracy = "" if images.labels is None else \
                f"{(prediction.cpu() == images.labels[:batch]).float().mean() * 100:.1f} %"
            rows.append(["stop when quiet" if stop else f"fixed T={ADAPTIVE_T}", batch,
                         f"{result.steps_used.float().mean():.1f}", f"{seconds[stop]:.3f}",
                         f"{seconds[stop] / (ADAPTIVE_T * ann_seconds):.3f}",
                         f"{(prediction == qann_prediction).float().mean() * 100:.1f} %", accuracy])
        qann_accuracy = "" if images.labels is None else \
            f"{(qann_prediction.cpu() == images.labels[:batch]).float().mean() * 100:.1f} %"
    rows.append(["QANN", batch, "", "", "", "100.0 %", qann_accuracy])
    return table(["signed, bursts <= 2", "batch", "mean steps", "s", f"s / ({ADAPTIVE_T} x ANN)",
                  "same prediction as QANN", "accuracy"], rows)


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda text: text.split(","), default=list(MODELS))
    parser.add_argument("--T-list", type=_int_list, default=[8, 32, 128])
    parser.add_argument("--batches", type=_int_list, default=[1, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--no-spikingjelly", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--memory-of", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        measure_memory(args.memory_of, args.batches[0], args.T_list[0], args.device)
        return
    images = Images(max(args.batches))
    jelly, why_not = (None, "--no-spikingjelly") if args.no_spikingjelly else spikingjelly_or_reason()
    header = [f"# ann2snn benchmark, {datetime.date.today()}", "",
              f"Machine: {machine(args.device)}, device {args.device}. Images: {images.source}.",
              "SpikingJelly: " + (f"{jelly.version}" if jelly else f"left out: {why_not}"), ""]
    print("\n".join(header), flush=True)
    sections = []
    simulation_rows, memory_rows, conversion_rows = [], [], []
    for name in args.models:
        model = MODELS[name](args.device)
        conversion = conversion_seconds(model, images)
        conversion_rows.append([name, CALIBRATION_IMAGES if len(images.calibration) == 4 else "", f"{conversion:.1f}"])
        print(f"{name}: converted in {conversion:.1f} s", flush=True)
        snn = ann2snn.convert(model, images.calibration, **SIMULATED_RECIPE).to(args.device)
        simulation_rows.append(simulation_section(name, model, snn, images, args, jelly))
        memory_rows.append(memory_row(name, args))
    sections.append("## Simulation (IF neurons, 4 bits)\n\n" + "\n\n".join(simulation_rows))
    sections.append("## Conversion (trace + calibrate + balance)\n\n"
                    + table(["model", "calibration images", "seconds"], conversion_rows))
    sections.append("## Peak memory, SNN evaluation vs ANN forward\n\n"
                    + table(["model", "batch", "T", "ANN MiB", "SNN MiB", "SNN / ANN"], memory_rows))
    sections.append("## Adaptive time\n\n" + adaptive_time_section(images, args))
    report = "\n".join(header) + "\n" + "\n\n".join(sections) + "\n"
    print(report)
    if args.markdown:
        atomic_write(args.markdown, report.encode())


if __name__ == "__main__":
    main()
