"""The zoo's definitions of the three foreign checkpoints in ../shared/models: they load strictly as they are,
trace to the same outputs, and score what shared/README.md says they score on test-1000."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx

from ann2snn.io.checkpoint import load_into
from ann2snn.io.data import ListFileDataset, cifar10_transform, make_loader
from ann2snn.zoo import build_model
from ann2snn.zoo.cifar_resnet_b import PREPROCESSING as CHENYAOFO

pytestmark = pytest.mark.shared

AKAMASTER = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# (architecture, file, normalisation, accuracy on test-1000.txt of the JPEG copy as shared/README.md gives it)
FOREIGN = [
    ("resnet20", "resnet20-cifar10.th", AKAMASTER, 80.8),
    ("resnet56_b", "resnet56-cifar10-chenyaofo.pt", CHENYAOFO, 85.7),
    ("shufflenet_v2_x0_5_cifar", "shufflenetv2_x0_5-cifar10-chenyaofo.pt", CHENYAOFO, 84.1),
]


def _loaded(shared: Path, arch: str, file: str) -> torch.nn.Module:
    return load_into(build_model(arch), shared / "models" / file).eval()


@pytest.mark.parametrize(("arch", "file", "normalisation", "accuracy"), FOREIGN, ids=[row[0] for row in FOREIGN])
def test_checkpoint_loads_strictly_and_traces(shared: Path, arch: str, file: str, normalisation: dict,
                                              accuracy: float) -> None:
    model = _loaded(shared, arch, file)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(images), model(images))


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "file", "normalisation", "accuracy"), FOREIGN, ids=[row[0] for row in FOREIGN])
def test_pretrained_accuracy_on_test_1000(shared: Path, arch: str, file: str, normalisation: dict,
                                          accuracy: float) -> None:
    model = _loaded(shared, arch, file)
    dataset = ListFileDataset(shared / "data" / "cifar10" / "subsets" / "test-1000.txt",
                              transform=cifar10_transform(normalisation["mean"], normalisation["std"]))
    correct = 0
    with torch.no_grad():
        for images, labels in make_loader(dataset, batch_size=250):
            correct += (model(images).argmax(dim=1) == labels).sum().item()
    assert len(dataset) == 1000
    assert 100 * correct / len(dataset) == pytest.approx(accuracy, abs=0.15)
