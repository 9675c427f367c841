"""Accuracy vs T of the shared, foreign CIFAR-10 ResNet-20 (no fine-tuning) for each neuron model,
calibrated on train-calib-512 and tested on test-1000, next to its ANN and QANN.

    python tools/resnet20_neurons.py [--configs NAME,...] [--T-list 1,2,4,8,16,32,64]

Each config is neuron[:k=<burst>][:pc][:rule=<rule>[@percentile]][:decay=<lif decay>][:nocomp][:adaptive]
(nocomp: LIF without its leak-compensating current). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ann2snn  # noqa: E402
from ann2snn.io.data import ListFileDataset, cifar10_transform, make_loader, shared_dir  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402

DEFAULT_CONFIGS = ("if,if:pc:rule=percentile@99.99,lif,signed-rate:pc:rule=percentile@99.99,"
                   "signed,signed:k=2,signed:k=4,signed:adaptive")


def parse_config(text: str) -> dict:
    neuron, *options = text.split(":")
    config = {"neuron": neuron, "max_spikes_per_step": 1, "per_channel": False, "threshold_rule": "mse",
              "adaptive": False, "neuron_options": {}}
    for option in options:
        if option.startswith("k="):
            config["max_spikes_per_step"] = int(option[2:])
        elif option == "pc":
            config["per_channel"] = True
        elif option.startswith("rule="):
            rule, _, percentile = option[5:].partition("@")
            config["threshold_rule"] = rule
            if percentile:
                config["percentile"] = float(percentile)
        elif option.startswith("decay="):
            config["neuron_options"]["decay"] = float(option[6:])
        elif option == "nocomp":
            config["neuron_options"]["compensate_leak"] = False
        elif option == "adaptive":
            config["adaptive"] = True
        else:
            raise ValueError(f"unknown option {option!r} in {text!r}")
    return config


def accuracy(predict, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((predict(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--T-list", default="1,2,4,8,16,32,64")
    parser.add_argument("--qbits", type=int, default=4)
    args = parser.parse_args()
    T_list = [int(t) for t in args.T_list.split(",")]
    shared = shared_dir()
    subsets = shared / "data" / "cifar10" / "subsets"
    model = load_model(shared / "models" / "resnet20-cifar10.th").model
    calib = [x for x, _ in make_loader(ListFileDataset(subsets / "train-calib-512.txt", transform=cifar10_transform()), 128)]
    test = list(make_loader(ListFileDataset(subsets / "test-1000.txt", transform=cifar10_transform()), 250))
    with torch.no_grad():
        print(f"ANN: {accuracy(model, test):.1f} %")
    print("| config | QANN | " + " | ".join(f"T={T}" for T in T_list) + " | steps used (mean) | s |")
    print("|---|---|" + "---|" * len(T_list) + "---|---|")
    for text in args.configs.split(","):
        config = parse_config(text)
        adaptive = config.pop("adaptive")
        start = time.perf_counter()
        snn = ann2snn.convert(model, calib, qbits=args.qbits, T=max(T_list), **config)
        with torch.no_grad():
            qann = accuracy(snn.qann, test)
        correct = {T: 0 for T in T_list}
        steps = []
        for x, y in test:
            result = snn.simulate(x, T_list, stop_when_quiet=adaptive)
            for T in T_list:
                correct[T] += int((result.outputs[T].argmax(1) == y).sum())
            steps.append(result.steps_used.float())
        total = sum(len(y) for _, y in test)
        cells = " | ".join(f"{100.0 * correct[T] / total:.1f}" for T in T_list)
        print(f"| {text} | {qann:.1f} | {cells} | {torch.cat(steps).mean():.1f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
