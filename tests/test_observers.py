"""HistogramObserver: exact running max and a doubling histogram whose counts stay consistent."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ann2snn.observers import HistogramObserver


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
        assert observer.range > float(values.max())
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
    with pytest.raises(ValueError, match="even"):
        HistogramObserver(per_channel=False, bins=7)
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
