"""The service learns as well as the synchronous trainer: InvertedPendulum-v5 with environment
rewards through the full service against `openpi-rl train` on the same env-step budget.

Service: `openpi-rl daemon` (policy server, reward bridge, learner as child processes) with the
demo's settings (`openpi_rl.demo.config`: gaussian_mlp, `TRAIN_PPO_DEFAULTS`, batches of up to
64 segments x 16 chunks), and N simulated robots, each a `PolicyClient` thread playing
every served chunk in its own MuJoCo environment and reporting its reward: client, ZMQ,
micro-batching, replay on disk, asynchronous learner, hot-swapped versions. No operator.
Synchronous: `openpi_rl.train.train_ppo.train` (8 envs x 64 steps per update), same model,
same PPO settings, same seed, stopped at the same number of env steps.

Both figures are the mean return of the last 20 episodes at the end of the budget.

    python benchmarks/learn_service.py             # 150k env steps each
    python benchmarks/learn_service.py --quick     # smoke run: 2k env steps

Last line: {"service_return", "sync_return", "service_over_sync", ...} (goal: ratio >= 0.9).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.demo import DemoConfig, run_demo
from openpi_rl.train.train_ppo import PPOTrainConfig, train


@dataclasses.dataclass
class Args:
    budget: int = 150_000  # env steps for each side
    robots: int = 2
    seed: int = 0
    env: str = "InvertedPendulum-v5"
    window: int = 20  # episodes in the final mean return
    max_minutes: float = 30.0  # the service's wall-clock cap
    quick: bool = False  # smoke run: 2k env steps


def main(args: Args) -> dict:
    budget = 2_000 if args.quick else args.budget

    t0 = time.perf_counter()
    service = run_demo(
        DemoConfig(
            minutes=args.max_minutes, robots=args.robots, env=args.env, seed=args.seed,
            operator=False, max_env_steps=budget,
        ),
        display=False,
    )  # fmt: skip
    service_s = time.perf_counter() - t0
    if service.daemon_rc != 0:
        raise SystemExit(f"openpi-rl daemon exited with {service.daemon_rc}")
    service_return = sum(e.ret for e in service.episodes[-args.window :]) / max(
        1, len(service.episodes[-args.window :])
    )
    print(
        f"service: {service.env_steps:,} env steps, {len(service.episodes):,} episodes, "
        f"{service.max_version} versions in {service_s:.0f} s; mean return of the last "
        f"{args.window}: {service_return:.1f} (first version {service.first_version_return:.1f})",
        flush=True,
    )

    t0 = time.perf_counter()
    sync = train(
        PPOTrainConfig(env=args.env, seed=args.seed, num_train_steps=10**9, max_env_steps=budget),
        display=False,
    )
    sync_s = time.perf_counter() - t0
    sync_return = sync.mean_return(args.window)
    print(
        f"openpi-rl train: {sync.env_steps:,} env steps, {len(sync.episodes):,} episodes, "
        f"{sync.updates} updates in {sync_s:.0f} s; mean return of the last {args.window}: "
        f"{sync_return:.1f}",
        flush=True,
    )
    ratio = service_return / sync_return if sync_return else math.nan
    print(f"service / synchronous: {ratio:.3f}", flush=True)
    return {
        "service_return": round(service_return, 2),
        "sync_return": round(sync_return, 2),
        "service_over_sync": round(ratio, 4),
        "budget": budget,
        "service_env_steps": service.env_steps,
        "sync_env_steps": sync.env_steps,
        "service_versions": service.max_version,
        "service_first_version_return": round(service.first_version_return, 2),
        "service_p99_ms": round(service.p99_ms, 2),
        "service_wall_s": round(service_s, 1),
        "sync_wall_s": round(sync_s, 1),
        "robots": args.robots,
        "seed": args.seed,
    }


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
