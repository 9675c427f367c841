"""Helpers shared by the tests."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ann2snn.cli.main import main
from ann2snn.io.data import ListFileDataset, cifar10_transform, make_loader

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_bn(model: nn.Module, mean: float = 0.5, var: tuple[float, float] = (0.5, 2.0),
                 weight: tuple[float, float] = (0.5, 1.5), bias: tuple[float, float] = (-0.5, 0.5)) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm of the model, so that
    folding and conversion are tested on something other than the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCHNORMS):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-mean, mean)
                    m.running_var.uniform_(*var)
                if m.affine:
                    m.weight.uniform_(*weight)
                    m.bias.uniform_(*bias)
    return model


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """actual equals expected up to rel, relative to expected's largest magnitude."""
    actual, expected = actual.detach(), expected.detach()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


class RunsCallWhenUnpickled:
    """Unpickling this calls function(*args): a stand-in for a malicious payload."""

    def __init__(self, function: Callable[..., object], *args: str) -> None:
        self.function = function
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, ...]]:
        return self.function, self.args


def qann_levels(qann: nn.Module, x: torch.Tensor, names) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The QANN's output for x and the quantized level of each named quantizer on the way."""
    levels = {}
    hooks = [qann.get_submodule(name).register_forward_hook(
        lambda quantizer, inputs, _, name=name: levels.__setitem__(name, quantizer.quantized_level(inputs[0])))
        for name in names]
    try:
        return qann(x), levels
    finally:
        for hook in hooks:
            hook.remove()


def digits_checkpoint(directory: Path, classes: int = 10, name: str = "digits.pt") -> Path:
    """A small trusted pickled CNN for MNIST digits (mnist5k data): three activations, two BatchNorms."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(1, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes))).eval()
    path = directory / name
    torch.save(model, path)
    return path


def digits_args(checkpoint: Path, *extra: str | Path, trust_pickle: bool = True) -> list[str]:
    """`ann2snn convert` of a digits_checkpoint on a few mnist5k images, fast: T 4, no progress bars."""
    trust = ("--trust-pickle",) if trust_pickle else ()
    return [str(arg) for arg in ("convert", checkpoint, "--calib", "mnist5k", "--eval", "mnist5k", "--calib-size", 40,
                                 "--eval-size", 20, *trust, "--image-size", "1,28,28", "--mean", "0.13",
                                 "--std", "0.31", "--T", 4, "--T-list", "4", "--no-progress", *extra)]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """`ann2snn ARGV...` in this process: the exit code, stdout and stderr."""
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected_code: int, *fragments: str) -> str:
    """The exit code is `expected_code` and stderr one `ann2snn: error:` line holding every fragment; returns it."""
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def run_in_chunks(module, sequence: torch.Tensor, chunk: int) -> torch.Tensor:
    """A temporal module run over `sequence` [steps, batch, ...] in windows of `chunk` steps folded into the
    batch, as the simulator runs it; the outputs as [steps, batch, ...]."""
    module.reset()
    outputs = []
    for t0 in range(0, sequence.shape[0], chunk):
        window = sequence[t0:t0 + chunk]
        module.set_window(t0, window.shape[0])
        out = module(window.flatten(0, 1))
        outputs.append(out.reshape(window.shape[:2] + out.shape[1:]))
    return torch.cat(outputs)


def shared_cifar10_images(shared: Path, subset: str, count: int) -> torch.Tensor:
    """The first `count` images of a list file in the shared `subsets/` folder (e.g. "test-1000.txt"), in the
    CIFAR-10 normalisation the shared ResNet-20 was trained with."""
    dataset = ListFileDataset(shared / "data" / "cifar10" / "subsets" / subset, transform=cifar10_transform())
    return next(iter(make_loader(dataset, count)))[0]
