"""The hand-written integrate-and-fire kernel: the eager neuron's spikes, membrane and counts bit for bit, in
both layouts and at any thread count; a build that fails leaves the eager steps, with a warning."""
from __future__ import annotations

import pytest
import torch

from ann2snn.runtime import neurons
from ann2snn.runtime.kernels import native
from ann2snn.runtime.neurons import IFNeuron


@pytest.fixture
def kernel_library():
    library = native.library()
    if library is None:
        pytest.skip("the native kernel cannot be built here (no C++ compiler)")
    return library


def simulate_layer(threshold: torch.Tensor, currents: torch.Tensor, max_spikes: int, kernels: str):
    """Run an IF layer over [steps, batch, C, H, W] currents, two steps per call; return what it leaves."""
    neuron = IFNeuron(threshold, max_spikes_per_step=max_spikes)
    neuron.kernels = kernels
    outputs = []
    for t0 in range(0, currents.shape[0], 2):
        neuron.set_window(t0, 2)
        outputs.append(neuron(currents[t0:t0 + 2].flatten(0, 1)))  # (a view: the layout is kept)
    return torch.cat(outputs), neuron


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("max_spikes", [1, 3])
def test_kernel_gives_the_eager_spikes_bit_for_bit(kernel_library, layout, per_channel, max_spikes, monkeypatch):
    torch.manual_seed(max_spikes + 2 * per_channel)
    threshold = torch.rand(1, 5, 1, 1) + 0.3 if per_channel else torch.tensor(0.7)
    # 5 channels x 7 x 9: no multiple of the vector width, so the kernel's loop tails run too
    currents = torch.randn(6, 3, 5, 7, 9) * 1.5
    currents = currents.flatten(0, 1).contiguous(memory_format=layout).unflatten(0, (6, 3))
    calls = []
    monkeypatch.setitem(neurons.NATIVE_STEPS, (neurons.integrate_and_fire, torch.float32, "cpu"),
                        lambda *args: calls.append(1) or native.integrate_and_fire_step(*args))
    fused, fused_neuron = simulate_layer(threshold, currents, max_spikes, "native")
    eager, eager_neuron = simulate_layer(threshold, currents, max_spikes, "eager")
    assert calls, "the native kernel was not used"
    assert torch.equal(fused, eager) and fused.sum() > 0
    assert torch.equal(fused_neuron.v, eager_neuron.v)
    assert torch.equal(fused_neuron.spike_count, eager_neuron.spike_count)
    assert fused_neuron.v.is_contiguous(memory_format=layout), "the membrane takes the currents' layout"
    if max_spikes > 1:
        assert fused.max() > 1, "bursts were exercised"


def test_kernel_result_does_not_depend_on_the_thread_count(kernel_library, monkeypatch):
    torch.manual_seed(3)
    threshold, currents = torch.rand(1, 16, 1, 1) + 0.5, torch.randn(4, 8, 16, 12, 12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = simulate_layer(threshold, currents, 1, "native")
        torch.set_num_threads(2)
        double = simulate_layer(threshold, currents, 1, "native")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], double[0]) and torch.equal(single[1].spike_count, double[1].spike_count)


def test_a_failed_build_warns_and_leaves_the_eager_spikes(tmp_path, monkeypatch):
    torch.manual_seed(4)
    threshold, currents = torch.rand(1, 4, 1, 1) + 0.5, torch.randn(4, 2, 4, 6, 6)
    expected = simulate_layer(threshold, currents, 1, "eager")[0]
    fake_compiler = tmp_path / "c++"
    fake_compiler.write_text("#!/bin/sh\necho 'fatal: no such compiler feature' >&2\nexit 1\n")
    fake_compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake_compiler))
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native neuron kernel unavailable.*no such compiler feature"):
            assert native.library() is None
        assert torch.equal(simulate_layer(threshold, currents, 1, "native")[0], expected)
    finally:
        native.library.cache_clear()
    assert not any((tmp_path / "cache").iterdir()), "a failed build leaves nothing in the cache"


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch, kernel_library):
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith("neuron_kernels_") and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp, "the cached build is reused"
    finally:
        native.library.cache_clear()
