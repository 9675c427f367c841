"""Sizes of the exported ONNX files and the speed of the T-step model: onnxruntime (CPU) against
PyTorch's `snn(x)`, in images per second, on the shared ResNet-20 (calibrated on the shared data) and
on `mobilenet_v2_cifar` (random weights, thresholds calibrated on random images).

    python tools/onnx_speed.py [--batch 16] [--T-list 8,32] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ann2snn  # noqa: E402
from ann2snn.interop.onnx import FILE_NAMES, FORMATS, onnx_models, save_onnx  # noqa: E402
from ann2snn.io.data import ListFileDataset, cifar10_transform, make_loader, shared_dir  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402
from ann2snn.zoo import build_model  # noqa: E402

INPUT_SHAPE = (3, 32, 32)


def networks(batch: int) -> dict[str, tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]]:
    """name -> (model, calibration batches, a test batch)."""
    found = {}
    shared = shared_dir()
    checkpoint = shared / "models" / "resnet20-cifar10.th"
    if checkpoint.is_file():
        subsets = shared / "data" / "cifar10" / "subsets"
        calibration = [x for x, _ in make_loader(ListFileDataset(subsets / "train-calib-512.txt",
                                                                  transform=cifar10_transform()), 128)]
        test_data = ListFileDataset(subsets / "test-1000.txt", transform=cifar10_transform())
        test = next(iter(make_loader(test_data, batch)))[0]
        found["resnet20 (shared)"] = (load_model(checkpoint).model, calibration, test)
    else:
        print(f"({checkpoint} not found: the shared ResNet-20 is left out)")
    torch.manual_seed(0)
    found["mobilenet_v2_cifar (random)"] = (build_model("mobilenet_v2_cifar").eval(),
                                            [torch.randn(64, *INPUT_SHAPE) for _ in range(2)],
                                            torch.randn(batch, *INPUT_SHAPE))
    return found


def images_per_second(run: Callable[[], object], images: int, repeats: int) -> float:
    run()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return images / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--T-list", default="8,32")
    parser.add_argument("--threads", type=int, default=1, help="threads for both PyTorch and onnxruntime")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--neuron", default="signed-rate")
    args = parser.parse_args()
    T_list = [int(T) for T in args.T_list.split(",")]
    torch.set_num_threads(args.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads

    print(f"batch {args.batch}, {args.threads} thread(s), neuron {args.neuron}, onnxruntime {onnxruntime.__version__}, "
          f"torch {torch.__version__}")
    rows = ["| network | T | PyTorch img/s | onnxruntime img/s | speed-up | max rel. difference |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as directory:
        for name, (model, calibration, x) in networks(args.batch).items():
            snn = ann2snn.convert(model, calibration, qbits=4, T=max(T_list), neuron=args.neuron, per_channel=True,
                                  threshold_rule="percentile")
            sizes = {}
            for T in T_list:
                formats = FORMATS if T == T_list[0] else ("t-step",)
                for f, m in onnx_models(snn, formats, input_shape=INPUT_SHAPE, T=T).items():
                    sizes[f] = save_onnx(m, Path(directory) / FILE_NAMES[f]).stat().st_size / 1e6
                session = onnxruntime.InferenceSession(str(Path(directory) / FILE_NAMES["t-step"]), options,
                                                       providers=["CPUExecutionProvider"])
                feed = {"input": x.numpy()}
                with torch.no_grad():
                    expected = snn.simulate(x, [T]).outputs[T]
                    torch_speed = images_per_second(lambda: snn.simulate(x, [T]), len(x), args.repeats)
                got = torch.from_numpy(session.run(["output"], feed)[0])
                difference = float((got - expected).abs().max() / expected.abs().max())
                ort_speed = images_per_second(lambda: session.run(["output"], feed), len(x), args.repeats)
                rows.append(f"| {name} | {T} | {torch_speed:.1f} | {ort_speed:.1f} | {ort_speed / torch_speed:.2f} | "
                            f"{difference:.1e} |")
                print(rows[-1], flush=True)
            print(f"{name}: file sizes " + ", ".join(f"{FILE_NAMES[f]} {sizes[f]:.2f} MB" for f in FORMATS), flush=True)
    print("\n".join(rows))

if __name__ == "__main__":
    main()
