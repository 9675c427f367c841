from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ann2snn.io.data import SHARED_ENV_VAR, shared_dir


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    # Random inputs and initialisations make the same test run the same way every time.
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared data directory; skips the test where it is absent, but fails under CI."""
    path = shared_dir()
    if not path.is_dir():
        message = f"shared data not found at {path}: set {SHARED_ENV_VAR}"
        # CI sets ANN2SNN_REQUIRE_SHARED=1 so that a missing directory cannot pass as skipped tests.
        if os.environ.get("ANN2SNN_REQUIRE_SHARED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path
