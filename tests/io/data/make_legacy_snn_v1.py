"""Writes the version-1 snn.pt files of tests/io/test_legacy_snn.py with the code of commit 9be01e5 (the last
one with the flat module layout: ann2snn.snn, ann2snn.neurons, ann2snn.layers, ...), and the outputs the
networks simulated to then. Run from a checkout of that commit:

    git worktree add /tmp/legacy 9be01e5
    PYTHONPATH=/tmp/legacy python tests/io/data/make_legacy_snn_v1.py tests/io/data
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ann2snn


class Net(nn.Module):
    """Convolution, BatchNorm, ReLU, max and average pooling, a residual add, a constant offset, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x) + x + 0.25)
        return self.fc(torch.flatten(F.avg_pool2d(x, 2), 1))


def main(out: Path) -> None:
    if not Path(ann2snn.__file__).with_name("snn.py").exists():
        sys.exit(f"run with the code of commit 9be01e5 on PYTHONPATH, not {ann2snn.__file__}")
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    model.eval()
    calibration = [torch.rand(16, 3, 8, 8) for _ in range(2)]
    inputs = torch.rand(4, 3, 8, 8)
    networks = {
        "legacy_v1_if_regular.snn.pt": dict(neuron="if", T=8, encoding="regular", qbits=3),
        "legacy_v1_signed.snn.pt": dict(neuron="signed", T=16, qbits=2, per_channel=True),
    }
    outputs = {"inputs": inputs}
    for name, settings in networks.items():
        snn = ann2snn.convert(model, calibration, **settings)
        ann2snn.save(snn, out / name, {"written_by": "9be01e5"}, ann=model if "signed" in name else None)
        with torch.no_grad():
            outputs[name] = snn(inputs)
    torch.save(outputs, out / "legacy_v1_outputs.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
