"""Saving and loading converted spiking networks as one self-contained file.

The network is made of torch.fx GraphModules, which pickle as their generated code plus the
standard modules they call, so a saved file loads with `ann2snn.load(path)` alone: neither the
model's source code nor the original checkpoint is needed.

Loading unpickles Python objects, which can run arbitrary code: load only files you produced or
trust. The outer container is read with `weights_only=True` and must carry this module's format
marker before anything inside it is unpickled, so other torch files are refused without running them.
"""
from __future__ import annotations

import copy
import io
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
    container = {
        "format": FORMAT,
        "version": VERSION,
        "metadata": dict(metadata or {}),
        "modules": torch.frombuffer(bytearray(pickled.getbuffer()), dtype=torch.uint8),
    }
    serialized = io.BytesIO()
    torch.save(container, serialized)
    atomic_write(path, serialized.getvalue())
    return path


def _read_container(path: Path) -> dict[str, Any] | None:
    """The outer container of a saved network, read without unpickling code; None for other files."""
    try:
        container = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load reports foreign or corrupt files as many unrelated exception types.
    except Exception:
        return None
    return container if isinstance(container, dict) and container.get("format") == FORMAT else None


def is_saved_network(path: str | Path) -> bool:
    """Whether `path` is a file written by `save` (checked without unpickling code)."""
    return Path(path).is_file() and _read_container(Path(path)) is not None


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
    if container is None:
        raise ValueError(f"{path}: not a spiking network saved by ann2snn.save (no '{FORMAT}' format marker)")
    version = container.get("version")
    if version not in _PICKLE_MODULES:
        raise ValueError(f"{path}: saved in format version {version}; this ann2snn reads versions "
                         f"{', '.join(map(str, sorted(_PICKLE_MODULES)))}")
    modules = torch.load(io.BytesIO(container["modules"].numpy().tobytes()), map_location=map_location,
                         weights_only=False, pickle_module=_PICKLE_MODULES[version])
    return SavedNetwork(snn=modules["snn"], ann=modules["ann"], metadata=container["metadata"])


def load(path: str | Path, map_location: str | torch.device = "cpu") -> SpikingNetwork:
    """The spiking network saved at `path` by `ann2snn.save`, ready to simulate.

    Unpickles code: only for files you produced or trust."""
    return load_saved(path, map_location).snn
