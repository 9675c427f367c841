from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx

from ann2snn.io.checkpoint import load_into
from ann2snn.io.data import ListFileDataset, cifar10_transform, make_loader
from ann2snn.zoo.cifar_resnet import resnet20

pytestmark = pytest.mark.shared

# shared/README.md: the checkpoint scores 80.8 % on test-1000.txt (JPEG-recompressed CIFAR-10).
EXPECTED_TEST_1000_ACCURACY = 80.8


def test_checkpoint_loads_strictly_and_traces(shared: Path) -> None:
    model = load_into(resnet20(), shared / "models" / "resnet20-cifar10.th").eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(images), model(images))


def test_pretrained_accuracy_on_test_1000(shared: Path) -> None:
    model = load_into(resnet20(), shared / "models" / "resnet20-cifar10.th").eval()
    dataset = ListFileDataset(shared / "data" / "cifar10" / "subsets" / "test-1000.txt", transform=cifar10_transform())

    correct = 0
    with torch.no_grad():
        for images, labels in make_loader(dataset, batch_size=250):
            correct += (model(images).argmax(dim=1) == labels).sum().item()

    assert len(dataset) == 1000
    assert 100 * correct / len(dataset) == pytest.approx(EXPECTED_TEST_1000_ACCURACY, abs=0.15)
