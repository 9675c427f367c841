"""Atomic file writes: readers never see a partial file."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path: Path, payload: bytes) -> None:
    """Write into a temporary file beside `path`, then rename: readers never see a partial file."""
    # A fresh name opened exclusively rather than tempfile.mkstemp, whose files are private (0600).
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(payload)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
