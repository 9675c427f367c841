"""What block reconstruction (`ann2snn.compiler.passes.reconstruct_blocks`) adds to the post-training QANN: its
accuracy on test-1000 at each bit width, calibrated on train-calib-512, without and with each method, and the
seconds `ann2snn.quantize` takes (threshold calibration included), on one torch thread.

    python tools/reconstruction.py [--models resnet20,resnet56] [--bits 2,3,4] [--methods none,weights]
                                   [--eval-size N]

The QANN is the one `ann2snn.quantize` gives (thresholds for the quantizers' own 2**bits - 1 levels, per layer,
mse rule): the one a conversion with `--threshold-levels bits` reproduces. Prints a markdown table."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared_subsets import calibration_inputs, test_batches  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.compiler.passes.reconstruct_blocks import RECONSTRUCTIONS  # noqa: E402
from ann2snn.evaluation.statistics import accuracy_interval  # noqa: E402
from ann2snn.io.data import shared_dir  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402
from ann2snn.training.finetune import accuracy  # noqa: E402

MODELS = {"resnet20": "resnet20-cifar10.th", "resnet56": "resnet56-cifar10-chenyaofo.pt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"of: {', '.join(MODELS)}")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--methods", default="none,weights", help=f"of: {', '.join(RECONSTRUCTIONS)}")
    parser.add_argument("--eval-size", type=int, help="a stratified subset of test-1000")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, ann2snn {ann2snn.__version__}, {torch.get_num_threads()} thread")
    print("| model | ANN | bits | reconstruction | QANN (95 % interval) | quantize s |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        loaded = load_model(shared_dir() / "models" / MODELS[name])
        calibration = calibration_inputs(loaded.preprocessing)
        batches = test_batches(loaded.preprocessing, args.eval_size)
        images = sum(len(y) for _, y in batches)
        ann = accuracy(loaded.model, batches)
        for bits in (int(bits) for bits in args.bits.split(",")):
            for method in args.methods.split(","):
                start = time.perf_counter()
                qann = ann2snn.quantize(loaded.model, calibration, qbits=bits, reconstruction=method)
                seconds = time.perf_counter() - start
                qann_accuracy = accuracy(qann, batches)
                low, high = accuracy_interval(qann_accuracy / 100, images)
                print(f"| {name} | {ann:.1f} | {bits} | {method} | {qann_accuracy:.1f} "
                      f"({100 * low:.1f}-{100 * high:.1f}) | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
