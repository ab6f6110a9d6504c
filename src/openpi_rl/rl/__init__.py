"""The RL library: the model interface, actor-critic, PPO and reward providers."""

from openpi_rl.rl.actor_critic import ActorCritic, ValueHead
from openpi_rl.rl.ppo import (
    PPOBatch,
    PPOConfig,
    PPOTrainer,
    gae_advantages,
    ppo_loss,
    ppo_step,
    ppo_update,
)
from openpi_rl.rl.reward import (
    CompositeReward,
    ExternalReward,
    HumanRewardCLI,
    HumanRewardHTTP,
    HumanRewardWebSocket,
    RewardConfig,
    RewardError,
    RewardProvider,
)
from openpi_rl.rl.rl_api import ArraySpec, ObsSpec, RLModel, validate_observation

__all__ = [
    "ActorCritic",
    "ArraySpec",
    "CompositeReward",
    "ExternalReward",
    "HumanRewardCLI",
    "HumanRewardHTTP",
    "HumanRewardWebSocket",
    "ObsSpec",
    "PPOBatch",
    "PPOConfig",
    "PPOTrainer",
    "RLModel",
    "RewardConfig",
    "RewardError",
    "RewardProvider",
    "ValueHead",
    "gae_advantages",
    "ppo_loss",
    "ppo_step",
    "ppo_update",
    "validate_observation",
]
