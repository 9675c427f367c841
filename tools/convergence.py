"""Relative error of converted SNNs against their QANN (and the clipped, unquantized ANN) as T grows,
on random-weight torchvision models and the CIFAR ResNet-20, for each neuron kind.

    python tools/convergence.py [--T-list 8,32,128,512] [--neurons if,signed-rate,signed]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ann2snn  # noqa: E402
from ann2snn.evaluation.convergence import convergence  # noqa: E402
from ann2snn.zoo import build_model  # noqa: E402

MODELS = {
    "torchvision:resnet18": (3, 64, 64),
    "torchvision:mobilenet_v2": (3, 32, 32),
    "torchvision:vgg11_bn": (3, 32, 32),
    "resnet20": (3, 32, 32),
}


def random_model(name: str) -> torch.nn.Module:
    """Random weights with non-trivial BatchNorm statistics (fresh BN layers are identities)."""
    model = build_model(name, num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T-list", default="8,32,128,512")
    parser.add_argument("--neurons", default="if,signed-rate,signed")
    parser.add_argument("--qbits", type=int, default=4)
    args = parser.parse_args()
    T_list = [int(t) for t in args.T_list.split(",")]
    print("| model | neuron | reference | " + " | ".join(f"T={T}" for T in T_list) + " |")
    print("|---|---|---|" + "---|" * len(T_list))
    for name, shape in MODELS.items():
        torch.manual_seed(0)
        model = random_model(name)
        calib = [torch.randn((16,) + shape) for _ in range(2)]
        x = torch.randn((4,) + shape)
        for neuron in args.neurons.split(","):
            start = time.perf_counter()
            # float64: no pre-activation within rounding distance of a level boundary (see README)
            snn = ann2snn.convert(model, calib, qbits=args.qbits, T=max(T_list), neuron=neuron).double()
            errors = convergence(snn, x.double(), T_list)
            for reference in ("qann", "clipped"):
                cells = " | ".join(f"{errors[T][reference]:.2e}" for T in T_list)
                print(f"| {name} | {neuron} | {reference} | {cells} |", flush=True)
            print(f"<!-- {name} {neuron}: {time.perf_counter() - start:.1f} s -->", flush=True)


if __name__ == "__main__":
    main()
