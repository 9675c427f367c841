"""How errors name graph nodes: the source line is the model's own, also for library models (torchvision, the
zoo), never a frame of torch or of the compiler."""
from __future__ import annotations

import pytest
import torchvision

from ann2snn import ConversionError
from ann2snn.compiler.passes import trace
from ann2snn.compiler.passes.check_supported import check_supported
from ann2snn.errors import describe_node
from ann2snn.zoo import build_model


def test_a_torchvision_node_names_its_torchvision_line() -> None:
    """torchvision's files lie beside torch's (site-packages/torchvision vs site-packages/torch): they were taken
    for torch's own and every location read "source line unknown"."""
    with pytest.raises(ConversionError) as info:
        check_supported(trace(torchvision.models.mobilenet_v3_small()))
    assert "source line unknown" not in str(info.value)
    assert "torchvision/ops/misc.py:" in str(info.value) or "torchvision/models/mobilenetv3.py:" in str(info.value)


def test_a_zoo_node_names_its_zoo_line() -> None:
    """The zoo's models are part of this library but are models, not compiler machinery."""
    gm = trace(build_model("shufflenet_v2_x0_5_cifar"))
    transpose = next(node for node in gm.graph.nodes if node.name == "transpose")
    location = describe_node(gm, transpose).split(" at ", 1)[1]
    assert location.endswith("/ann2snn/zoo/shufflenet_v2_cifar.py:27 (x = torch.transpose(x, 1, 2).contiguous())")
