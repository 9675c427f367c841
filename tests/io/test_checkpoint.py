from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ann2snn.io.checkpoint import CheckpointError, load_into, load_state_dict
from tests.helpers import RunsCallWhenUnpickled


def tiny_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_plain_state_dict_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)

    state = load_state_dict(path)
    assert list(state) == list(model.state_dict())
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(state[key], tensor)


@pytest.mark.parametrize("wrapper_key", ["state_dict", "model", "model_state_dict"])
def test_wrapper_and_data_parallel_prefix_are_stripped(tmp_path: Path, wrapper_key: str) -> None:
    model = tiny_model()
    prefixed = {f"module.{key}": tensor for key, tensor in model.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper_key: prefixed, "epoch": 90, "best_prec1": 91.7}, path)

    assert list(load_state_dict(path)) == list(model.state_dict())


def test_prefix_kept_unless_every_key_has_it(tmp_path: Path) -> None:
    # A submodule that happens to be called "module" is not a DataParallel wrapper.
    path = tmp_path / "named_module.pt"
    torch.save({"module.weight": torch.zeros(1), "head.weight": torch.zeros(1)}, path)

    assert set(load_state_dict(path)) == {"module.weight", "head.weight"}


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)

    with pytest.raises(CheckpointError) as raised:
        load_state_dict(path)
    message = str(raised.value)
    assert str(path) in message
    assert "pickled Python objects" in message and "trust_pickle=True" in message and "--trust-pickle" in message
    assert "\n" not in message

    state = load_state_dict(path, trust_pickle=True)
    assert list(state) == list(model.state_dict())


# torch words its refusal differently for blocklisted modules (os) and for other
# globals that are merely not allowlisted (shutil); both must be caught.
@pytest.mark.parametrize("blocklisted", [True, False], ids=["os.mkdir", "shutil.copyfile"])
def test_pickle_payload_does_not_run_by_default(tmp_path: Path, blocklisted: bool) -> None:
    marker = tmp_path / "payload_ran"
    source = tmp_path / "source.txt"
    source.write_text("x")
    if blocklisted:
        payload = RunsCallWhenUnpickled(os.mkdir, str(marker))
    else:
        payload = RunsCallWhenUnpickled(shutil.copyfile, str(source), str(marker))
    # os.mkdir pickles as posix.mkdir (nt.mkdir on Windows).
    refused_name = f"{payload.function.__module__}.{payload.function.__name__}"
    path = tmp_path / "payload.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "extra": payload}, path)

    with pytest.raises(CheckpointError, match=re.escape(f"pickled Python objects ({refused_name})")):
        load_state_dict(path)
    assert not marker.exists()

    # Trusting the file does run the payload, so the check above is not vacuous.
    load_state_dict(path, trust_pickle=True)
    assert marker.exists()


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match="absent.pt"):
        load_state_dict(path)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    complete = tmp_path / "complete.pt"
    torch.save(tiny_model().state_dict(), complete)
    truncated = tmp_path / "truncated.pt"
    data = complete.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError) as raised:
        load_state_dict(truncated)
    message = str(raised.value)
    assert str(truncated) in message and "truncated" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"", b"epoch,accuracy\n1,0.5\n"])
def test_non_checkpoint_file_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)

    with pytest.raises(CheckpointError) as raised:
        load_state_dict(path)
    message = str(raised.value)
    assert str(path) in message and "not a torch checkpoint" in message
    assert "\n" not in message


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "metrics.pt"
    torch.save({"best_prec1": 91.7, "epoch": 200}, path)

    with pytest.raises(CheckpointError, match=r"no tensors found.*best_prec1"):
        load_state_dict(path)


def test_load_into_copies_weights(tmp_path: Path) -> None:
    source = tiny_model()
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, path)

    target = load_into(tiny_model(), path)
    for key, tensor in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], tensor)


def test_load_into_accepts_checkpoints_without_num_batches_tracked(tmp_path: Path) -> None:
    # Checkpoints saved before PyTorch 0.4.1, like the shared ResNet-20, lack this buffer.
    source = tiny_model()
    state = {key: tensor for key, tensor in source.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)

    target = load_into(tiny_model(), path)
    torch.testing.assert_close(target[1].running_var, source[1].running_var)


def test_load_into_names_wrong_shape_and_leaves_model_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ten_classes.pt"
    torch.save(tiny_model().state_dict(), path)
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5))
    before = {key: tensor.clone() for key, tensor in target.state_dict().items()}

    with pytest.raises(CheckpointError) as raised:
        load_into(target, path)
    message = str(raised.value)
    assert str(path) in message
    assert "2.weight (checkpoint (2, 4), model (5, 4))" in message and "2.bias" in message
    assert "\n" not in message
    for key, tensor in target.state_dict().items():
        torch.testing.assert_close(tensor, before[key])


def test_load_into_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    state["3.weight"] = state.pop("2.weight")
    path = tmp_path / "renamed.pt"
    torch.save(state, path)

    with pytest.raises(CheckpointError, match=r"1 missing keys: 2\.weight; 1 unexpected keys: 3\.weight"):
        load_into(tiny_model(), path)
