"""Confidence intervals for the proportions a report gives (accuracies: correct images out of those evaluated).

The Wilson score interval (Wilson 1927; Newcombe 1998, method 3) rather than the normal approximation
p ± z sqrt(p(1-p)/n): it stays inside [0, 1], is not empty at 0 or n successes, and keeps close to its nominal
coverage on the few hundred images an evaluation often has."""
from __future__ import annotations

import math
from statistics import NormalDist

CONFIDENCE = 0.95
INTERVAL_METHOD = "95 % Wilson score interval"


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided Wilson score interval (lower, upper) of a proportion `successes` / `trials`."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"a proportion needs 0 <= successes <= trials and trials > 0, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    z2 = z * z
    centre = successes + z2 / 2
    half_width = z * math.sqrt(successes * (trials - successes) / trials + z2 / 4)
    # at 0 and n successes the bound is 0 or 1 exactly, not a rounding residue of centre - half_width
    lower = 0.0 if successes == 0 else (centre - half_width) / (trials + z2)
    upper = 1.0 if successes == trials else (centre + half_width) / (trials + z2)
    return lower, upper


def accuracy_interval(accuracy: float | None, images: int) -> list[float] | None:
    """The 95 % Wilson interval [lower, upper] of an accuracy measured on `images` images (None for None)."""
    if accuracy is None:
        return None
    return list(wilson_interval(round(accuracy * images), images))
