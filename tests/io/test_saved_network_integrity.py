"""snn.pt integrity (issue 17): the file carries a sha256 checksum of its contents, checked on load, and a file
that is not an intact snn.pt is named for what it is: truncated, changed, a checkpoint."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.io.checkpoint import CheckpointError
from ann2snn.io.model_loading import load_model
from ann2snn.io.saved_network import is_saved_network, load_saved
from tests.networks import cnn

# The checksum ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = cnn(1, [4], 4 * 4 * 4, 3, stride=2).eval()
    snn = ann2snn.convert(model, [torch.rand(8, 1, 8, 8)], T=4)
    return ann2snn.save(snn, tmp_path_factory.mktemp("saved") / "snn.pt", {"preprocessing": {"mean": [0.5]}},
                        ann=model)


def test_four_zeroed_bytes_anywhere_are_refused_or_change_nothing(tmp_path: Path, saved: Path) -> None:
    """Four bytes zeroed inside snn.pt went unnoticed, and export wrote the changed weights."""
    original = saved.read_bytes()
    reference = load_saved(saved)
    damaged = tmp_path / "snn.pt"
    refused = 0
    for offset in range(0, len(original) - 4, 61):
        data = bytearray(original)
        data[offset:offset + 4] = bytes(4)
        if data == original:
            continue
        damaged.write_bytes(data)
        try:
            loaded = load_saved(damaged)
        except ValueError as error:
            assert str(damaged) in str(error)
            refused += 1
            continue
        # zeroed padding or alignment bytes of the zip archive: what loads must be exactly what was saved
        assert loaded.metadata == reference.metadata
        for network in ("snn", "ann"):
            states = getattr(loaded, network).state_dict(), getattr(reference, network).state_dict()
            assert states[0].keys() == states[1].keys()
            assert all(torch.equal(states[0][key], states[1][key]) for key in states[1]), f"offset {offset}"
    assert refused > 0.8 * (len(original) // 61)


def test_changed_weights_are_refused_naming_the_file(tmp_path: Path, saved: Path) -> None:
    container = torch.load(saved, weights_only=True)
    modules = container["modules"].clone()
    modules[len(modules) // 2:len(modules) // 2 + 4] = 0
    for changed in ({"modules": modules}, {"metadata": {"preprocessing": {"mean": [0.0]}}}):
        path = tmp_path / "snn.pt"
        torch.save({**container, **changed}, path)
        with pytest.raises(ValueError, match=f"{path}: corrupt: its contents do not match the sha256 checksum"):
            load_saved(path)


def test_files_without_a_checksum_still_load(tmp_path: Path, saved: Path) -> None:
    """snn.pt files written before the checksum (tests/io/test_legacy_snn.py has version 1 files) load unchecked."""
    container = torch.load(saved, weights_only=True)
    assert len(container.pop("sha256")) == 64
    path = tmp_path / "snn.pt"
    torch.save(container, path)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(load_saved(path).snn(x), load_saved(saved).snn(x), rtol=0, atol=0)


# What a file that is not an intact snn.pt is called ------------------------------------------------------------


def test_a_truncated_snn_pt_is_called_truncated(tmp_path: Path, saved: Path) -> None:
    """It was said to have "no format marker"."""
    path = tmp_path / "snn.pt"
    path.write_bytes(saved.read_bytes()[:len(saved.read_bytes()) // 2])
    assert is_saved_network(path)
    with pytest.raises(ValueError, match=f"{path}: truncated or corrupt: a spiking network saved by ann2snn.save, "
                                         "but it cannot be read"):
        load_saved(path)


def test_checkpoints_are_not_taken_for_saved_networks_and_are_named(tmp_path: Path) -> None:
    state_dict, pickled_module, text = tmp_path / "weights.pt", tmp_path / "module.pt", tmp_path / "notes.txt"
    torch.save(nn.Linear(2, 2).state_dict(), state_dict)
    torch.save(nn.Linear(2, 2), pickled_module)
    text.write_text("not torch")
    for path, what in ((state_dict, "a torch file of another kind, such as a checkpoint's weights; `ann2snn "
                                    "convert` converts checkpoints"),
                       (pickled_module, "a torch file that holds pickled Python objects, such as a checkpoint of a "
                                        "whole model"),
                       (text, "not a torch file, or truncated")):
        assert not is_saved_network(path)
        with pytest.raises(ValueError, match=f"{path}: not a spiking network saved by ann2snn.save .*: {what}"):
            load_saved(path)


def test_a_saved_network_given_as_a_checkpoint_is_named(saved: Path) -> None:
    """`convert` and `inspect` of an snn.pt blamed the architecture name ('snn')."""
    with pytest.raises(CheckpointError, match=f"{saved}: a spiking network converted by ann2snn, not a checkpoint to "
                                              "convert; `ann2snn eval` evaluates it, `ann2snn export`"):
        load_model(saved)


def test_the_checksum_covers_canonical_metadata(tmp_path: Path, saved: Path) -> None:
    """Metadata whose keys come back in another order still checks."""
    snn = load_saved(saved).snn
    path = ann2snn.save(snn, tmp_path / "snn.pt", {"b": {"y": 1, "x": [1.5, None]}, "a": "text"})
    container = torch.load(path, weights_only=True)
    reordered = io.BytesIO()
    torch.save({**container, "metadata": {"a": "text", "b": {"x": [1.5, None], "y": 1}}}, reordered)
    path.write_bytes(reordered.getvalue())
    assert load_saved(path).metadata == {"a": "text", "b": {"x": [1.5, None], "y": 1}}
