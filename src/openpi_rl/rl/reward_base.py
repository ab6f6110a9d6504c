"""The reward interface: `RewardProvider`, its clamp range and the check every value passes.

Owns what all providers share: `RewardError`, `RewardConfig` (the clamp range), `check_reward`
(one finite Python float, else RewardError naming the source) and the `RewardProvider` base
class, whose `get` checks and clamps what a subclass's `_get` returns. The providers themselves
live in `reward_human` (a person answers) and `reward_external` (code answers); import them all
from `openpi_rl.rl.reward`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import numpy as np
import structlog

logger = structlog.get_logger(__name__)


class RewardError(ValueError):
    """A reward could not be obtained, or the value obtained is not a finite number."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The range every provider clamps its reward to."""

    min_reward: float = -1.0  # a lower reward is raised to this
    max_reward: float = 1.0  # a higher reward is lowered to this

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_reward) and math.isfinite(self.max_reward)):
            raise ValueError(
                f"RewardConfig: expected finite bounds, got [{self.min_reward}, {self.max_reward}]"
            )
        if self.min_reward > self.max_reward:
            raise ValueError(
                f"RewardConfig: expected min_reward <= max_reward, "
                f"got [{self.min_reward}, {self.max_reward}]"
            )

    def clamp(self, value: float) -> float:
        return min(max(value, self.min_reward), self.max_reward)


def check_reward(value: Any, source: str) -> float:
    """Returns `value` as a finite Python float, or raises RewardError naming `source`.

    Accepts Python and numpy numbers (bools included) and arrays of exactly one element, so a
    function may return `np.float32(x)` or a `[1]`-shaped JAX array.
    """
    # np.asarray would turn "0.5" into a string array; refuse text before it gets that far.
    if value is None or isinstance(value, str | bytes):
        raise RewardError(f"{source}: expected a finite number, got {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # arbitrary objects may fail conversion in arbitrary ways
        raise RewardError(f"{source}: expected a finite number, got {value!r}") from e
    if arr.dtype.kind not in "biuf":
        raise RewardError(
            f"{source}: expected a finite number, got {type(value).__name__} {value!r:.80}"
        )
    if arr.size != 1:
        raise RewardError(
            f"{source}: expected a single number, got an array of shape {list(arr.shape)}"
        )
    reward = float(arr.reshape(()))
    if not math.isfinite(reward):
        raise RewardError(f"{source}: expected a finite number, got {reward}")
    return reward


class RewardProvider(abc.ABC):
    """Gives the scalar reward for one observation and the action chunk taken from it.

    Subclasses implement `_get`; `get` checks its value (one finite number, else RewardError)
    and clamps it to `self.config`. A subclass may instead override `get` itself, as the design
    doc's example does; it then does its own checking.
    """

    config: RewardConfig = RewardConfig()

    def __init__(self, config: RewardConfig = RewardConfig()) -> None:
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that overrides `get` (the design doc's style) has no use for `_get`; make it
        # concrete so ABCMeta, which runs after this hook, does not refuse to instantiate it.
        if "get" in cls.__dict__ and getattr(cls._get, "__isabstractmethod__", False):
            cls._get = _unused_get  # type: ignore[method-assign]

    def get(self, observation: dict, actions: np.ndarray) -> float:
        """The reward for taking `actions` ([action_horizon, action_dim]) from `observation`."""
        reward = check_reward(self._get(observation, actions), repr(self))
        clamped = self.config.clamp(reward)
        if clamped != reward:
            logger.debug("reward.clamped", provider=repr(self), reward=reward, clamped=clamped)
        return clamped

    @abc.abstractmethod
    def _get(self, observation: dict, actions: np.ndarray) -> Any:
        """The raw reward; `get` validates and clamps it."""

    def close(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Releases connections; idempotent. The base class holds none."""

    def __enter__(self) -> RewardProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return type(self).__name__


def _unused_get(self: RewardProvider, observation: dict, actions: np.ndarray) -> Any:
    raise NotImplementedError(f"{type(self).__name__} overrides get(); _get is not used")
