"""What the command line does, as library functions: the CLI parses, calls these and prints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from ann2snn.compiler.passes import trace
from ann2snn.io import saved_network
from ann2snn.runtime.network import SpikingNetwork


def save(snn: SpikingNetwork, path: str | Path, metadata: dict[str, Any] | None = None, *,
         ann: nn.Module | None = None) -> Path:
    """Save `snn` (with its QANN), and optionally the `ann` it was converted from (stored as its torch.fx
    trace, so that reloading needs no model code), to `path`; see `ann2snn.io.saved_network.save`."""
    return saved_network.save(snn, path, metadata, ann=trace(ann) if ann is not None else None)
