"""Confidence intervals for an evaluation: success rate (Wilson score interval) and mean return
(Student's t interval). Pure functions of numbers; no state."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n` (Wilson 1927; Brown, Cai
    & DasGupta 2001 recommend it over the normal interval for small n and rates near 0 or 1,
    which is where a policy's success rate lives). n = 0: (nan, nan)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes: expected 0 <= successes <= n = {n}, got {successes}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence}")
    if n == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean of `values` [N] (the sample standard
    deviation, N - 1 degrees of freedom). N < 2: the bounds are nan; equal values: a point."""
    x = np.asarray(values, np.float64)
    if x.ndim != 1:
        raise ValueError(f"values: expected a 1-D sequence, got shape {x.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence}")
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(
        stats.t.ppf(0.5 + confidence / 2.0, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    )
    return mean, mean - half, mean + half


@dataclasses.dataclass(frozen=True)
class Summary:
    """One version's evaluation in numbers (what the table and the JSON summary show)."""

    episodes: int
    mean_return: float
    return_low: float
    return_high: float
    mean_length: float
    successes: int | None  # None: the task has no success rule
    success_rate: float | None
    success_low: float | None
    success_high: float | None
    confidence: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in dataclasses.asdict(self).items()}  # fmt: skip


def summarize(
    returns: Sequence[float],
    lengths: Sequence[int],
    successes: Sequence[bool] | None,
    confidence: float = 0.95,
) -> Summary:
    """Summary of N episodes: returns [N], lengths [N], successes [N] (None: no success rule)."""
    if len(returns) != len(lengths) or (successes is not None and len(successes) != len(returns)):
        raise ValueError(
            f"returns, lengths, successes: expected equal lengths, got {len(returns)}, "
            f"{len(lengths)}, {None if successes is None else len(successes)}"
        )
    mean, low, high = mean_interval(returns, confidence)
    k = None if successes is None else int(sum(bool(s) for s in successes))
    n = len(returns)
    rate = None if k is None or n == 0 else k / n
    s_low, s_high = (None, None) if k is None else wilson_interval(k, n, confidence)
    return Summary(
        episodes=n, mean_return=mean, return_low=low, return_high=high,
        mean_length=float(np.mean(lengths)) if n else math.nan,
        successes=k, success_rate=rate, success_low=s_low, success_high=s_high,
        confidence=confidence,
    )  # fmt: skip
