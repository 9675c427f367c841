"""Kernels of the neurons' multi-step update, and which one a layer runs: the network's `kernels` setting.

- "auto" (the default): the native kernel where there is one (`native`: the IF neuron on float32 CPU
  tensors), else a torch.compile'd step (`compiled`) for layers of at least FUSED_MIN_ELEMENTS neurons per
  step where torch.compile works (a C++ compiler for CPU tensors, Triton for CUDA), else eager steps;
- "native": the native kernel where there is one, else eager steps;
- "compiled": the compiled step for every layer where torch.compile works, else eager steps;
- "eager": plain torch operations, one call per operation.

Each kernel performs the float operations of the eager step in the same order, so every setting gives the
same spikes bit for bit (tests/runtime/kernels, tests/runtime/test_neurons.py); a kernel that fails to
build falls back on eager steps with a warning. The environment variable ANN2SNN_FUSED_NEURONS=0 makes
"eager" the default, read once at import.

Kernels see every tensor of a step flat, [batch, neurons] in memory order (NCHW or channels-last: neuron
state takes the layout of the currents), so that one kernel serves every layer whatever its rank."""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable

import torch

from ann2snn.runtime.kernels import native
from ann2snn.runtime.kernels.compiled import COMPILED_STEPS

KERNELS = ("auto", "native", "compiled", "eager")
FUSED_ENV_VAR = "ANN2SNN_FUSED_NEURONS"
DEFAULT_KERNELS = "eager" if os.environ.get(FUSED_ENV_VAR, "1") == "0" else "auto"
# Below this many neurons per step a compiled kernel saves less than its call costs: "auto" leaves small
# layers eager (the native kernel's call is cheap enough for any layer).
FUSED_MIN_ELEMENTS = 16384

# One step of a neuron's dynamics on a chunk's tensors: (dynamics, output, activity, state, current, constants).
StepInto = Callable[..., None]


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return kernels


@functools.lru_cache(maxsize=None)
def unavailable(device_type: str) -> str | None:
    """Why fused kernels cannot be used on tensors of `device_type`, or None (a fact of the process: found once)."""
    if device_type == "cpu":
        return None if native.find_compiler(os.environ.get("CXX")) else "no C++ compiler found (set CXX)"
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    return f"no fused kernels for {device_type} tensors"


def memory_order(tensor: torch.Tensor) -> list[int]:
    """The dimensions of [batch, ...] from outermost to innermost in memory (batch first): (0, 1, 2, 3) for
    NCHW tensors, (0, 2, 3, 1) for channels-last ones."""
    return [0] + sorted(range(1, tensor.dim()), key=lambda dim: -tensor.stride(dim))


def flat(tensor: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[batch, ...] as [batch, neurons] in memory order (a view)."""
    return tensor.permute(order).reshape(tensor.shape[0], -1)


def flat_constant(value, sample: torch.Tensor, order: list[int]):
    """A constant of the dynamics for flat tensors: per-channel constants spelled out over the neurons of
    one sample, in the order of its memory."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() == 1:
        return value.reshape(())
    return value.expand(sample.shape).permute(order).reshape(1, -1)


def fusion_key(kernels: str, dynamics: Callable, state: tuple, current: torch.Tensor, constants: tuple,
               order: list[int]) -> tuple | None:
    """What selects the fused kernel of one step (None where fusion does not apply: eager kernels, autograd,
    a device without kernels, or state and current not dense in one layout; `order` is the current's
    `memory_order`)."""
    if kernels == "eager" or (torch.is_grad_enabled() and current.requires_grad) or torch.compiler.is_compiling() \
            or not current.permute(order).is_contiguous() \
            or not all(tensor.stride() == current.stride() for tensor in state) \
            or unavailable(current.device.type) is not None:
        return None
    # Tensor constants by whether they are scalars, Python ones (levels, spikes per step, decay) by value:
    # compiled code specialises on those, and a process that meets many values would otherwise exhaust
    # TorchDynamo's limit on recompilations of one key.
    constant_kinds = tuple(c.numel() == 1 if isinstance(c, torch.Tensor) else c for c in constants)
    return dynamics, current.dtype, current.device.type, constant_kinds


def fused_step(kernels: str, key: tuple, step_into: StepInto, native_step: StepInto | None,
               neurons: int) -> StepInto | None:
    """The kernel replacing `step_into` for calls of this key on `neurons` neurons per step, or None (eager)."""
    if kernels in ("auto", "native") and native_step is not None and native.library() is not None:
        return native_step
    if kernels == "compiled" or (kernels == "auto" and neurons >= FUSED_MIN_ELEMENTS):
        return COMPILED_STEPS.get(step_into, key)
    return None


def run_steps(kernels: str, step_into: StepInto, native_step: StepInto | None, dynamics: Callable,
              outputs: torch.Tensor, activity: torch.Tensor, state: tuple, currents: torch.Tensor,
              constants: tuple) -> None:
    """All steps of a chunk, `step_into` or the kernel `kernels` selects for it: `currents`, `outputs`
    [steps, batch, ...], `activity` [steps, batch]."""
    step, start, view = step_into, 0, (lambda tensor: tensor)
    order = memory_order(currents[0])
    key = fusion_key(kernels, dynamics, state, currents[0], constants, order)
    fused = fused_step(kernels, key, step_into, native_step, currents[0].numel()) if key is not None else None
    if fused is not None:
        sample = currents[0, :1]
        flat_state = tuple(flat(tensor, order) for tensor in state)
        flat_constants = tuple(flat_constant(value, sample, order) for value in constants)
        try:
            fused(dynamics, flat(outputs[0], order), activity[0], flat_state, flat(currents[0], order), flat_constants)
            step, start, state, constants = fused, 1, flat_state, flat_constants
            view = lambda tensor: flat(tensor, order)  # noqa: E731
        except Exception as error:  # a compilation that failed never ran: the state is untouched
            COMPILED_STEPS.mark_failed(key)
            warnings.warn(f"fused neuron kernel unavailable, running eager torch ops instead: it "
                          f"failed ({type(error).__name__}: {str(error).strip()[:300]})", RuntimeWarning, stacklevel=5)
    for t in range(start, currents.shape[0]):
        step(dynamics, view(outputs[t]), activity[t], state, view(currents[t]), constants)
