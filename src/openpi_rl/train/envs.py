"""A batch of gymnasium environments stepped in lockstep, one action chunk per transition.

Our own loop rather than gymnasium's vector envs because a transition here is a chunk of H
actions (as on the robot, and as πRL treats pi0): each env plays its chunk, its rewards are
summed, and an episode that ends mid-chunk stops there. We also need the final observation of
a time-limited episode to bootstrap from, which this loop keeps explicitly.
"""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np


@dataclasses.dataclass
class ChunkStep:
    """What `EnvBatch.step` returns for N envs."""

    obs: np.ndarray  # [N, obs_dim] next observation (first of a new episode after an end)
    rewards: np.ndarray  # [N] env reward summed over the chunk
    terminated: np.ndarray  # [N] bool
    truncated: np.ndarray  # [N] bool, time limit
    final_obs: np.ndarray  # [N, obs_dim] last observation of an episode that ended (else obs)
    finished: list[tuple[int, float, int]]  # (env index, episode return, episode length)
    success: np.ndarray  # [N] bool: the episode that ended here succeeded (see `succeeded`)


def succeeded(info: dict, terminated: bool, truncated: bool) -> bool:
    """Whether an episode that ended succeeded: the env's `info["is_success"]` when it reports
    one (gymnasium-robotics, SB3's success rate), else whether it ran to its time limit without
    terminating (the control tasks: the pendulum stayed up)."""
    if "is_success" in info:
        return bool(info["is_success"])
    return bool(truncated and not terminated)


def flat_obs_dim(space: gym.Space) -> int:
    return int(gym.spaces.flatdim(space))


class EnvBatch:
    """N copies of one gymnasium env id; observations flattened to float32 vectors."""

    def __init__(self, env_id: str, num_envs: int, seed: int):
        self.envs = [gym.make(env_id) for _ in range(num_envs)]
        space = self.envs[0].action_space
        if not isinstance(space, gym.spaces.Box):
            raise ValueError(
                f"env {env_id!r}: expected a continuous (Box) action space, got {space}"
            )
        self.obs_space = self.envs[0].observation_space
        self.low, self.high = space.low.astype(np.float32), space.high.astype(np.float32)
        self.obs_dim = flat_obs_dim(self.obs_space)
        self.action_dim = int(np.prod(space.shape))
        self._returns = np.zeros(num_envs)
        self._lengths = np.zeros(num_envs, np.int64)
        self.obs = np.stack(
            [self._flat(env.reset(seed=seed + i)[0]) for i, env in enumerate(self.envs)]
        )

    def _flat(self, obs: object) -> np.ndarray:
        return np.asarray(gym.spaces.flatten(self.obs_space, obs), np.float32)

    def step(self, chunks: np.ndarray, rescale: bool = False) -> tuple[ChunkStep, int]:
        """Play one chunk [H, D] per env. Returns the step and the number of env steps taken.

        rescale: the chunks are in [-1, 1] (a normalised policy) and map onto the env's bounds;
        otherwise they are in env units and clipped to the bounds.
        """
        if rescale:
            chunks = self.low + (np.clip(chunks, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)
        n = len(self.envs)
        rewards = np.zeros(n, np.float32)
        term, trunc, success = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        final = self.obs.copy()
        finished, env_steps = [], 0
        for i, env in enumerate(self.envs):
            for action in np.clip(chunks[i], self.low, self.high):
                obs, r, term[i], trunc[i], info = env.step(action)
                rewards[i] += r
                env_steps += 1
                self._lengths[i] += 1
                if term[i] or trunc[i]:
                    break
            self._returns[i] += rewards[i]
            final[i] = self._flat(obs)
            if term[i] or trunc[i]:
                finished.append((i, float(self._returns[i]), int(self._lengths[i])))
                success[i] = succeeded(info, term[i], trunc[i])
                self._returns[i], self._lengths[i] = 0.0, 0
                obs, _ = env.reset()
            self.obs[i] = self._flat(obs)
        step = ChunkStep(self.obs.copy(), rewards, term, trunc, final, finished, success)
        return step, env_steps

    def close(self) -> None:
        for env in self.envs:
            env.close()
