"""Accuracy vs T of the shared, foreign CIFAR-10 ResNet-20 (no fine-tuning) for each neuron model,
calibrated on train-calib-512 and tested on test-1000, next to its ANN and QANN.

    python tools/resnet20_neurons.py [--configs NAME,...] [--config 'NAME={"neuron": "lif", ...}'] [--T-list 1,2,4]

Each setting is a conversion record (`ann2snn.config.ConversionConfig.from_dict`); NAMES lists the named
ones, and `--config` adds one (repeatable). A name ending in `:quiet` simulates with `stop_when_quiet`
(signed neurons settle: the mean steps used is the adaptive time). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ann2snn  # noqa: E402
from ann2snn.config import ConversionConfig  # noqa: E402
from ann2snn.io.data import ListFileDataset, cifar10_transform, make_loader, shared_dir  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402

PERCENTILE_PER_CHANNEL = {"per_channel": True, "threshold_rule": "percentile", "percentile": 99.99}
NAMED = {
    "if": {"neuron": "if"},
    "if:pc:percentile": {"neuron": "if", **PERCENTILE_PER_CHANNEL},
    "lif": {"neuron": "lif"},
    "lif:nocomp": {"neuron": "lif", "neuron_options": {"compensate_leak": False}},
    "signed-rate:pc:percentile": {"neuron": "signed-rate", **PERCENTILE_PER_CHANNEL},
    "signed": {"neuron": "signed"},
    "signed:k=2": {"neuron": "signed", "max_spikes_per_step": 2},
    "signed:k=4": {"neuron": "signed", "max_spikes_per_step": 4},
    "signed:quiet": {"neuron": "signed"},
}
DEFAULT_CONFIGS = ("if", "if:pc:percentile", "lif", "signed-rate:pc:percentile", "signed", "signed:k=2", "signed:k=4",
                   "signed:quiet")
QUIET_SUFFIX = ":quiet"


def named_config(text: str) -> tuple[str, dict]:
    """NAME=JSON: a conversion record under a name of its own."""
    name, separator, record = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    try:
        return name, json.loads(record)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{name}: not a JSON object ({error})") from None


def accuracy(predict, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((predict(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"names of {', '.join(NAMED)}")
    parser.add_argument("--config", type=named_config, action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--T-list", default="1,2,4,8,16,32,64")
    parser.add_argument("--qbits", type=int, default=4)
    args = parser.parse_args()
    named = [name for name in args.configs.split(",") if name]
    if unknown := [name for name in named if name not in NAMED]:
        parser.error(f"unknown setting {', '.join(unknown)}; the named ones are {', '.join(NAMED)}")
    T_list = [int(t) for t in args.T_list.split(",")]
    settings = [(name, NAMED[name]) for name in named] + args.config
    configs = [(name, ConversionConfig.from_dict({"qbits": args.qbits, **record, "T": max(T_list)}))
               for name, record in settings]
    shared = shared_dir()
    subsets = shared / "data" / "cifar10" / "subsets"
    model = load_model(shared / "models" / "resnet20-cifar10.th").model
    calibration = ListFileDataset(subsets / "train-calib-512.txt", transform=cifar10_transform())
    calib = [x for x, _ in make_loader(calibration, 128)]
    test = list(make_loader(ListFileDataset(subsets / "test-1000.txt", transform=cifar10_transform()), 250))
    with torch.no_grad():
        print(f"ANN: {accuracy(model, test):.1f} %")
    print("| config | QANN | " + " | ".join(f"T={T}" for T in T_list) + " | steps used (mean) | s |")
    print("|---|---|" + "---|" * len(T_list) + "---|---|")
    for name, config in configs:
        start = time.perf_counter()
        snn = ann2snn.convert(model, calib, config)
        with torch.no_grad():
            qann = accuracy(snn.qann, test)
        correct = {T: 0 for T in T_list}
        steps = []
        for x, y in test:
            result = snn.simulate(x, T_list, stop_when_quiet=name.endswith(QUIET_SUFFIX))
            for T in T_list:
                correct[T] += int((result.outputs[T].argmax(1) == y).sum())
            steps.append(result.steps_used.float())
        total = sum(len(y) for _, y in test)
        cells = " | ".join(f"{100.0 * correct[T] / total:.1f}" for T in T_list)
        print(f"| {name} | {qann:.1f} | {cells} | {torch.cat(steps).mean():.1f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
