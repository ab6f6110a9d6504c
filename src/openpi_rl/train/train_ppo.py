"""`openpi-rl train`: synchronous PPO against gymnasium environments and reward providers.

Rollouts stay in Python (real environments, human raters); sampling is one jitted call per
step on the split nnx state, and the update is the library's fused `ppo_update`. The same
PPO code trains the policy in the service's learner.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from typing import Annotated, Literal

import numpy as np
import structlog
from flax import nnx

from openpi_rl.curves import PPO_NAMES, CurveLogger, CurvesConfig, config_dict, mean
from openpi_rl.models.choice import ModelChoice
from openpi_rl.models.finetune import Finetune, resolve_finetune, trainable
from openpi_rl.models.gaussian_mlp import GaussianMLPConfig
from openpi_rl.rl.ppo import PPOConfig
from openpi_rl.rl.reward import RewardConfig
from openpi_rl.secret import SECRET
from openpi_rl.train.checkpoints import TrainCheckpoints
from openpi_rl.train.display import TrainDisplay
from openpi_rl.train.envs import EnvBatch
from openpi_rl.train.learner import RolloutLearner
from openpi_rl.train.rewards import build_reward
from openpi_rl.weights.start import build_start

log = structlog.get_logger("openpi_rl.train")


# Defaults for gymnasium control tasks: the seed's PPOConfig values (lr 5e-5, 4 epochs) are
# meant for fine-tuning a large pretrained policy; a small MLP from scratch learns faster with
# these (measured on InvertedPendulum-v5 by benchmarks/learn_inverted_pendulum.py).
TRAIN_PPO_DEFAULTS = PPOConfig(
    lr=2e-3, train_iters=10, minibatch_size=64, entropy_coef=0.0, max_grad_norm=0.5
)


@dataclasses.dataclass(frozen=True)
class PPOTrainConfig:
    """Everything `openpi-rl train` needs; every field is a flag (`--ppo.lr 3e-4`)."""

    model: ModelChoice = GaussianMLPConfig()
    ppo: PPOConfig = TRAIN_PPO_DEFAULTS
    env: str = "InvertedPendulum-v5"  # gymnasium id
    num_envs: int = 8  # environments stepped in lockstep
    reward_type: Literal["env", "human_cli", "external", "websocket", "http", "composite"] = "env"
    """Where rewards come from: the environment, a person at this terminal, a Python function,
    a rater over WebSocket or HTTP (the reward bridge's /query), or a weighted mix."""
    reward_config: RewardConfig = RewardConfig()  # clamps provider rewards (not the env's)
    external_reward_fn: str | None = None  # "module:function" for reward_type external
    reward_url: Annotated[str | None, SECRET] = None
    """ws://… or http://… for reward_type websocket / http."""
    reward_timeout_s: float = 30.0  # how long a rater has to answer one query
    reward_default: float | None = None  # reward when a rater times out (None: error)
    reward_token: Annotated[str | None, SECRET] = None  # the bridge's query_token, if it has one
    composite: tuple[str, ...] = ("env:1.0",)  # "kind:weight" parts for reward_type composite
    rollout_length: int = 64  # transitions per env per update
    num_ppo_epochs: int | None = None  # overrides ppo.train_iters when set (seed name)
    num_train_steps: int = 100  # PPO updates (each after one rollout)
    max_env_steps: int | None = None  # stop after this many env steps
    target_return: float | None = None
    """Stop once the mean of the last `target_window` returns reaches it."""
    target_window: int = 20  # episodes averaged for target_return
    value_hidden: tuple[int, ...] = (64, 64)  # the critic MLP on value_features
    finetune: Finetune = "auto"
    """What trains: "full" (every weight), "lora" (LoRA adapters + value head, base frozen) or
    "auto" ("lora" when the model has LoRA weights)."""
    critic_warmup_updates: int = 0  # the first updates train the value head alone (piRL)
    seed: int = 0  # seeds the environments, the initial weights and the sampling
    checkpoint_dir: str | None = None  # orbax checkpoints; a run resumes from the newest
    save_interval: int = 10  # updates between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    export_openpi: str | None = None
    """Write the trained policy here as an openpi checkpoint (`<dir>/params`, openpi's trainer
    layout) when training ends: a service's `[model] checkpoint` starts from it (pi0_fast_openpi
    only)."""
    curves: CurvesConfig = CurvesConfig()
    """Learning curves: TensorBoard files in <dir>/tensorboard (default dir: checkpoint_dir, or
    runs/<env>__<seed>__<unix time>); W&B with `--curves.wandb`."""


@dataclasses.dataclass
class TrainResult:
    updates: int
    env_steps: int
    episodes: list[tuple[int, float, int]]  # (env steps at its end, return, length)
    steps_to_target: int | None
    wall_s: float
    metrics: dict[str, float]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase

    def rates(self) -> dict[str, float]:
        """Env steps/s of sampling (policy calls only) and samples/s of the PPO updates."""
        t = self.timings
        return {
            "sample_steps_per_s": self.env_steps / t["act_s"] if t.get("act_s") else math.nan,
            "update_samples_per_s": t["learn_samples"] / t["learn_s"]
            if t.get("learn_s")
            else math.nan,
        }

    def mean_return(self, window: int = 20) -> float:
        recent = [r for _, r, _ in self.episodes[-window:]]
        return float(np.mean(recent)) if recent else math.nan


def train(config: PPOTrainConfig, display: bool = True) -> TrainResult:
    """Run PPO until `num_train_steps` updates, `max_env_steps` or `target_return`."""
    t_start = time.perf_counter()
    ppo = config.ppo
    if config.num_ppo_epochs is not None:
        ppo = dataclasses.replace(ppo, train_iters=config.num_ppo_epochs)
    env_weight, provider = build_reward(
        config.reward_type,
        config.composite,
        config.reward_config,
        external_reward_fn=config.external_reward_fn,
        reward_url=config.reward_url,
        reward_timeout_s=config.reward_timeout_s,
        reward_default=config.reward_default,
        reward_token=config.reward_token,
    )
    if config.export_openpi is not None and not hasattr(config.model, "checkpoint"):
        raise ValueError("export_openpi: only pi0_fast_openpi has openpi's checkpoint layout")
    env = EnvBatch(config.env, config.num_envs, config.seed)
    model_config = config.model.for_env(env.obs_dim, env.action_dim)
    n, t_len = config.num_envs, config.rollout_length
    h, d = model_config.action_horizon, model_config.action_dim
    ac = build_start(model_config, config.value_hidden, config.seed)  # a checkpoint's, or seeded
    learner = RolloutLearner(
        ac, ppo, config.seed, t_len, n, env.obs_dim, (h, d),
        trainable=trainable(resolve_finetune(ac, config.finetune)),
        critic_warmup_updates=config.critic_warmup_updates,
    )  # fmt: skip

    update, env_steps = 0, 0
    episodes: list[tuple[int, float, int]] = []
    ckpt = None
    if config.checkpoint_dir:
        ckpt = TrainCheckpoints(config.checkpoint_dir, config.keep_checkpoints)
        if (step := ckpt.latest_step()) is not None:
            state, meta = ckpt.restore(step, learner.state())
            learner.load(state)
            update, env_steps = int(meta["update"]), int(meta["env_steps"])
            episodes = [tuple(e) for e in meta["recent_episodes"]]
            env.close()
            env = EnvBatch(config.env, n, config.seed + 7919 * update)  # fresh episodes
            log.info(
                "resumed", checkpoint_dir=str(ckpt.directory), update=update, env_steps=env_steps
            )

    window: deque[float] = deque(
        (r for _, r, _ in episodes[-config.target_window :]), maxlen=config.target_window
    )
    steps_to_target: int | None = None
    metrics: dict[str, float] = {}
    total = config.num_train_steps
    buf = learner.new_rollout()
    timings = {"act_s": 0.0, "learn_s": 0.0, "learn_samples": 0.0}

    def reached() -> bool:
        return (
            config.target_return is not None
            and len(window) == config.target_window
            and float(np.mean(window)) >= config.target_return
        )

    run_name = f"{config.env.replace('/', '_')}__{config.seed}__{int(time.time())}"
    curves = CurveLogger(
        config.curves, config.checkpoint_dir or f"runs/{run_name}", config_dict(config), run_name
    )
    with TrainDisplay(total, start=update) if display else _NoDisplay() as ui, curves:
        while update < total and steps_to_target is None:
            if config.max_env_steps is not None and env_steps >= config.max_env_steps:
                break
            t0, steps0 = time.perf_counter(), env_steps
            ended: list[tuple[float, int, bool]] = []  # (return, length, success) this rollout
            for t in range(t_len):
                buf["obs"][t] = env.obs
                t_act = time.perf_counter()
                actions, logp, value, policy_actions = learner.act(update, t, env.obs)
                timings["act_s"] += time.perf_counter() - t_act
                out, taken = env.step(actions, rescale=model_config.normalized_actions)
                env_steps += taken
                rew = env_weight * out.rewards
                if provider is not None:
                    rew = rew + np.array(
                        [provider.get({"state": buf["obs"][t, i]}, actions[i]) for i in range(n)],
                        np.float32,
                    )
                buf["actions"][t], buf["logp"][t], buf["values"][t], buf["rewards"][t] = (
                    policy_actions, logp, value, rew,
                )  # fmt: skip
                buf["terminated"][t], buf["truncated"][t] = out.terminated, out.truncated
                buf["final_obs"][t] = out.final_obs
                for i, ret, length in out.finished:
                    episodes.append((env_steps, ret, length))
                    ended.append((ret, length, bool(out.success[i])))
                    window.append(ret)
                    if steps_to_target is None and reached():
                        steps_to_target = env_steps
                if steps_to_target is not None:
                    break
            if steps_to_target is not None:
                break  # solved: the rollout is cut short, no update needed
            buf["last_obs"][:] = env.obs
            t_learn = time.perf_counter()
            metrics = learner.learn(update, buf)
            learn_s = time.perf_counter() - t_learn
            if update > 0:  # the first update waits for compilation
                timings["learn_s"] += learn_s
                timings["learn_samples"] += t_len * n * ppo.train_iters
            _write_curves(curves, update, env_steps, env_steps - steps0, t0, learn_s, ended, metrics, ppo.lr)  # fmt: skip
            update += 1
            ui.add(
                {
                    "update": update,
                    "env_steps": env_steps,
                    "return": float(np.mean(window)) if window else None,
                    "steps_per_s": (env_steps - steps0) / (time.perf_counter() - t0),
                    **metrics,
                }
            )
            if ckpt is not None and (update % config.save_interval == 0 or update == total):
                meta = {
                    "update": update,
                    "env_steps": env_steps,
                    "recent_episodes": episodes[-config.target_window :],
                }
                ckpt.save(update, learner.state(), meta)

    if ckpt is not None:
        ckpt.close()
    if config.export_openpi is not None:
        trained = nnx.merge(learner.graphdef, learner.params, learner.rest)
        path = trained.model.save_openpi(config.export_openpi)
        log.info("exported", openpi_checkpoint=str(path))
    env.close()
    if provider is not None:
        provider.close()
    wall = time.perf_counter() - t_start
    return TrainResult(update, env_steps, episodes, steps_to_target, wall, metrics, timings)


def _write_curves(
    curves: CurveLogger,
    version: int,
    env_steps: int,
    rollout_steps: int,
    t0: float,
    learn_s: float,
    ended: list[tuple[float, int, bool]],
    metrics: dict[str, float],
    lr: float,
) -> None:
    """One update's scalars at x = env steps (CleanRL's global_step), and the episodes that
    the policy of `version` (updates before this rollout) played at x = version."""
    returns = [r for r, _, _ in ended]
    lengths = [float(length) for _, length, _ in ended]
    success = [float(s) for _, _, s in ended]
    values: dict[str, float | None] = {
        PPO_NAMES[k]: v for k, v in metrics.items() if k in PPO_NAMES
    }
    values.update({
        "charts/episodic_return": mean(returns), "charts/episodic_length": mean(lengths),
        "charts/success_rate": mean(success), "charts/learning_rate": lr,
        "charts/data_age_versions": 0.0,  # synchronous PPO: every rollout is on-policy
        "charts/SPS": rollout_steps / (time.perf_counter() - t0), "time/update_seconds": learn_s,
    })  # fmt: skip
    curves.scalars(env_steps, values)
    if ended:
        per_version = {
            "version/episodic_return": mean(returns), "version/episodic_length": mean(lengths),
            "version/success_rate": mean(success), "version/episodes": len(ended),
        }  # fmt: skip
        curves.scalars(version, per_version, axis="policy_version")


class _NoDisplay:
    def __enter__(self) -> _NoDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add(self, row: dict) -> None:
        pass
