"""How far a post-training QANN's accuracy moves when its calibration sees the float noise another machine makes:
the spread an accuracy-regression tolerance (`ann2snn baseline record --accuracy-tolerance`) must cover.

    python tools/calibration_spread.py CHECKPOINT [--arch NAME] [--qbits 4] [--T 32] [--runs 4]
                                       [--noise 1e-6] [--eval-size 500]

Another CPU (other kernels, other summation order) changes activations in their last bits. The per-channel
threshold search picks among close candidates, so a few channels move by a candidate step and the accuracy on a
fixed evaluation set moves by more than its rounding suggests. Run 0 calibrates on the calibration images as
they are; every other run multiplies each pixel by (1 + noise * N(0, 1)), a different draw each, which is about
the rounding another machine makes after a few dozen layers. The QANN is the one the default conversion judges
the SNN against (thresholds for the T levels of `ann2snn.ConversionConfig`). Data: `<shared>` (ANN2SNN_SHARED),
calibration on train-calib-512, evaluation on a stratified subset of test-1000 (seed 0, as the baselines).
Prints a markdown table and the spread."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ann2snn  # noqa: E402
from ann2snn.io.data import ListFileDataset, make_loader, shared_dir, stratified_subset  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402
from ann2snn.training.finetune import accuracy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--arch")
    parser.add_argument("--qbits", type=int, default=4)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--noise", type=float, default=1e-6, help="relative standard deviation of the noise")
    parser.add_argument("--eval-size", type=int, default=500)
    args = parser.parse_args()
    loaded = load_model(args.checkpoint, arch=args.arch)
    transform = loaded.preprocessing.transform()
    subsets = shared_dir() / "data" / "cifar10" / "subsets"
    calibration = [x for x, _ in make_loader(ListFileDataset(subsets / "train-calib-512.txt", transform=transform))]
    test = stratified_subset(ListFileDataset(subsets / "test-1000.txt", transform=transform), args.eval_size, seed=0)
    batches = list(make_loader(test))
    config = ann2snn.ConversionConfig.from_dict({"qbits": args.qbits, "T": args.T})
    print(f"{args.checkpoint.name}: torch {torch.__version__}, ann2snn {ann2snn.__version__}, qbits {args.qbits}, "
          f"T {args.T}, noise {args.noise:g}, {len(test)} images")
    print("| run | calibration images | QANN % |\n|---|---|---|")
    accuracies = []
    for run in range(args.runs):
        generator = torch.Generator().manual_seed(run)
        noisy = [x * (1 + args.noise * torch.randn(x.shape, generator=generator)) if run else x for x in calibration]
        accuracies.append(accuracy(ann2snn.quantize(loaded.model, noisy, config), batches))
        print(f"| {run} | {'as they are' if run == 0 else 'with noise'} | {accuracies[-1]:.1f} |", flush=True)
    print(f"spread: {min(accuracies):.1f} - {max(accuracies):.1f} % ({max(accuracies) - min(accuracies):.1f} points); "
          f"run 0 is {accuracies[0] - min(accuracies):.1f} points above the lowest")


if __name__ == "__main__":
    main()
