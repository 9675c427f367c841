"""A hand-written CPU kernel for the integrate-and-fire step, the neuron of nearly every converted network.

Why not torch.compile here: on CPU each call of a compiled function pays ~100 us of TorchDynamo guards
and wrappers, as much as the step of a whole layer at batch 1, and Inductor splits the step into two
passes over memory (the per-sample spike count is a reduction it does not fuse with the membrane update).
This kernel does the update and the count in one pass, one sample per thread, and is called through
ctypes for a few microseconds. It performs the float operations of `neurons.integrate_and_fire` in the
same order (compiled without contraction into FMAs), so its spikes are the eager ones bit for bit; the
tests check that.

It is compiled on first use with the C++ compiler torch.compile uses (`CXX`, else c++/g++/clang++) and
cached under ANN2SNN_CACHE_DIR (default ~/.cache/ann2snn) by a hash of its source and flags; where that
fails, the caller falls back on torch.compile or eager steps."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

CACHE_ENV_VAR = "ANN2SNN_CACHE_DIR"
_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
_SOURCE = r"""
#include <cmath>
#include <cstdint>

// One step of `rows` samples of `n` integrate-and-fire neurons (flat, the same memory order for all):
// v += current; spikes = v >= threshold (or floor(v / threshold) clamped to [0, max_spikes]);
// v -= spikes * threshold. `threshold` holds one value, or one per neuron of a sample.
template <bool PerNeuron, bool Burst>
static int32_t step_row(float* __restrict v, const float* __restrict current, const float* __restrict threshold,
                        float* __restrict spikes, int64_t n, float max_spikes) {
    int32_t count = 0;  // (32 bits: a 64-bit sum does not vectorize on SSE2)
    for (int64_t i = 0; i < n; ++i) {
        const float th = PerNeuron ? threshold[i] : threshold[0];
        const float x = v[i] + current[i];
        float s;
        if (Burst) {
            s = std::floor(x / th);
            s = s < 0.0f ? 0.0f : s;
            s = s > max_spikes ? max_spikes : s;
            count += static_cast<int32_t>(s);
        } else {
            const int32_t fired = x >= th;
            s = static_cast<float>(fired);
            count += fired;
        }
        v[i] = x - s * th;
        spikes[i] = s;
    }
    return count;
}

template <bool PerNeuron, bool Burst>
static void step_rows(float* v, const float* current, const float* threshold, float* spikes, float* activity,
                      int64_t rows, int64_t n, float max_spikes, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        activity[r] = static_cast<float>(step_row<PerNeuron, Burst>(
            v + r * n, current + r * n, threshold, spikes + r * n, n, max_spikes));
    }
}

extern "C" void integrate_and_fire_step(float* v, const float* current, const float* threshold,
                                        int per_neuron, float* spikes, float* activity, int64_t rows,
                                        int64_t n, int64_t max_spikes, int threads) {
    const float k = static_cast<float>(max_spikes);
    if (per_neuron) {
        if (max_spikes == 1) step_rows<true, false>(v, current, threshold, spikes, activity, rows, n, k, threads);
        else step_rows<true, true>(v, current, threshold, spikes, activity, rows, n, k, threads);
    } else {
        if (max_spikes == 1) step_rows<false, false>(v, current, threshold, spikes, activity, rows, n, k, threads);
        else step_rows<false, true>(v, current, threshold, spikes, activity, rows, n, k, threads);
    }
}
"""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "ann2snn")


@functools.lru_cache(maxsize=None)
def find_compiler(cxx: str | None) -> str | None:
    """The C++ compiler named by `cxx` (the CXX variable), else the first of c++, g++, clang++ on PATH: the
    one Inductor's CPU backend uses too. (Cached: searching PATH on every neuron call costs more than a
    small layer's update.)"""
    return next((found for found in map(shutil.which, [cxx] if cxx else ["c++", "g++", "clang++"]) if found), None)


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: a concurrent or interrupted build never
    leaves a half-written library under the name that is loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "kernel.cpp"
        source.write_text(_SOURCE)
        built = Path(work) / target.name
        result = subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a warning, once) where it cannot be built or loaded."""
    compiler = find_compiler(os.environ.get("CXX"))
    if compiler is None:
        return None
    digest = hashlib.sha256("\0".join((_SOURCE, compiler, *_FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"neuron_kernels_{digest}.so"
    try:
        if not target.is_file():
            _build(compiler, target)
        loaded = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"native neuron kernel unavailable ({error}); using torch.compile or eager steps",
                      RuntimeWarning, stacklevel=2)
        return None
    kernel = loaded.integrate_and_fire_step
    kernel.restype = None
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return loaded


def integrate_and_fire_step(dynamics, output: torch.Tensor, activity: torch.Tensor, state: tuple,
                            current: torch.Tensor, constants: tuple) -> None:
    """`neurons._step_into` for `integrate_and_fire` on flat float32 CPU tensors [rows, neurons] (the
    threshold a 0-d tensor or [1, neurons]), dense and in one memory order."""
    (v,), (threshold, max_spikes) = state, constants
    threshold = threshold.to(torch.float32).contiguous()
    library().integrate_and_fire_step(
        v.data_ptr(), current.data_ptr(), threshold.data_ptr(), int(threshold.numel() > 1), output.data_ptr(),
        activity.data_ptr(), v.shape[0], v.shape[1], max_spikes, torch.get_num_threads())
