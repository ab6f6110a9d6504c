"""Turn the trainer's `--reward_type` flags into a reward: env reward x weight + providers."""

from __future__ import annotations

from openpi_rl.rl.reward import (
    CompositeReward,
    ExternalReward,
    HumanRewardCLI,
    HumanRewardHTTP,
    HumanRewardWebSocket,
    RewardConfig,
    RewardProvider,
)

REWARD_TYPES = ("env", "human_cli", "external", "websocket", "http", "composite")


def make_provider(
    kind: str,
    reward_config: RewardConfig,
    *,
    external_reward_fn: str | None,
    reward_url: str | None,
    reward_timeout_s: float,
    reward_default: float | None,
    reward_token: str | None = None,
) -> RewardProvider:
    """One provider by name (every type except `env` and `composite`)."""
    if kind == "human_cli":
        return HumanRewardCLI(config=reward_config)
    if kind == "external":
        if not external_reward_fn:
            raise ValueError("--reward_type external needs --external_reward_fn module:function")
        return ExternalReward(external_reward_fn, config=reward_config)
    if kind in ("websocket", "http"):
        if not reward_url:
            raise ValueError(f"reward type {kind!r} needs --reward_url")
        cls = HumanRewardWebSocket if kind == "websocket" else HumanRewardHTTP
        return cls(
            reward_url,
            config=reward_config,
            timeout_s=reward_timeout_s,
            default_reward=reward_default,
            token=reward_token,
        )
    raise ValueError(f"unknown reward type {kind!r}; expected one of {REWARD_TYPES}")


def build_reward(
    reward_type: str,
    composite: tuple[str, ...],
    reward_config: RewardConfig,
    **provider_kwargs: object,
) -> tuple[float, RewardProvider | None]:
    """(weight of the env's own reward, provider of the rest or None).

    composite: parts "kind:weight", e.g. ("env:1.0", "external:0.5"); `env` is the
    environment's reward, the other kinds are providers combined by `CompositeReward`.
    """
    if reward_type == "env":
        return 1.0, None
    if reward_type != "composite":
        return 0.0, make_provider(reward_type, reward_config, **provider_kwargs)
    env_weight, parts = 0.0, []
    for part in composite:
        kind, sep, weight = part.partition(":")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(
                f"--composite part {part!r}: weight {weight!r} is not a number"
            ) from None
        if kind == "env":
            env_weight += w
        else:
            parts.append((make_provider(kind, reward_config, **provider_kwargs), w))
    return env_weight, (CompositeReward(parts, config=reward_config) if parts else None)
