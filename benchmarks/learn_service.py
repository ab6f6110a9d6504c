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

`--model pi0_fast_openpi` (issue 15): fine-tuning a pretrained openpi Pi0-FAST through the
service. A weak policy is pretrained briefly with `openpi-rl train` (openpi's Pi0-FAST, dummy
PaliGemma, the tokenizer fixtures, the state written into the prompt, full weights) and exported
as an openpi checkpoint (`--export-openpi`); the service starts every role from that checkpoint
with LoRA adapters added (`gemma_variant = "dummy_lora"`: the learner trains only the adapters
and the value head, after `--warmup` value-only updates; an update's epochs stop once its KL
passes 1.5 x `--target-kl`, SB3's rule), and the robots send the prompt with every
observation (the server tokenizes it with the state). Figures: the mean return of episodes
played by version 0 (the pretrained policy as served) against the last 200 (episodes are short:
the last 20 are also printed), and how many stored rows carry the prompt (goal: ratio >= 2,
every row).

    python benchmarks/learn_service.py --model pi0_fast_openpi --budget 200000
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import tyro

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.demo import DemoConfig, run_demo
from openpi_rl.demo.config import write_demo_config
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
    model: Literal["gaussian_mlp", "pi0_fast_openpi"] = "gaussian_mlp"
    """gaussian_mlp: the service against `openpi-rl train`; pi0_fast_openpi: a pretrained openpi
    Pi0-FAST fine-tuned with LoRA through the service."""
    pretrain_steps: int = 1_500  # pi0_fast_openpi: env steps of the weak pretrained policy
    lr: float = 5e-4  # pi0_fast_openpi: the learner's PPO step size (LoRA adapters)
    warmup: int = 5  # pi0_fast_openpi: value-only updates before the policy moves
    target_kl: float | None = 0.02  # pi0_fast_openpi: an update's epochs stop past 1.5x this
    openpi_window: int = 200  # pi0_fast_openpi: episodes in the final mean return
    workdir: str | None = None  # pi0_fast_openpi: keep the checkpoint, replay and logs here


PROMPT = "balance the pole"


def main(args: Args) -> dict:
    if args.model == "pi0_fast_openpi":
        return main_openpi(args)
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


def main_openpi(args: Args) -> dict:
    from learn_inverted_pendulum import token_model

    from openpi_rl.replay import ReplayReader
    from openpi_rl.train.train_ppo import TRAIN_PPO_DEFAULTS

    budget = 1_500 if args.quick else args.budget
    pretrain = 300 if args.quick else args.pretrain_steps
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="learn-service-openpi-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # learn_inverted_pendulum.py's openpi Pi0-FAST: dummy PaliGemma, the tokenizer fixtures, one
    # action per chunk, the state written into the fixed prompt "balance the pole".
    model = token_model("pi0_fast_openpi")
    assert model.prompt == PROMPT
    t0 = time.perf_counter()
    pre = train(
        PPOTrainConfig(
            model=model, ppo=dataclasses.replace(TRAIN_PPO_DEFAULTS, lr=3e-4), env=args.env,
            seed=args.seed, num_train_steps=10**9, max_env_steps=pretrain,
            export_openpi=str(workdir / "pretrained"),
        ),
        display=False,
    )  # fmt: skip
    print(
        f"pretrained with openpi-rl train: {pre.env_steps:,} env steps in "
        f"{time.perf_counter() - t0:.0f} s, mean return of the last {args.window}: "
        f"{pre.mean_return(args.window):.1f}; exported to {workdir / 'pretrained'}",
        flush=True,
    )
    model_toml = f"""[model]                     # the pretrained openpi checkpoint, LoRA adapters added
kind = "pi0_fast_openpi"
gemma_variant = "dummy_lora"
scan = false
checkpoint = "{workdir / "pretrained"}"
paligemma_tokenizer = "{model.paligemma_tokenizer}"
fast_tokenizer = "{model.fast_tokenizer}"
cameras = []
state_dim = 4
action_dim = 1
action_horizon = 1
max_token_len = 32
max_decoding_steps = 6
constrain_actions = true"""
    path = write_demo_config(
        workdir / "service", args.robots, "benchmark", args.seed, model=model_toml,
        ppo=dataclasses.replace(TRAIN_PPO_DEFAULTS, lr=args.lr, target_kl=args.target_kl),
        learn={"critic_warmup_updates": args.warmup, "finetune": "lora"},
    )  # fmt: skip
    t0 = time.perf_counter()
    service = run_demo(
        DemoConfig(
            minutes=args.max_minutes, robots=args.robots, env=args.env, seed=args.seed,
            operator=False, max_env_steps=budget, config=str(path), prompt=PROMPT,
            workdir=str(workdir / "demo"), keep=True,
        ),
        display=False,
    )  # fmt: skip
    service_s = time.perf_counter() - t0
    if service.daemon_rc != 0:
        raise SystemExit(f"openpi-rl daemon exited with {service.daemon_rc}")
    # Episodes here last ~10-20 steps: the last 20 are a few hundred env steps of a 200k-step
    # run, so the final figure averages the last `openpi_window` episodes (the last 20 too).
    last = service.episodes[-args.openpi_window :]
    final = sum(e.ret for e in last) / max(1, len(last))
    last20 = service.episodes[-args.window :]
    final20 = sum(e.ret for e in last20) / max(1, len(last20))
    first = service.first_version_return
    with ReplayReader(str(workdir / "service" / "replay")) as reader:
        rows = list(reader.transitions())
        prompted = sum(reader.stored_observation(r).prompt == PROMPT for r in rows)
    ratio = final / first if first else math.nan
    print(
        f"service: {service.env_steps:,} env steps, {len(service.episodes):,} episodes, "
        f"{service.max_version} versions in {service_s:.0f} s; mean return of version 0's "
        f"episodes {first:.1f} -> last {args.openpi_window}: {final:.1f} (x{ratio:.2f}; last "
        f"{args.window}: {final20:.1f}); "
        f"{prompted:,} of {len(rows):,} stored rows carry the prompt",
        flush=True,
    )
    return {
        "model": "pi0_fast_openpi dummy_lora (pretrained, LoRA PPO)",
        "pretrained_env_steps": pre.env_steps,
        "pretrained_train_return": round(pre.mean_return(args.window), 2),
        "version0_return": round(first, 2),
        "final_return": round(final, 2),
        "final_over_version0": round(ratio, 3),
        "final_window": args.openpi_window,
        "final_return_last20": round(final20, 2),
        "rows": len(rows),
        "rows_with_prompt": prompted,
        "service_env_steps": service.env_steps,
        "service_versions": service.max_version,
        "service_p99_ms": round(service.p99_ms, 2),
        "service_wall_s": round(service_s, 1),
        "budget": budget,
        "robots": args.robots,
        "seed": args.seed,
        "workdir": str(workdir),
    }


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
