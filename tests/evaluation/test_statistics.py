"""The Wilson score interval, against values worked out by hand and Newcombe's published table."""
from __future__ import annotations

import pytest

from ann2snn.evaluation.statistics import accuracy_interval, wilson_interval


@pytest.mark.parametrize("successes, trials, lower, upper", [
    # 0 of n: [0, z^2 / (n + z^2)] with z = 1.959964, z^2 = 3.841459: 3.841459 / 13.841459
    (0, 10, 0.0, 0.277533),
    # n of n: [n / (n + z^2), 1]: 10 / 13.841459
    (10, 10, 0.722467, 1.0),
    # 43 of 50 (p 0.86): (43 + 1.920729 -+ 1.959964 sqrt(43 * 7 / 50 + 0.960365)) / 53.841459
    (43, 50, 0.738138, 0.930492),
    # Newcombe, Statistics in Medicine 17 (1998) 857-872, table II, method 3 (score interval without correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_hand_computed_and_published_intervals(successes: int, trials: int, lower: float, upper: float) -> None:
    digits = max(len(f"{bound}".partition(".")[2]) for bound in (lower, upper))  # as many as the source gives
    assert wilson_interval(successes, trials) == pytest.approx((lower, upper), abs=0.5 * 10 ** -digits)


def test_bounds_at_zero_and_all_are_exact() -> None:
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0


def test_fifty_images_give_about_nine_points_either_side() -> None:
    # the report: 86 % on 50 images is 74-93 %, not a figure to two decimals
    lower, upper = wilson_interval(43, 50)
    assert 0.08 < 0.86 - lower < 0.13 and 0.06 < upper - 0.86 < 0.08


def test_wider_confidence_gives_a_wider_interval() -> None:
    narrow, wide = wilson_interval(43, 50, 0.9), wilson_interval(43, 50, 0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_accuracy_interval_recovers_the_count() -> None:
    assert accuracy_interval(43 / 50, 50) == list(wilson_interval(43, 50))
    assert accuracy_interval(None, 50) is None


@pytest.mark.parametrize("successes, trials", [(0, 0), (-1, 10), (11, 10)])
def test_impossible_proportions_are_refused(successes: int, trials: int) -> None:
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        wilson_interval(successes, trials)
