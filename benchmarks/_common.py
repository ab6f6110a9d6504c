"""Shared helpers for the benchmark scripts.

Both our JAX trainer and the Stable-Baselines3 baseline are scored with the same
`steps_to_threshold` criterion, so the two "steps to solve" figures are comparable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def steps_to_threshold(
    episode_end_steps: Sequence[int],
    episode_returns: Sequence[float],
    threshold: float = 950.0,
    window: int = 20,
) -> int | None:
    """Env steps needed until the rolling mean return first reaches ``threshold``.

    Episodes are listed in completion order; ``episode_end_steps[i]`` is the total
    env-step count (summed over all envs) at which episode ``i`` completed, and
    ``episode_returns[i]`` its undiscounted return.

    Returns the step count at the first episode completion after which the mean
    return of the last ``window`` completed episodes is ``>= threshold``. At least
    ``window`` episodes must have completed. Returns ``None`` if that never happens.
    """
    if len(episode_end_steps) != len(episode_returns):
        raise ValueError(
            f"length mismatch: {len(episode_end_steps)} end steps vs {len(episode_returns)} returns"
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    returns = [float(r) for r in episode_returns]
    for i in range(window - 1, len(returns)):
        mean = sum(returns[i - window + 1 : i + 1]) / window
        if mean >= threshold:
            return int(episode_end_steps[i])
    return None


def print_json(obj: dict[str, Any]) -> None:
    """Print ``obj`` as a single-line JSON object (the benchmark's final result line)."""
    print(json.dumps(obj), flush=True)
