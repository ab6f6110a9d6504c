"""Reward providers: where the scalar reward for one (observation, action chunk) comes from.

Owns the `RewardProvider` interface and its implementations: a human at the terminal
(`HumanRewardCLI`), a human behind a WebSocket or HTTP feedback server (`HumanRewardWebSocket`,
`HumanRewardHTTP`), a Python function (`ExternalReward`) and a weighted sum of these
(`CompositeReward`). The rollout loop calls `provider.get(observation, actions)`; nothing here
knows about models or PPO.

Every built-in provider returns a finite Python float clamped to its `RewardConfig` range;
a value that is not a single finite number raises `RewardError` naming the provider.

This module is the public face; the code lives by role in
`reward_base` (the interface, `RewardConfig`, `RewardError`, `check_reward`),
`reward_human` (CLI, WebSocket and HTTP providers, and the JSON wire format they speak) and
`reward_external` (`ExternalReward`, `CompositeReward`).
"""

from openpi_rl.rl.reward_base import (
    RewardConfig,
    RewardError,
    RewardProvider,
    check_reward,
    logger,
)
from openpi_rl.rl.reward_external import (
    CompositeReward,
    ExternalReward,
    RewardFn,
    import_function,
)
from openpi_rl.rl.reward_human import (
    HumanRewardCLI,
    HumanRewardHTTP,
    HumanRewardWebSocket,
    decode_reply,
    encode_request,
    summarize_step,
)

__all__ = [
    "CompositeReward",
    "ExternalReward",
    "HumanRewardCLI",
    "HumanRewardHTTP",
    "HumanRewardWebSocket",
    "RewardConfig",
    "RewardError",
    "RewardFn",
    "RewardProvider",
    "check_reward",
    "decode_reply",
    "encode_request",
    "import_function",
    "logger",
    "summarize_step",
]
