"""Pass 6 (insert_quantizers): each ClippedReLU becomes an uncalibrated QCFS quantizer with 2**qbits-1 levels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann2snn.layers import ClippedReLU, QCFSQuantizer
from ann2snn.passes import insert_quantizers, normalize_activations, trace
from ann2snn.passes.insert_quantizers import check_qbits


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x):
        x = F.relu6(self.conv1(x))
        x = self.conv2(x).clamp(0, 4)
        return torch.relu(self.fc(x.flatten(1)))


@pytest.mark.parametrize("qbits", [1, 3, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_clipped_relu_becomes_a_quantizer(qbits: int, per_channel: bool) -> None:
    normalized = normalize_activations(trace(Net().eval()))
    expected = [(n.target, normalized.get_submodule(n.target).upper) for n in normalized.graph.nodes
                if n.op == "call_module" and isinstance(normalized.get_submodule(n.target), ClippedReLU)]
    assert [u for _, u in expected] == [6.0, 4.0, None]
    before = [(n.op, n.target) for n in normalized.graph.nodes]

    gm = insert_quantizers(normalized, qbits=qbits, per_channel=per_channel)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before
    assert not any(isinstance(m, ClippedReLU) for m in gm.modules())
    for target, upper in expected:
        q = gm.get_submodule(target)
        assert isinstance(q, QCFSQuantizer)
        assert (q.levels, q.upper, q.per_channel) == (2 ** qbits - 1, upper, per_channel)
        assert not q.calibrated and q.observer is None


@pytest.mark.parametrize("qbits", range(1, 9))
def test_qcfs_matches_reference(qbits: int) -> None:
    levels = 2 ** qbits - 1
    theta = torch.rand(()) * 3 + 0.1
    q = QCFSQuantizer(levels)
    q.set_threshold(theta, 4)
    x = torch.randn(6, 5, 7, 7) * float(theta)
    s = theta / levels
    reference = s * torch.clamp(torch.floor(x / s + 0.5), 0, levels)
    torch.testing.assert_close(q(x), reference, rtol=0, atol=0)
    # it is idempotent and its largest output is the threshold
    torch.testing.assert_close(q(q(x)), q(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(q(x + 10 * theta).max(), theta)
    assert q(-x.abs()).abs().max() == 0


@pytest.mark.parametrize("qbits", [1, 2, 5])
def test_qcfs_per_channel_matches_reference(qbits: int) -> None:
    levels = 2 ** qbits - 1
    q = QCFSQuantizer(levels, per_channel=True)
    theta = torch.rand(5) + 0.2
    q.set_threshold(theta, 4)
    assert q.theta.shape == (1, 5, 1, 1)
    x = torch.randn(3, 5, 4, 4)
    s = theta.reshape(1, 5, 1, 1) / levels
    torch.testing.assert_close(q(x), s * torch.clamp(torch.floor(x / s + 0.5), 0, levels), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 9, -1, True, 2.0, "4"])
def test_invalid_qbits(bad) -> None:
    with pytest.raises(ValueError, match="qbits"):
        check_qbits(bad)
    gm = normalize_activations(trace(Net().eval()))
    with pytest.raises(ValueError, match="qbits"):
        insert_quantizers(gm, qbits=bad)


def test_check_qbits_returns_levels() -> None:
    assert [check_qbits(b) for b in range(1, 9)] == [1, 3, 7, 15, 31, 63, 127, 255]
