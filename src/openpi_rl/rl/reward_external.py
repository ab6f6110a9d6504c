"""Programmatic reward providers: a Python function, and a weighted sum of other providers.

`ExternalReward` wraps a function `(observation, actions) -> float`, given as a callable or an
import path; `CompositeReward` sums other providers' rewards with weights (e.g. a scripted reward
plus a human's). Neither waits on a person.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from openpi_rl.rl.reward_base import RewardConfig, RewardError, RewardProvider, check_reward

RewardFn = Callable[[dict, np.ndarray], Any]


class ExternalReward(RewardProvider):
    """Wraps a function `(observation, actions) -> float`, given as a callable or as an import
    path "package.module:function" (or "package.module.function")."""

    def __init__(
        self,
        fn: RewardFn | str,
        config: RewardConfig = RewardConfig(),  # noqa: B008 (RewardConfig is frozen)
    ) -> None:
        super().__init__(config)
        if isinstance(fn, str):
            self._name = fn
            fn = import_function(fn)
        else:
            if not callable(fn):
                raise TypeError(f"ExternalReward: expected a callable or a string, got {fn!r}")
            self._name = getattr(fn, "__qualname__", repr(fn))
        self.fn = fn

    def _get(self, observation: dict, actions: np.ndarray) -> Any:
        return self.fn(observation, actions)

    def __repr__(self) -> str:
        return f"ExternalReward({self._name})"


def import_function(path: str) -> Callable[..., Any]:
    """Resolves "package.module:attr.attr" or "package.module.function" to a callable."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise RewardError(
            f'reward function {path!r}: expected "module:function" or "module.function"'
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(f"reward function {path!r}: cannot import {module_name!r}: {e}") from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise RewardError(
                f"reward function {path!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from e
    if not callable(obj):
        raise RewardError(f"reward function {path!r}: {type(obj).__name__} is not callable")
    return obj


class CompositeReward(RewardProvider):
    """The weighted sum of other providers' rewards, clamped to this provider's own range.

    Each part is queried in order and each value checked, so a bad part is named in the error.
    """

    def __init__(
        self,
        parts: Sequence[tuple[RewardProvider, float]],
        config: RewardConfig = RewardConfig(),  # noqa: B008 (RewardConfig is frozen)
    ) -> None:
        super().__init__(config)
        parts = list(parts)
        if not parts:
            raise ValueError("CompositeReward: expected at least one (provider, weight) pair")
        for i, part in enumerate(parts):
            if not (isinstance(part, tuple | list) and len(part) == 2):
                raise ValueError(
                    f"CompositeReward parts[{i}]: expected (provider, weight), got {part!r}"
                )
            provider, weight = part
            if not isinstance(provider, RewardProvider):
                raise TypeError(
                    f"CompositeReward parts[{i}]: expected a RewardProvider, got {provider!r}"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float | np.number):
                raise ValueError(
                    f"CompositeReward parts[{i}]: weight must be a number, got {weight!r}"
                )
            if not math.isfinite(weight):
                raise ValueError(f"CompositeReward parts[{i}]: weight must be finite, got {weight}")
        self.parts = [(provider, float(weight)) for provider, weight in parts]

    def _get(self, observation: dict, actions: np.ndarray) -> float:
        return math.fsum(
            weight * check_reward(provider.get(observation, actions), repr(provider))
            for provider, weight in self.parts
        )

    def close(self) -> None:
        for provider, _ in self.parts:
            provider.close()

    def __repr__(self) -> str:
        return "CompositeReward(" + ", ".join(f"{p!r}*{w:g}" for p, w in self.parts) + ")"
