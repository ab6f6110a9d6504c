"""Stable-Baselines3 PPO baseline for the benchmarks (CPU, PyTorch, 1 thread).

Two measurements, importable as functions:

* `sb3_steps_to_threshold`: sample efficiency and wall time of stock SB3 PPO (all
  defaults) on a Gymnasium MuJoCo task, scored with the shared
  `benchmarks._common.steps_to_threshold` criterion.
* `sb3_update_samples_per_s`: throughput of SB3's PPO update step (`model.train()`)
  alone, on one rollout buffer filled with real env data.

Needs the comparison deps (``make bench-deps``): torch (CPU wheel) and stable-baselines3.
Run ``python -m benchmarks._sb3`` from the repo root to measure seeds 0, 1, 2.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import gymnasium as gym

try:
    from benchmarks._common import print_json, steps_to_threshold
except ImportError:  # run as a script: ``python benchmarks/_sb3.py``
    from _common import print_json, steps_to_threshold  # type: ignore[no-redef]


def _make_env(env_id: str) -> Any:
    """A Monitor-wrapped Gymnasium env: Monitor puts ``info["episode"]`` on episode end."""
    from stable_baselines3.common.monitor import Monitor

    return Monitor(gym.make(env_id))


def _threshold_callback(
    threshold: float, window: int, max_steps: int
) -> tuple[Any, list[int], list[float]]:
    """Build an SB3 callback that records finished episodes and stops training.

    Returns ``(callback, episode_end_steps, episode_returns)``; the two lists are
    filled in place during training.
    """
    from stable_baselines3.common.callbacks import BaseCallback

    end_steps: list[int] = []
    returns: list[float] = []

    class _StopAtThreshold(BaseCallback):
        def _on_step(self) -> bool:
            # SB3 increments ``num_timesteps`` by ``n_envs`` right after ``env.step``
            # and before calling the callback, so it is the exact env-step count.
            for info in self.locals["infos"]:
                ep = info.get("episode")
                if ep is not None:
                    end_steps.append(int(self.num_timesteps))
                    returns.append(float(ep["r"]))
                    if len(returns) >= window and sum(returns[-window:]) / window >= threshold:
                        return False
            return self.num_timesteps < max_steps

    return _StopAtThreshold(), end_steps, returns


def sb3_steps_to_threshold(
    seed: int,
    env_id: str = "InvertedPendulum-v5",
    threshold: float = 950.0,
    window: int = 20,
    max_steps: int = 100_000,
) -> tuple[int | None, float]:
    """Train stock SB3 PPO until the threshold criterion is met or ``max_steps``.

    ``PPO("MlpPolicy", env, seed=seed, device="cpu")`` with all SB3 defaults
    (n_steps=2048, one env, batch 64, 10 epochs, 64x64 tanh MLP), torch on 1 thread.

    Returns ``(steps, wall_s)``: ``steps`` is `steps_to_threshold` over the finished
    episodes (``None`` if not reached within ``max_steps``), and ``wall_s`` the wall
    seconds from env/model construction until training stopped.
    """
    import torch
    from stable_baselines3 import PPO

    torch.set_num_threads(1)
    callback, end_steps, returns = _threshold_callback(threshold, window, max_steps)

    t0 = time.perf_counter()
    model = PPO("MlpPolicy", _make_env(env_id), seed=seed, device="cpu")
    model.learn(total_timesteps=max_steps, callback=callback)
    wall_s = time.perf_counter() - t0
    model.get_env().close()

    return steps_to_threshold(end_steps, returns, threshold=threshold, window=window), wall_s


def sb3_update_samples_per_s(
    n_samples: int = 2048,
    n_epochs: int = 10,
    batch_size: int = 64,
    repeats: int = 5,
    env_id: str = "InvertedPendulum-v5",
) -> float:
    """Throughput of SB3's PPO update (``model.train()``) alone, in samples/s.

    Builds SB3 PPO (default 64x64 MlpPolicy, CPU, torch on 1 thread) with
    ``n_steps=n_samples``, fills the rollout buffer once with real env data via
    ``model.learn(total_timesteps=n_samples)`` (which also runs one warm-up update),
    then times ``model.train()`` ``repeats`` times. Returns
    ``n_samples * n_epochs / median_seconds``.
    """
    import torch
    from stable_baselines3 import PPO

    torch.set_num_threads(1)
    model = PPO(
        "MlpPolicy",
        _make_env(env_id),
        n_steps=n_samples,
        batch_size=batch_size,
        n_epochs=n_epochs,
        seed=0,
        device="cpu",
    )
    model.learn(total_timesteps=n_samples)  # one rollout + one (warm-up) train()
    assert model.rollout_buffer.full, "rollout buffer was not filled"

    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.train()
        times.append(time.perf_counter() - t0)
    model.get_env().close()
    return n_samples * n_epochs / statistics.median(times)


def main() -> None:
    results: dict[str, Any] = {"env_id": "InvertedPendulum-v5", "seeds": {}}
    for seed in (0, 1, 2):
        steps, wall_s = sb3_steps_to_threshold(seed)
        print(f"seed {seed}: steps_to_950={steps} wall_s={wall_s:.1f}", flush=True)
        results["seeds"][str(seed)] = {"steps_to_950": steps, "wall_s": round(wall_s, 2)}
    sps = sb3_update_samples_per_s()
    print(f"SB3 train() samples/s: {sps:,.0f}", flush=True)
    results["sb3_train_samples_per_s"] = round(sps, 1)
    print_json(results)


if __name__ == "__main__":
    main()
