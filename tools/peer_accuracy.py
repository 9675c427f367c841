"""Accuracy of SpikingJelly's conversion of a model against ours, both measured by our evaluator on the
same images.

    python tools/peer_accuracy.py [--checkpoint models/resnet20.pt] [--eval-size 500] [--T-list 16,32] [--data DATA]

SpikingJelly (its `RateCodingRecipe` with channel-wise 99.9 % thresholds and half-threshold membranes, on
the model rewritten into forms it accepts, see `tools/bench.py`) converts the model with the 512 shared
calibration images; `ann2snn.interop.spikingjelly.from_spikingjelly` imports its network, which then runs through
`ann2snn.evaluate` (accuracy, spikes and synaptic operations per image) beside our default conversion
(the default recipe, converted once at the largest T) on the stratified test subset `ann2snn convert --eval-size
N` uses, or on all of `--data` (e.g. `<shared>/data/cifar10/subsets/test-1000.txt`, where the README's figures
come from)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import Images, SpikingJelly, table  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.evaluation.evaluate import EvaluationReport  # noqa: E402
from ann2snn.interop.spikingjelly import from_spikingjelly  # noqa: E402
from ann2snn.io.data import cifar10_transform, make_loader, open_dataset, shared_dir, stratified_subset  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402


def row(name: str, report: EvaluationReport, T_list: list[int]) -> list[object]:
    return [name] + [f"{report.accuracy_snn[T] * 100:.1f} %" for T in T_list] + \
        [f"{report.spikes_per_image[T] / 1e3:.0f} k" for T in T_list] + \
        [f"{report.synops_per_image[T_list[-1]] / 1e6:.1f} M", f"{report.snn_macs_per_image[T_list[-1]] / 1e6:.1f} M"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path,
                        default=Path(__file__).resolve().parents[1] / "models" / "resnet20.pt")
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--T-list", type=lambda text: [int(t) for t in text.split(",")], default=[16, 32])
    parser.add_argument("--data", help="evaluation data, all of it (default: --eval-size images of the test split)")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint).model.eval()
    images = Images(1)
    if args.data:
        test = open_dataset(args.data.replace("<shared>", str(shared_dir())), transform=cifar10_transform())
    else:
        test = stratified_subset(open_dataset(str(shared_dir() / "data" / "cifar10" / "test"),
                                              transform=cifar10_transform()), args.eval_size, 0)
    loader = list(make_loader(test, 100))
    jelly = SpikingJelly()
    networks = {
        f"SpikingJelly {jelly.version} RateCodingRecipe (imported)": from_spikingjelly(
            jelly.convert(model, images.calibration), T=max(args.T_list)),
        "ann2snn default (if, converted at the largest T)": ann2snn.convert(model, images.calibration,
                                                                             T=max(args.T_list)),
    }
    rows = []
    with torch.no_grad():
        for name, snn in networks.items():
            report = ann2snn.evaluate(snn, loader, args.T_list, ann=model)
            rows.append(row(name, report, args.T_list))
            print(rows[-1], flush=True)
    print(table(["conversion"] + [f"top-1 T={T}" for T in args.T_list] + [f"spikes/image T={T}" for T in args.T_list]
                + [f"ACs/image T={args.T_list[-1]}", f"MACs/image T={args.T_list[-1]}"], rows))


if __name__ == "__main__":
    main()
