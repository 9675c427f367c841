"""Saving and loading converted spiking networks as one self-contained file.

The network is made of torch.fx GraphModules, which pickle as their generated code plus the
standard modules they call, so a saved file loads with `ann2snn.load(path)` alone: neither the
model's source code nor the original checkpoint is needed.

Loading unpickles Python objects, which can run arbitrary code: load only files you produced or
trust. The outer container is read with `weights_only=True` and must carry this module's format
marker before anything inside it is unpickled, so other torch files are refused without running them.

The container also carries a sha256 checksum of the metadata and of the pickled modules (every weight, buffer
and line of graph code). Loading checks it before it unpickles anything, so a file that was changed or damaged
after it was saved is refused. Files saved before the checksum was added (every version 1 file, and the first
version 2 files) have none: they still load, unchecked.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn

from ann2snn.io.atomic import atomic_write

if TYPE_CHECKING:  # io sits below the runtime: it stores its networks without importing it
    from ann2snn.runtime.network import SpikingNetwork

FORMAT = "ann2snn-snn"
# torch files are zip archives that store their records uncompressed, with the pickled container first: the
# format marker lies in a file's first bytes even when the rest of it is missing.
_MARKER_SEARCHED_BYTES = 4096
# 2: classes under the subpackages (ann2snn.runtime.network.SpikingNetwork, ...); 1: the flat layout before
VERSION = 2
# Where version 1's modules went; ClippedReLU and QCFSQuantizer left ann2snn.layers for the compiler.
_VERSION_1_MODULES = {
    "ann2snn.snn": "ann2snn.runtime.network",
    "ann2snn.neurons": "ann2snn.runtime.neurons",
    "ann2snn.layers": "ann2snn.runtime.layers",
    "ann2snn.encoding": "ann2snn.runtime.encoding",
    "ann2snn.native": "ann2snn.runtime.kernels.native",
    "ann2snn.observers": "ann2snn.compiler.observers",
}
_VERSION_1_CLASSES = {
    ("ann2snn.layers", "ClippedReLU"): "ann2snn.compiler.quantizer",
    ("ann2snn.layers", "QCFSQuantizer"): "ann2snn.compiler.quantizer",
}


@dataclass
class SavedNetwork:
    """The contents of a saved file: the network, the ANN it came from (as a traced graph, when it
    was saved with one) and the caller's metadata (preprocessing, source checkpoint, ...)."""

    snn: SpikingNetwork
    ann: nn.Module | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _portable(module: nn.Module) -> nn.Module:
    """A CPU copy whose GraphModules re-trace with torch.fx's plain tracer when unpickled.

    Unpickling a GraphModule re-traces its code with the tracer class that built it; the compiler's
    own tracer is an implementation detail that loading must not depend on, and loading treats every
    submodule as a leaf anyway."""
    portable = copy.deepcopy(module).cpu()
    for submodule in portable.modules():
        if isinstance(submodule, fx.GraphModule):
            submodule._tracer_cls = None
    return portable


def save(snn: SpikingNetwork, path: str | Path, metadata: dict[str, Any] | None = None, *,
         ann: fx.GraphModule | None = None) -> Path:
    """Save `snn` (with its QANN), and optionally the `ann` it was converted from, to `path`.

    `ann` is the ANN as its torch.fx trace (`ann2snn.save` traces a plain module), so reloading it needs
    no model code either. `metadata`
    must hold plain data (dicts, lists, strings, numbers, booleans, None). The network's simulation
    state is not saved; `snn` itself is left untouched."""
    if not isinstance(snn, nn.Module):
        raise TypeError(f"expected a SpikingNetwork, got {type(snn).__name__}")
    path = Path(path)
    network = _portable(snn)
    network.reset()
    if ann is not None and not isinstance(ann, fx.GraphModule):
        raise TypeError(f"ann must be the ANN's torch.fx trace (ann2snn.compiler.passes.trace(model)), "
                        f"got {type(ann).__name__}")
    modules = {"snn": network, "ann": _portable(ann) if ann is not None else None}
    pickled = io.BytesIO()
    torch.save(modules, pickled)
    metadata = dict(metadata or {})
    container = {
        "format": FORMAT,
        "version": VERSION,
        "metadata": metadata,
        "modules": torch.frombuffer(bytearray(pickled.getbuffer()), dtype=torch.uint8),
        "sha256": _checksum(metadata, pickled.getvalue()),
    }
    serialized = io.BytesIO()
    torch.save(container, serialized)
    atomic_write(path, serialized.getvalue())
    return path


def _checksum(metadata: dict[str, Any], modules: bytes) -> str:
    """sha256 of the metadata (as canonical JSON) followed by the pickled modules."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    digest.update(modules)
    return digest.hexdigest()


def _has_format_marker(path: Path) -> bool:
    with open(path, "rb") as file:
        return FORMAT.encode() in file.read(_MARKER_SEARCHED_BYTES)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no details'}"


def _is_container(loaded: object) -> bool:
    return (isinstance(loaded, dict) and loaded.get("format") == FORMAT and isinstance(loaded.get("metadata"), dict)
            and isinstance(loaded.get("modules"), torch.Tensor) and loaded["modules"].dtype == torch.uint8
            and isinstance(loaded.get("sha256", ""), str))


def _read_container(path: Path) -> dict[str, Any]:
    """The outer container of a saved network, read without unpickling code. For any other file, a
    ValueError that names `path` and says what it is."""
    failure = None
    try:
        container = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load reports foreign or corrupt files as many unrelated exception types.
    except Exception as error:
        failure = error
    else:
        if _is_container(container):
            return container
    if _has_format_marker(path):
        reason = _first_line(failure) if failure is not None else "parts of its container are missing"
        raise ValueError(f"{path}: truncated or corrupt: a spiking network saved by ann2snn.save, but it cannot be "
                         f"read ({reason}); convert its checkpoint again") from failure
    not_ours = f"{path}: not a spiking network saved by ann2snn.save (no '{FORMAT}' format marker)"
    if failure is None:
        raise ValueError(f"{not_ours}: a torch file of another kind, such as a checkpoint's weights; `ann2snn "
                         "convert` converts checkpoints")
    if "GLOBAL " in str(failure):  # how weights_only names a class it refuses to import: GLOBAL <module>.<name>
        raise ValueError(f"{not_ours}: a torch file that holds pickled Python objects, such as a checkpoint of a "
                         "whole model; `ann2snn convert` converts checkpoints") from failure
    raise ValueError(f"{not_ours}: not a torch file, or truncated ({_first_line(failure)})") from failure


def is_saved_network(path: str | Path) -> bool:
    """Whether `path` is a file written by `save`, intact or not (checked without unpickling code):
    `load_saved` says what is wrong with a damaged one."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        _read_container(path)
    except ValueError:
        return _has_format_marker(path)
    return True


class _Version1Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        moved = _VERSION_1_CLASSES.get((module, name), _VERSION_1_MODULES.get(module, module))
        return super().find_class(moved, name)


# what torch.load takes as a pickle module: an Unpickler class and a load function
_PICKLE_MODULES = {
    1: SimpleNamespace(__name__="ann2snn_version_1_pickle", Unpickler=_Version1Unpickler,
                       load=lambda file, **kwargs: _Version1Unpickler(file, **kwargs).load()),
    2: pickle,
}


def load_saved(path: str | Path, map_location: str | torch.device = "cpu") -> SavedNetwork:
    """Everything `save` wrote to `path`. Unpickles code: only for files you produced or trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    container = _read_container(path)
    version = container.get("version")
    if version not in _PICKLE_MODULES:
        raise ValueError(f"{path}: saved in format version {version}; this ann2snn reads versions "
                         f"{', '.join(map(str, sorted(_PICKLE_MODULES)))}")
    pickled = container["modules"].numpy().tobytes()
    recorded = container.get("sha256")  # None in files saved before checksums (see the module docstring)
    if recorded is not None and _checksum(container["metadata"], pickled) != recorded:
        raise ValueError(f"{path}: corrupt: its contents do not match the sha256 checksum saved with them, so the "
                         "file was changed or damaged after it was saved; convert its checkpoint again, or use a "
                         "copy of the file")
    modules = torch.load(io.BytesIO(pickled), map_location=map_location, weights_only=False,
                         pickle_module=_PICKLE_MODULES[version])
    return SavedNetwork(snn=modules["snn"], ann=modules["ann"], metadata=container["metadata"])


def load(path: str | Path, map_location: str | torch.device = "cpu") -> SpikingNetwork:
    """The spiking network saved at `path` by `ann2snn.save`, ready to simulate.

    Unpickles code: only for files you produced or trust."""
    return load_saved(path, map_location).snn
