"""Neuron steps compiled with torch.compile: one fused kernel per step of a layer, compiled from the eager
step function itself (the same float operations in the same order: Inductor does not contract them into
FMAs), so the same spikes bit for bit, in one pass over memory instead of one per operation."""
from __future__ import annotations

import importlib
import logging
import types
from typing import Callable

import torch


class CompiledSteps:
    """The compiled versions of a step function, one per key (see `kernels.fusion_key`), and the keys whose
    compilation failed. One instance serves the process (`COMPILED_STEPS`): compiled code is a process-wide
    resource (TorchDynamo keeps it per code object), and compiling again per network would cost seconds."""

    def __init__(self):
        self._steps: dict[tuple, Callable | None] = {}

    def get(self, step: Callable, key: tuple) -> Callable | None:
        """The compiled `step` for calls of this key; None after its compilation failed."""
        if key not in self._steps:
            _import_quietly("torch.utils.cpp_extension")
            # TorchDynamo keeps compiled graphs, and its limit on recompilations, per code object: each key
            # gets a copy of the code of its own. Dynamic shapes: one compilation serves every layer and
            # batch size.
            code_copy = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__)
            self._steps[key] = torch.compile(code_copy, dynamic=True, fullgraph=True)
        return self._steps[key]

    def mark_failed(self, key: tuple) -> None:
        self._steps[key] = None

    def compiled_keys(self) -> list[tuple]:
        """The keys with a compiled step (not failed)."""
        return [key for key, step in self._steps.items() if step is not None]

    def clear(self) -> None:
        self._steps.clear()


COMPILED_STEPS = CompiledSteps()


def _import_quietly(module: str) -> None:
    """Import `module` with its logger's warnings off: Inductor's C++ backend imports cpp_extension,
    whose import warns on every machine without CUDA that it found no CUDA runtime."""
    logger = logging.getLogger(module)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module(module)
    finally:
        logger.setLevel(level)
