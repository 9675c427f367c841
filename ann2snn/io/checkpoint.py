"""Loading model weights from PyTorch checkpoint files, safely by default.

Checkpoints found in the wild come wrapped in training-state dicts, carry a
DataParallel `module.` or torch.compile `_orig_mod.` prefix, or are whole pickled modules. load_state_dict
turns all of these into a plain name -> tensor mapping, and refuses files that
need arbitrary code to unpickle unless the caller says the file is trusted.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "fit_state_dict", "load_into", "load_state_dict", "read_checkpoint",
           "state_dict_mismatch", "state_dict_of"]

# Training scripts commonly save {'state_dict': ..., 'epoch': ..., 'optimizer': ...}.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes a wrapper gives every key: (Distributed)DataParallel's module., torch.compile's _orig_mod.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# weights_only names the class or function it refuses to import as "GLOBAL <module>.<name>",
# whether it is merely not allowlisted or from a blocked module such as os.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_MAX_LISTED_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model."""


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> object:
    """The object a checkpoint file holds, as torch.load returns it.

    Unless trust_pickle is true the file is read with torch.load(weights_only=True), which refuses
    pickled Python objects instead of running their code. Every failure is a one-line CheckpointError
    naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    # before torch.load, which would hand a TorchScript archive to torch.jit.load
    foreign = _foreign_format(path)
    if foreign is not None:
        raise CheckpointError(foreign)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    # torch.load reports corrupt input as many unrelated exception types
    # (RuntimeError, EOFError, KeyError, UnpicklingError, ...), so catch broadly.
    except Exception as error:
        raise CheckpointError(_describe_load_failure(path, error)) from error


def state_dict_of(loaded: object, path: str | Path) -> dict[str, Tensor]:
    """The name -> tensor mapping in what `read_checkpoint` returned for `path`.

    Unwraps {'state_dict'|'model'|'model_state_dict': ...} wrappers and pickled modules, strips a
    DataParallel `module.` prefix, and refuses weights holding NaN or Inf."""
    tensors = {
        key: value for key, value in _unwrap(loaded).items() if isinstance(key, str) and isinstance(value, Tensor)
    }
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found in the checkpoint ({_describe_contents(loaded)})")

    # Strip only when every key has the prefix: then it came from a wrapper rather than from a submodule that
    # happens to be called "module"; both wrappers may have been applied, in either order.
    while prefix := next((prefix for prefix in _WRAPPER_PREFIXES if all(key.startswith(prefix) for key in tensors)),
                         None):
        tensors = {key.removeprefix(prefix): value for key, value in tensors.items()}

    non_finite = [f"{key} ({_count_non_finite(value)})" for key, value in tensors.items()
                  if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())]
    if non_finite:
        raise CheckpointError(f"{path}: {len(non_finite)} tensors hold NaN or Inf values: {_abbreviate(non_finite)}; "
                              "the file is corrupt or its training diverged: use another checkpoint")
    return tensors


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read a checkpoint file into a state dict for `nn.Module.load_state_dict`: `read_checkpoint`
    followed by `state_dict_of`."""
    return state_dict_of(read_checkpoint(path, trust_pickle=trust_pickle), path)


def load_into(model: nn.Module, path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Load a checkpoint file into `model` strictly; returns the model (see `fit_state_dict`)."""
    return fit_state_dict(model, load_state_dict(path, trust_pickle=trust_pickle), path)


def state_dict_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> tuple[int, str]:
    """How far `state` is from fitting `model`: the number of keys that do not fit (0: it fits) and what is
    wrong with them (missing and unexpected keys, wrong shapes), for a message."""
    expected = model.state_dict()

    # BatchNorm's own loader fills in num_batches_tracked for checkpoints saved
    # before PyTorch 0.4.1 (such as the shared ResNet-20), so its absence is fine.
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong_shapes = [
        f"{key} (checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)})"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    findings = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": wrong_shapes}
    problems = [f"{len(keys)} {label}: {_abbreviate(keys)}" for label, keys in findings.items() if keys]
    return sum(map(len, findings.values())), "; ".join(problems)


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str | Path) -> nn.Module:
    """Load `state` (read from `path`) into `model` strictly; returns the model.

    Missing and unexpected keys and wrong shapes are reported together in one
    CheckpointError, before any weight of the model is changed.
    """
    misfits, problems = state_dict_mismatch(model, state)
    if misfits:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: {problems}")

    try:
        model.load_state_dict(state, strict=True)
    # Custom modules can reject a state dict in their own _load_from_state_dict.
    except RuntimeError as error:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: {' '.join(str(error).split())}") from error
    return model


def _count_non_finite(tensor: Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return ", ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "Inf")) if count)


def _unwrap(loaded: object) -> Mapping[object, object]:
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if not isinstance(loaded, Mapping):
        return {}
    for key in _WRAPPER_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, (Mapping, nn.Module)):
            return _unwrap(inner)
    return loaded


def _describe_contents(loaded: object) -> str:
    if isinstance(loaded, Mapping):
        return f"top-level keys: {_abbreviate([str(key) for key in loaded])}" if loaded else "an empty dict"
    return f"a {type(loaded).__name__}"


def _torchscript(path: Path) -> str:
    return (f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint: ann2snn traces the Python model with "
            "torch.fx, and TorchScript does not keep it; save the original model's weights instead "
            "(torch.save(model.state_dict(), path)) and convert them with --arch NAME")


def _foreign_format(path: Path) -> str | None:
    """What a file torch.load cannot read is instead, where its content tells (TorchScript, ONNX, another zip
    archive); None for a file that looks like a torch checkpoint, damaged or truncated."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(name.endswith("constants.pkl") for name in names):
            return _torchscript(path)
        if any(name.endswith("data.pkl") for name in names):
            return None
        return (f"{path}: a zip archive holding {_abbreviate(names) or 'nothing'}, not a torch checkpoint; extract "
                "the checkpoint from it")
    with open(path, "rb") as file:
        head = file.read(64)
    # ONNX files are protobuf messages; a torch-exported one starts with its ir_version (field 1) and its
    # producer name (field 2).
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and head[2:3] == b"\x12"):
        return (f"{path}: an ONNX model, not a torch checkpoint: ann2snn converts PyTorch models; convert the "
                "PyTorch model it was exported from (its state dict or torch.save'd module)")
    return None


def _describe_load_failure(path: Path, error: Exception) -> str:
    message = str(error)
    if isinstance(error, (ModuleNotFoundError, AttributeError)):
        # with trust_pickle: unpickling imports the classes the objects were saved from
        return (f"{path}: a pickled object whose class cannot be imported ({type(error).__name__}: {message}); "
                "trust_pickle (--trust-pickle) rebuilds pickled objects from their classes, so the module defining "
                "them must be importable: add its directory to PYTHONPATH, or save the weights instead "
                "(torch.save(model.state_dict(), path)) and convert them with --arch NAME (a class defined in "
                "the script that saved it, __main__, can only be loaded that way)")
    refused_global = _REFUSED_GLOBAL.search(message)
    if refused_global:
        return (
            f"{path}: contains pickled Python objects ({refused_global.group(1)}), which can run arbitrary code "
            "when loaded (torch.save(model) of a whole model, or Python objects saved beside the weights, make such "
            "files); if you trust where it comes from, pass trust_pickle=True (--trust-pickle on the command line), "
            "or re-save just its weights with torch.save(model.state_dict(), path)"
        )
    # weights_only failures bury the actual reason after this marker.
    reason = message.split("WeightsUnpickler error:", 1)[-1]
    return f"{path}: not a torch checkpoint, or truncated ({type(error).__name__}: {_first_sentence(reason)})"


def _first_sentence(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ", 1)[0] if lines else "no details"


def _abbreviate(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    hidden = len(items) - _MAX_LISTED_KEYS
    return f"{shown}, ... ({hidden} more)" if hidden > 0 else shown
