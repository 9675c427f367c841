"""HistogramObserver: exact running max and a doubling histogram whose counts stay consistent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.compiler.observers import THRESHOLD_RULES, HistogramObserver, range_above


def reference_histogram(values: torch.Tensor, value_range: float, bins: int) -> torch.Tensor:
    index = np.clip(np.floor(values.double().numpy() * bins / value_range), 0, bins - 1).astype(np.int64)
    return torch.from_numpy(np.bincount(index, minlength=bins).astype(np.float64))


def growing_batches(n: int = 6):
    """Non-negative batches [8, 3, 4, 4] whose maxima grow by large factors (and a zero-only batch)."""
    torch.manual_seed(0)
    batches = [torch.zeros(8, 3, 4, 4)]
    for k in range(n):
        y = torch.relu(torch.randn(8, 3, 4, 4)) * (0.01 * 7.3 ** k)
        batches.append(y)
    return batches


@pytest.mark.parametrize("bins", [2048, 64])
def test_range_growth_keeps_counts_and_exact_max(bins: int) -> None:
    observer = HistogramObserver(per_channel=False, bins=bins)
    seen = []
    for y in growing_batches():
        observer.update(y)
        seen.append(y.flatten())
        values = torch.cat(seen)
        assert float(observer.hist.sum()) == values.numel()
        assert float(observer.zeros.sum()) == int((values <= 0).sum())
        assert float(observer.positive_histogram().sum()) == int((values > 0).sum())
        assert float(observer.max) == float(values.max())
        # the range is the smallest power of two above the maximum; 0 while there are only zeros
        assert observer.range == range_above(float(values.max()))
        assert observer.range > float(values.max()) or observer.range == float(values.max()) == 0
    # the merged histogram equals a histogram of all values computed directly at the final range
    assert observer.range > 100 and observer.range < 2 * 2 * float(values.max())
    torch.testing.assert_close(observer.hist[0], reference_histogram(values, observer.range, bins), rtol=0, atol=0)
    assert float(observer.threshold("max", 3)) == float(values.max())


def test_per_channel_histograms_after_growth() -> None:
    observer = HistogramObserver(per_channel=True, bins=256)
    batches = growing_batches(4)
    for y in batches:
        observer.update(y)
    all_values = torch.cat(batches)
    channels = all_values.transpose(0, 1).reshape(3, -1)
    assert observer.hist.shape == (3, 256)
    torch.testing.assert_close(observer.max, channels.amax(1), rtol=0, atol=0)
    for c in range(3):
        torch.testing.assert_close(observer.hist[c], reference_histogram(channels[c], observer.range, 256),
                                   rtol=0, atol=0)
        assert float(observer.zeros[c]) == int((channels[c] == 0).sum())
    torch.testing.assert_close(observer.threshold("max", 1), channels.amax(1), rtol=0, atol=0)


def test_power_of_two_maximum_lies_inside_the_range() -> None:
    observer = HistogramObserver(per_channel=False, bins=16)
    observer.update(torch.tensor([[0.0, 1.0, 4.0, 3.99]]))
    assert observer.range == 8.0
    assert observer.hist[0].tolist() == [1, 0, 1, 0, 0, 0, 0, 1, 1] + [0] * 7
    observer.update(torch.tensor([[8.0]]))
    assert observer.range == 16.0 and float(observer.hist.sum()) == 5
    assert observer.hist[0].tolist() == [1, 1, 0, 1, 1, 0, 0, 0, 1] + [0] * 7


def test_percentile_is_exact_to_one_bin() -> None:
    torch.manual_seed(1)
    y = torch.relu(torch.randn(64, 4, 8, 8)).pow(2)
    observer = HistogramObserver(per_channel=False)
    for chunk in y.split(16):
        observer.update(chunk)
    width = observer.range / observer.bins
    positive = y[y > 0].numpy()
    for p in (50.0, 90.0, 99.0, 99.99):
        reference = np.percentile(positive, p, method="inverted_cdf")
        theta = float(observer.threshold("percentile", 3, p))
        assert reference - 1e-6 <= theta <= reference + width, p
    assert float(observer.threshold("percentile", 3, 100.0)) == float(y.max())


def test_mse_threshold_never_worse_than_max() -> None:
    torch.manual_seed(2)
    y = torch.relu(torch.randn(32, 1, 16, 16)) ** 3  # heavy tail
    observer = HistogramObserver(per_channel=False)
    observer.update(y)
    v = y.flatten().double()
    for levels in (1, 3, 15):
        def mse(theta: float) -> float:
            s = theta / levels
            return float(((s * torch.clamp(torch.floor(v / s + 0.5), 0, levels) - v) ** 2).mean())

        theta = float(observer.threshold("mse", levels))
        assert 0 < theta <= float(y.max())
        assert mse(theta) < mse(float(y.max()))
        # close to the best of a fine grid search on the raw data
        grid = min(mse(float(y.max()) * k / 2000) for k in range(1, 2001))
        assert mse(theta) <= grid * 1.02


def test_observer_errors() -> None:
    for bins in (7, 6, 1):
        with pytest.raises(ValueError, match="power of two"):
            HistogramObserver(per_channel=False, bins=bins)
    observer = HistogramObserver(per_channel=False)
    with pytest.raises(RuntimeError, match="no data"):
        observer.threshold("max", 3)
    observer.update(torch.rand(4, 3))
    with pytest.raises(ValueError, match="unknown threshold rule"):
        observer.threshold("median", 3)
    for bad in (0.0, 100.5):
        with pytest.raises(ValueError, match="percentile"):
            observer.threshold("percentile", 3, bad)


def test_infinite_activation_does_not_hang() -> None:
    import signal

    def timeout(*_):
        raise TimeoutError("HistogramObserver.update did not return")

    observer = HistogramObserver(per_channel=False, bins=8)
    observer.update(torch.tensor([[1.0, 2.0]]))
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(ValueError, match="NaN or Inf"):
            observer.update(torch.tensor([[float("inf")]]))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def observed(batches, per_channel: bool = False, bins: int = 64) -> HistogramObserver:
    observer = HistogramObserver(per_channel=per_channel, bins=bins)
    for y in batches:
        observer.update(y)
    return observer


def assert_same_statistics(observer: HistogramObserver, reference: HistogramObserver) -> None:
    assert observer.range == reference.range
    for field in ("max", "hist", "zeros"):
        torch.testing.assert_close(getattr(observer, field), getattr(reference, field), rtol=0, atol=0)


def test_range_and_histogram_do_not_depend_on_the_order_of_the_data() -> None:
    # A zero-only batch first used to fix the range at 1.0, coarser than the 2**-9 the small values need.
    batches = [torch.zeros(4, 3, 2, 2), torch.rand(4, 3, 2, 2) * 0.001, torch.rand(4, 3, 2, 2) * 0.0015]
    forward, backward = observed(batches, per_channel=True), observed(batches[::-1], per_channel=True)
    assert forward.range == backward.range == 2.0 ** -9
    assert_same_statistics(forward, backward)
    for rule in ("max", "percentile", "mse"):
        torch.testing.assert_close(forward.threshold(rule, 3), backward.threshold(rule, 3), rtol=0, atol=0)


def test_only_zeros_give_zero_range_and_zero_thresholds() -> None:
    observer = observed([torch.zeros(2, 3), -torch.rand(2, 3)])  # negative inputs count as zeros
    assert observer.range == 0.0 and float(observer.zeros.sum()) == 12 == float(observer.hist[0, 0])
    for rule in ("max", "percentile", "mse"):
        assert float(observer.threshold(rule, 3)) == 0.0


@pytest.mark.parametrize("per_channel", [False, True])
def test_shards_rebinned_to_the_common_range_add_up_to_one_pass_over_all_data(per_channel: bool) -> None:
    """What the all-reduce of data-parallel calibration does: each shard's histogram widened to the
    range of the overall maximum, counts summed, gives exactly the histogram of one pass over all."""
    batches = growing_batches(5) + [torch.full((2, 3, 4, 4), 4.0)]  # a power-of-two maximum too
    whole = observed(batches, per_channel)
    for shards in ([batches[:1], batches[1:]], [batches[::2], batches[1::2]], [batches[5:], batches[:3], batches[3:5]]):
        observers = [observed(shard, per_channel) for shard in shards]
        top = torch.stack([observer.max for observer in observers]).amax(0)
        assert {observer.range for observer in observers} != {whole.range}  # the shards do need rebinning
        for observer in observers:
            observer.rebin(range_above(float(top.max())))
        assert all(observer.range == whole.range for observer in observers)
        torch.testing.assert_close(top, whole.max, rtol=0, atol=0)
        torch.testing.assert_close(sum(observer.hist for observer in observers), whole.hist, rtol=0, atol=0)
        torch.testing.assert_close(sum(observer.zeros for observer in observers), whole.zeros, rtol=0, atol=0)


def test_rebin_only_widens_to_powers_of_two() -> None:
    observer = observed([torch.tensor([[0.5, 1.5]])], bins=8)
    assert observer.range == 2.0
    for bad in (1.0, 3.0, 6.0):
        with pytest.raises(ValueError, match="power of two no smaller"):
            observer.rebin(bad)
    observer.rebin(8.0)
    assert observer.range == 8.0 and observer.hist[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]  # 0.5 and 1.5, width 1


def test_threshold_rules_are_a_table_of_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rule is one entry, called with the observer, the levels and the percentile; the names are what
    callers list and validate against."""
    assert sorted(THRESHOLD_RULES) == ["max", "mse", "percentile"] and "mse" in THRESHOLD_RULES
    observer = HistogramObserver(per_channel=True)
    observer.update(torch.rand(16, 3, 4, 4))
    for rule, threshold in THRESHOLD_RULES.items():
        torch.testing.assert_close(observer.threshold(rule, 7, 99.0), threshold(observer, 7, 99.0))
    calls = []
    monkeypatch.setitem(THRESHOLD_RULES, "half_max",
                        lambda observed, levels, percentile: calls.append((levels, percentile)) or observed.max / 2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    calibration = [torch.rand(8, 3, 6, 6)]
    halved = ann2snn.quantize(model, calibration, qbits=3, threshold_rule="half_max")
    largest = ann2snn.quantize(model, calibration, qbits=3, threshold_rule="max")
    assert calls == [(7, 99.99)]
    torch.testing.assert_close(halved.get_submodule("1").theta, largest.get_submodule("1").theta / 2)
