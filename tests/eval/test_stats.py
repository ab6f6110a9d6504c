"""The evaluation's intervals against scipy's own implementations and hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from openpi_rl.eval import mean_interval, summarize, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (1, 1), (17, 40), (99, 100)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_interval_is_scipys(k, n, confidence):
    want = stats.binomtest(k, n).proportion_ci(confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((want.low, want.high), abs=1e-12)


def test_wilson_interval_by_hand():
    # 0 of 10 at 95 %: [0, z^2 / (n + z^2)] with z = 1.959964 -> 3.841459 / 13.841459.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    # 5 of 10: symmetric about 0.5; half-width z sqrt(n/4 + z^2/4) / (n + z^2) = 0.263407.
    low, high = wilson_interval(5, 10)
    assert (low + high) / 2 == pytest.approx(0.5) and high - 0.5 == pytest.approx(0.263407, 1e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(4, 3)


def test_mean_interval_is_scipys_t_interval():
    x = np.random.default_rng(0).normal(50.0, 20.0, size=12)
    mean, low, high = mean_interval(x, 0.95)
    want = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and (low, high) == pytest.approx(want)
    # By hand: [1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.302653 -> 2 +- 4.302653 / sqrt(3).
    assert mean_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 2 - 2.484138, 2 + 2.484138))
    assert mean_interval([1000.0] * 5) == (1000.0, 1000.0, 1000.0)  # every episode the same
    one = mean_interval([3.0])
    assert one[0] == 3.0 and math.isnan(one[1]) and math.isnan(one[2])


def test_summary_counts_successes_and_has_none_without_a_rule():
    s = summarize([10.0, 20.0, 30.0, 40.0], [10, 20, 30, 40], [False, True, True, True])
    assert (s.successes, s.success_rate, s.mean_return, s.mean_length) == (3, 0.75, 25.0, 25.0)
    assert (s.success_low, s.success_high) == pytest.approx(wilson_interval(3, 4))
    none = summarize([1.0, 2.0], [1, 2], None)
    assert none.successes is None and none.as_dict()["success_rate"] is None
    with pytest.raises(ValueError, match="equal lengths"):
        summarize([1.0], [1, 2], None)
