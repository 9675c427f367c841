"""snn.pt files of format version 1, written before the package moved into subpackages (their pickles name
ann2snn.snn.SpikingNetwork, ann2snn.neurons.IFNeuron, ann2snn.layers.QCFSQuantizer, ...), still load and
simulate to the outputs recorded when they were saved (tests/io/data/make_legacy_snn_v1.py wrote them with
the code of commit 9be01e5)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ann2snn
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.io.saved_network import FORMAT, VERSION, is_saved_network, load_saved
from ann2snn.runtime.encoding import InputEncoder
from ann2snn.runtime.layers import AddBias, SpikingMaxPool
from ann2snn.runtime.network import SpikingNetwork
from ann2snn.runtime.neurons import IFNeuron, SignedNeuron

DATA = Path(__file__).parent / "data"
RECORDED = torch.load(DATA / "legacy_v1_outputs.pt", weights_only=True)


@pytest.mark.parametrize("name, neuron, temporal", [
    ("legacy_v1_if_regular.snn.pt", IFNeuron, (InputEncoder, AddBias, SpikingMaxPool)),
    ("legacy_v1_signed.snn.pt", SignedNeuron, (AddBias, SpikingMaxPool)),
])
def test_version_1_files_load_and_simulate_as_when_saved(name: str, neuron: type, temporal: tuple[type, ...]) -> None:
    path = DATA / name
    assert torch.load(path, weights_only=True)["version"] == 1 < VERSION
    assert is_saved_network(path)
    saved = load_saved(path)
    assert isinstance(saved.snn, SpikingNetwork) and saved.metadata == {"written_by": "9be01e5"}
    kinds = {type(module) for module in saved.snn.modules()}
    assert neuron in kinds and set(temporal) <= kinds and QCFSQuantizer in {type(m) for m in saved.snn.qann.modules()}
    inputs = RECORDED["inputs"]
    with torch.no_grad():
        # Spike trains are equal; the float read-out may differ in the last bits on another CPU's BLAS kernels.
        torch.testing.assert_close(saved.snn(inputs), RECORDED[name], rtol=1e-5, atol=1e-6)
        assert saved.snn.qann(inputs).shape == (4, 3)
        if saved.ann is not None:
            assert saved.ann(inputs).shape == (4, 3)


def test_new_files_are_version_2_and_other_versions_are_refused_by_number(tmp_path: Path) -> None:
    saved = load_saved(DATA / "legacy_v1_signed.snn.pt")
    path = tmp_path / "snn.pt"
    ann2snn.save(saved.snn, path)
    assert torch.load(path, weights_only=True)["version"] == VERSION == 2
    with torch.no_grad():
        torch.testing.assert_close(load_saved(path).snn(RECORDED["inputs"]), RECORDED["legacy_v1_signed.snn.pt"])
    for version in (0, 3, None):
        torch.save({"format": FORMAT, "version": version, "metadata": {}, "modules": torch.zeros(1, dtype=torch.uint8)},
                   path)
        with pytest.raises(ValueError, match=f"saved in format version {version}; this ann2snn reads versions 1, 2"):
            load_saved(path)
