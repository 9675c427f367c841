"""Where a measurement comes from: the software that made it, on which machine, by which command, and when, so
that a report can be cited and reproduced."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torchvision

_PACKAGE = "ann2snn"
# the repository root when ann2snn runs from a checkout (ann2snn/evaluation/provenance.py -> root)
_CHECKOUT = Path(__file__).resolve().parents[2]


def utc_now() -> str:
    """The current time in ISO 8601, UTC, to the second: '2026-11-25T14:03:12+00:00'."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_version() -> str | None:
    """The installed ann2snn's version (None when it runs from a checkout that was never installed)."""
    try:
        return metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _git(*arguments: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock that a commit running beside it needs
    return subprocess.run(["git", "-C", str(_CHECKOUT), *arguments], capture_output=True, text=True, timeout=10,
                          check=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()


def source_commit() -> str | None:
    """What `git describe --always --tags --dirty` says of the checkout ann2snn runs from (its tag or commit, and
    -dirty when tracked files differ from it); None for an installed copy (no .git beside the package: a
    repository further up, one that merely holds a virtual environment, says nothing about ann2snn) or without
    git."""
    if not (_CHECKOUT / ".git").exists():
        return None
    try:
        described = _git("describe", "--always", "--tags")
        changed = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return described + "-dirty" * bool(changed) if described else None


def software_versions() -> dict[str, str | None]:
    """The versions a result depends on: ann2snn (and its commit in a checkout), torch, torchvision, Python."""
    return {"ann2snn": package_version(), "commit": source_commit(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version()}


def provenance(device: str) -> dict[str, Any]:
    """The report's provenance block: software versions, the platform, the `device` measured on, the command line
    (this process's argv, as given, and the directory it ran in: relative paths in it are relative to that) and the
    date."""
    return {**software_versions(), "platform": platform.platform(), "device": device, "command": list(sys.argv),
            "working_directory": os.getcwd(), "date": utc_now()}
