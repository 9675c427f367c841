"""Pass 3 (remove_identities): dropout and identity ops disappear with inference semantics."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import remove_identities, trace
from tests.networks import cnn


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.3)
        self.ident = nn.Identity()
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.fc_drop = nn.AlphaDropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop2d(self.ident(self.conv(x)))
        x = F.dropout(x, 0.4, self.training)
        x = x.clone().detach()
        x = self.drop(torch.relu(x)) + x
        return self.fc_drop(self.fc(torch.flatten(x, 1)))


def test_identities_removed_and_outputs_unchanged() -> None:
    model = Noisy().eval()
    gm = run_passes(model, trace, remove_identities)

    modules = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert modules == {nn.Conv2d, nn.Linear}
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity)) for m in gm.modules())
    rest = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert rest == [torch.relu, operator.add, torch.flatten]
    # the add reads the conv output directly on both sides
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert add.args[1] is conv and add.args[0].args[0] is conv

    for _ in range(2):
        x = torch.randn(3, 3, 4, 4)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_model_without_identities_is_untouched() -> None:
    model = cnn(3, [3], 3 * 2 * 2, 2, kernel=1, padding=0, batchnorm=False).eval()
    traced = trace(model)
    before = [(n.op, n.target) for n in traced.graph.nodes]
    gm = run_passes(traced, remove_identities)
    assert [(n.op, n.target) for n in gm.graph.nodes] == before
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class Shuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        return torch.transpose(x.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, c, h, w)


def test_contiguous_stays() -> None:
    """Not an identity: ShuffleNetV2's channel shuffle views the transposed tensor, which needs it (removed, the
    view failed: "view size is not compatible with input tensor's size and stride")."""
    model = Shuffle()
    gm = run_passes(model, trace, remove_identities)
    assert "contiguous" in [n.target for n in gm.graph.nodes]
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
