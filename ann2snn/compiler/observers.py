"""Activation statistics and the rules that turn them into clipping thresholds."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ann2snn import distributed


def range_above(top: float) -> float:
    """The histogram range for a maximum `top`: the smallest power of two above it (0 while only
    zeros have been seen, since zeros fit any range)."""
    return math.ldexp(1.0, math.frexp(top)[1]) if top > 0 else 0.0


class HistogramObserver:
    """Exact running maximum plus a histogram of the (non-negative) activations, per layer or channel.

    The histogram covers [0, R) with R = range_above(max) over all channels: a function of the
    maximum alone, not of the order the data came in. It grows by doubling (merging bin pairs) when a
    larger value arrives, so one pass over any iterable suffices. With a power-of-two bin count the
    bin of a value, floor(value * bins / R), is computed exactly, and merging pairs at range R gives
    exactly the bins of range 2R; so the histogram equals the one computed directly at the final range,
    and histograms of shards, brought to their common range with `rebin`, add up to the histogram of
    all the data (see `ann2snn.distributed.all_reduce_observers`). Bin width is R / bins <= 2 * max /
    bins: percentiles are exact to one bin; zeros are counted apart so they neither skew percentiles
    nor cost error in the search."""

    def __init__(self, per_channel: bool, bins: int = 2048):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two (so that bins merge exactly), got {bins}")
        self.per_channel = per_channel
        self.bins = bins
        self.max: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None
        self.zeros: torch.Tensor | None = None
        self.range = 0.0
        self.ndim = 0

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().float()
        if not bool(torch.isfinite(y).all()):
            raise ValueError("calibration activations contain NaN or Inf: check the calibration data and "
                             "the model's weights")
        self.ndim = y.ndim
        channels = y.transpose(0, 1).reshape(y.shape[1], -1) if self.per_channel else y.reshape(1, -1)
        count = channels.shape[0]
        batch_max = channels.amax(1).clamp_min(0.0)
        if self.max is None:
            self.max = batch_max
            self.hist = torch.zeros(count, self.bins, dtype=torch.float64, device=y.device)
            self.zeros = torch.zeros(count, dtype=torch.float64, device=y.device)
        else:
            self.max = torch.maximum(self.max, batch_max)
        self.rebin(range_above(float(self.max.max())))
        scale = self.bins / self.range if self.range else 0.0
        index = (channels * scale).long().clamp_(0, self.bins - 1)
        index += torch.arange(count, device=y.device).unsqueeze(1) * self.bins
        self.hist += torch.bincount(index.flatten(), minlength=count * self.bins).view(count, self.bins)
        self.zeros += (channels <= 0).sum(1)

    def rebin(self, new_range: float) -> None:
        """Widen the histogram to cover [0, new_range), a power of two no smaller than the range."""
        if new_range < self.range or (new_range > 0 and math.frexp(new_range)[0] != 0.5):
            raise ValueError(f"cannot rebin a histogram of range {self.range} to {new_range}: the new range "
                             "must be a power of two no smaller than the current one")
        if self.range == 0.0:
            # Only zeros so far, all in bin 0, where they stay at any range.
            self.range = new_range
        while self.range < new_range:
            merged = self.hist.view(self.hist.shape[0], self.bins // 2, 2).sum(2)
            self.hist = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.range *= 2

    def positive_histogram(self) -> torch.Tensor:
        hist = self.hist.clone()
        hist[:, 0] -= self.zeros
        return hist.clamp_min_(0.0)

    def bin_centers(self) -> torch.Tensor:
        width = self.range / self.bins
        return (torch.arange(self.bins, dtype=torch.float64, device=self.hist.device) + 0.5) * width

    def threshold(self, rule: str, levels: int, percentile: float = 99.99) -> torch.Tensor:
        """Threshold per layer ([1]) or per channel ([C]) by `rule` (see THRESHOLD_RULES)."""
        if self.max is None:
            raise RuntimeError("observer saw no data")
        if rule not in THRESHOLD_RULES:
            raise ValueError(f"unknown threshold rule {rule!r}; choose one of {tuple(THRESHOLD_RULES)}")
        return THRESHOLD_RULES[rule](self, levels, percentile)


def max_threshold(observer: HistogramObserver, levels: int, percentile: float) -> torch.Tensor:
    """The largest activation seen: nothing clips."""
    return observer.max.clone()


def percentile_threshold(observer: HistogramObserver, levels: int, percentile: float) -> torch.Tensor:
    """The given percentile of the positive activations (exact to one histogram bin)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    hist = observer.positive_histogram()
    cumulative = hist.cumsum(1)
    total = cumulative[:, -1:]
    first_bin = (cumulative < total * (percentile / 100.0)).sum(1)
    upper_edge = (first_bin + 1).double() * (observer.range / observer.bins)
    return torch.minimum(upper_edge.float(), observer.max)


def mse_threshold(observer: HistogramObserver, levels: int, percentile: float, candidates: int = 256) -> torch.Tensor:
    """The threshold that minimises the mean squared quantization error of this layer's output."""
    hist = observer.positive_histogram()
    centers = observer.bin_centers()
    fractions = torch.arange(1, candidates + 1, dtype=torch.float64, device=hist.device) / candidates
    maxima = observer.max.double()
    best = torch.empty_like(maxima)
    # Channel by channel, over the bins up to the channel's largest value: the bins share one range, the
    # largest channel's, so a small channel's upper bins are empty and would cost time only (64 channels of
    # spread maxima: 1.9 s over all bins, 0.3-0.4 s so, the same thresholds).
    for channel, (channel_hist, channel_max) in enumerate(zip(hist, maxima)):
        used = int(channel_hist.nonzero().max()) + 1 if bool(channel_hist.any()) else 1
        channel_hist, channel_centers = channel_hist[:used], centers[:used]
        thetas = channel_max * fractions  # [K]
        step = (thetas / levels).clamp_min(1e-30).unsqueeze(1)  # [K, 1]
        quantized = step * torch.clamp(torch.floor(channel_centers / step + 0.5), 0, levels)
        error = ((quantized - channel_centers) ** 2 * channel_hist).sum(1)  # [K]
        best[channel] = thetas[error.argmin()]
    return best.float()


# rule name -> threshold(observer, levels, percentile); adding a rule is one entry
THRESHOLD_RULES: dict[str, Callable[[HistogramObserver, int, float], torch.Tensor]] = {
    "max": max_threshold,
    "percentile": percentile_threshold,
    "mse": mse_threshold,
}


def all_reduce_observers(observers: Mapping[str, HistogramObserver]) -> None:
    """Turn every process's observers into observers of all processes' data, equal to what one
    observer fed all of it would hold: maxima combined by max; each histogram widened to the common
    range (range_above of the overall maximum, as a single observer ends at; exact, see
    HistogramObserver) and its counts summed."""
    if not distributed.is_distributed():
        return
    maxima = distributed.reduce_over_processes({name: observer.max for name, observer in observers.items()}, "max")
    for name, observer in observers.items():
        if maxima[name] is not None:
            observer.max = maxima[name]
            observer.rebin(range_above(float(observer.max.max())))
    counts = distributed.reduce_over_processes(
        {name: (observer.hist, observer.zeros) for name, observer in observers.items()}, "sum")
    for name, observer in observers.items():
        observer.hist, observer.zeros = counts[name]
