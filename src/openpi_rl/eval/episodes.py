"""A published version as a policy, and its episodes on a gymnasium task.

A version is restored (verified against its manifest first) over the actor-critic its run
built (`weights.start.build_start` on the same model config), so the policy evaluated is the
one the servers loaded. Actions: greedy (a Gaussian policy's mean, a token policy's argmax
tokens) or sampled with keys from (seed, episode, step), so two versions meet the same
initial states and, sampled, the same noise. A chunk [H, D] is played action by action as the
trainer and the demo's robots play it: rescaled from [-1, 1] for a normalised policy, clipped
to the env's bounds, cut where the episode ends.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import jax
import numpy as np
from flax import nnx

from openpi_rl.weights.start import build_start, is_version_dir
from openpi_rl.weights.versions import restore_version, verify_version

# Tasks whose episodes end early only on failure: success is reaching the time limit.
_SURVIVAL = re.compile(r"^(InvertedPendulum|InvertedDoublePendulum)-v\d+$")


def success_rule(env_id: str) -> str:
    """How an episode of `env_id` counts as a success: "survived" (it reached the time limit
    without terminating: InvertedPendulum, InvertedDoublePendulum) or "info" (any other task:
    the env's `info["is_success"]` at the episode's end, as gymnasium-robotics' tasks report
    it; an env without it has no success rate)."""
    return "survived" if _SURVIVAL.match(env_id) else "info"


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    seed: int  # the env's reset seed
    ret: float  # sum of the env's rewards
    length: int  # env steps
    terminated: bool
    truncated: bool
    success: bool | None  # None: the task has no success rule
    frames: int = 0  # frames rendered (0: not recorded)


def versions_in(checkpoint_dir: str | Path) -> list[int]:
    """The published versions under `checkpoint_dir` (directories named by a number that hold
    a manifest), sorted."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise ValueError(f"checkpoint_dir {root}: no such directory")
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and is_version_dir(p))


def load_version(
    checkpoint_dir: str | Path,
    version: int,
    model_config: Any,
    value_hidden: tuple[int, ...],
    seed: int = 0,
) -> nnx.Module:
    """The actor-critic of `version`: built from `model_config` (already sized for the env) and
    restored from `<checkpoint_dir>/<version>` after checking its manifest. Version 0 that
    retention has deleted is rebuilt from the run's `seed`: it is the start every role builds
    (`build_start`), the weights the learner saved as version 0. ValueError naming the versions
    there for any other version that is not on disk."""
    available = versions_in(checkpoint_dir)
    if version == 0 and 0 not in available:
        return build_start(model_config, value_hidden, seed)
    if version not in available:
        raise ValueError(
            f"{checkpoint_dir}: no published version {version} (versions: {available or 'none'};"
            " `openpi-rl learn`, the daemon or the demo publish them)"
        )
    path = Path(checkpoint_dir) / str(version)
    verify_version(path, version)
    if hasattr(model_config, "checkpoint"):  # restored over: no need to read the start's
        model_config = dataclasses.replace(model_config, checkpoint=None)
    ac = build_start(model_config, value_hidden, seed)
    nnx.update(ac, restore_version(path, ac))
    return ac


def _greedy(model: Any, key: jax.Array, obs: dict) -> jax.Array:
    if hasattr(model, "mean"):  # a Gaussian policy: its mean
        return model.mean(obs)
    if hasattr(model, "decode") and hasattr(model, "to_actions"):  # a token policy: argmax
        return model.to_actions(model.decode(key, obs, greedy=True)["ids"])
    raise ValueError(f"{type(model).__name__}: no greedy action (no `mean`, no `decode`); "
                     "evaluate it sampled")  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1))
def _act(graphdef: Any, greedy: bool, state: Any, key: jax.Array, obs: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state).model
    o = {"state": obs}
    return _greedy(model, key, o) if greedy else model.sample_actions(key, o)


def make_policy(ac: nnx.Module, greedy: bool) -> Callable[[np.ndarray, jax.Array], np.ndarray]:
    """`policy(obs [obs_dim], key) -> chunk [H, D]`: one jitted call per chunk; versions of one
    model share the compiled function."""
    graphdef, state = nnx.split(ac)

    def policy(obs: np.ndarray, key: jax.Array) -> np.ndarray:
        return np.asarray(_act(graphdef, greedy, state, key, np.asarray(obs, np.float32)[None]))[0]

    return policy


def make_env(
    env_id: str, max_episode_steps: int | None, render_size: tuple[int, int] | None
) -> gym.Env:
    """`gym.make(env_id)`; render_size (width, height): rgb_array frames (call `headless_gl`
    first on a machine without a display)."""
    kwargs: dict[str, Any] = {}
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    if render_size is not None:
        kwargs.update(render_mode="rgb_array", width=render_size[0], height=render_size[1])
    env = gym.make(env_id, **kwargs)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ValueError(f"env {env_id!r}: expected a continuous (Box) action space, "
                         f"got {env.action_space}")  # fmt: skip
    return env


def run_episode(
    env: gym.Env,
    policy: Callable[[np.ndarray, jax.Array], np.ndarray],
    seed: int,
    key: jax.Array,
    rule: str | None,
    rescale: bool = False,
    on_frame: Callable[[np.ndarray], None] | None = None,
) -> EpisodeResult:
    """One episode from `env.reset(seed=seed)`; the chunk at step t is drawn with
    `fold_in(key, t)`. on_frame: gets `env.render()` after the reset and after every step
    (length + 1 frames)."""
    space = env.action_space
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    obs, _ = env.reset(seed=seed)
    if on_frame is not None:
        on_frame(env.render())
    ret, length, terminated, truncated, info = 0.0, 0, False, False, {}
    chunk_index = 0
    while not (terminated or truncated):
        flat = gym.spaces.flatten(env.observation_space, obs)
        chunk = policy(flat, jax.random.fold_in(key, chunk_index))
        chunk_index += 1
        if rescale:
            chunk = low + (np.clip(chunk, -1.0, 1.0) + 1.0) * 0.5 * (high - low)
        for action in np.clip(chunk.reshape(-1, *space.shape), low, high):
            obs, reward, terminated, truncated, info = env.step(action)
            ret += float(reward)
            length += 1
            if on_frame is not None:
                on_frame(env.render())
            if terminated or truncated:
                break
    if rule == "survived":
        success: bool | None = bool(truncated and not terminated)
    elif rule == "info" and "is_success" in info:
        success = bool(info["is_success"])
    else:
        success = None
    return EpisodeResult(seed, ret, length, bool(terminated), bool(truncated), success,
                         length + 1 if on_frame is not None else 0)  # fmt: skip
