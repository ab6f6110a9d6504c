"""Env steps and wall time until the mean return of the last 20 episodes reaches 950 on
MuJoCo InvertedPendulum-v5: `openpi-rl train` (gaussian_mlp, the trainer's defaults) against
Stable-Baselines3 PPO with its defaults, same seeds, same criterion, one invocation.

Each run is its own process, so every JAX run pays its full compilation (nothing is cached
between seeds), and both sides start the clock after their imports, at model construction.
Ours and SB3 alternate per seed so machine noise hits both alike.

    python benchmarks/learn_inverted_pendulum.py            # seeds 0 1 2, both sides
    python benchmarks/learn_inverted_pendulum.py --quick    # seed 0, ours only

With `--model pi0_fast` (the embedded look-alike, dummy variant) or `--model pi0_fast_openpi`
(openpi's Pi0-FAST: tiny PaliGemma, the tokenizer fixtures of tests/fixtures/tokenizers, the
state written into the prompt as openpi's pipeline does, decoding constrained to well-formed
chunks), the token policy (one action per chunk) trains for `--max-steps` env steps per seed;
the figure is its mean return over the last 20 episodes against the first 20 (the random-init
policy), with the sampling and update rates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import tyro

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _common import print_json, steps_to_threshold  # noqa: E402


@dataclasses.dataclass
class Args:
    model: str = "gaussian_mlp"  # or "pi0_fast", "pi0_fast_openpi"
    seeds: tuple[int, ...] = (0, 1, 2)
    env: str = "InvertedPendulum-v5"
    threshold: float = 950.0
    window: int = 20
    max_steps: int = 100_000  # hard ceiling
    quick: bool = False  # seed 0, ours only
    sb3: bool = True
    worker: str | None = None  # internal: "ours" or "sb3" runs one seed in this process
    seed: int = 0


TOKENIZERS = HERE.parent / "tests" / "fixtures" / "tokenizers"


def token_model(name: str):
    if name == "pi0_fast":
        from openpi_rl.models.pi0_fast import Pi0FASTConfig

        return Pi0FASTConfig(variant="dummy", action_horizon=1)
    from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig

    return Pi0FASTOpenPIConfig(
        gemma_variant="dummy",  # width 64, depth 2; the vocabulary is the tokenizer's (980)
        scan=False,
        paligemma_tokenizer=str(TOKENIZERS / "paligemma_tiny.model"),
        fast_tokenizer=str(TOKENIZERS / "fast_tiny"),
        action_horizon=1,
        max_token_len=32,
        max_decoding_steps=6,  # "Action: " (3 ids), one FAST id, "|", EOS
        prompt="balance the pole",
    )


def run_pi0_fast(args: Args) -> dict:
    import dataclasses as dc

    from openpi_rl.train.train_ppo import TRAIN_PPO_DEFAULTS, PPOTrainConfig, train

    config = PPOTrainConfig(
        model=token_model(args.model),
        ppo=dc.replace(TRAIN_PPO_DEFAULTS, lr=3e-4),  # a transformer wants a smaller step
        env=args.env,
        seed=args.seed,
        num_train_steps=10**9,
        max_env_steps=args.max_steps,
    )
    result = train(config, display=False)
    returns = [e[1] for e in result.episodes]
    first, last = sum(returns[:20]) / 20, sum(returns[-20:]) / 20
    return {
        "init_return": first,
        "final_return": last,
        "env_steps": result.env_steps,
        **result.rates(),
    }


def run_ours(args: Args) -> dict:
    from openpi_rl.train.train_ppo import PPOTrainConfig, train

    config = PPOTrainConfig(
        env=args.env,
        seed=args.seed,
        num_train_steps=10**9,
        max_env_steps=args.max_steps,
        target_return=args.threshold,
        target_window=args.window,
    )
    result = train(config, display=False)
    ends, returns = [e[0] for e in result.episodes], [e[1] for e in result.episodes]
    steps = steps_to_threshold(ends, returns, args.threshold, args.window)
    assert steps == result.steps_to_target, (steps, result.steps_to_target)
    return {"steps": steps, "wall_s": result.wall_s}


def run_sb3(args: Args) -> dict:
    from _sb3 import sb3_steps_to_threshold

    steps, wall = sb3_steps_to_threshold(
        args.seed, args.env, args.threshold, args.window, args.max_steps
    )
    return {"steps": steps, "wall_s": wall}


def main_pi0_fast(args: Args) -> dict:
    runs = []
    for seed in (0,) if args.quick else args.seeds:
        runs.append(spawn(args.model, seed, args))
        r = runs[-1]
        print(
            f"seed {seed}: return {r['init_return']:.1f} -> {r['final_return']:.1f} in "
            f"{r['env_steps']} env steps; sampling {r['sample_steps_per_s']:.0f} env steps/s, "
            f"updates {r['update_samples_per_s']:.0f} samples/s",
            file=sys.stderr,
            flush=True,
        )
    return {
        f"{args.model}_return_ratio": [
            round(r["final_return"] / r["init_return"], 2) for r in runs
        ],
        "init_return": [round(r["init_return"], 2) for r in runs],
        "final_return": [round(r["final_return"], 2) for r in runs],
        "sample_steps_per_s": [round(r["sample_steps_per_s"]) for r in runs],
        "update_samples_per_s": [
            None if math.isnan(r["update_samples_per_s"]) else round(r["update_samples_per_s"])
            for r in runs
        ],
    }


def spawn(worker: str, seed: int, args: Args) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", worker, "--model", args.model, "--seed", str(seed), "--env", args.env,
        "--threshold", str(args.threshold), "--window", str(args.window),
        "--max-steps", str(args.max_steps),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{worker} seed {seed} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args: Args) -> dict:
    seeds = (0,) if args.quick else args.seeds
    with_sb3 = args.sb3 and not args.quick
    ours, sb3 = [], []
    for seed in seeds:
        ours.append(spawn("ours", seed, args))
        line = f"seed {seed}: ours {ours[-1]['steps']} steps {ours[-1]['wall_s']:.1f} s"
        if with_sb3:
            sb3.append(spawn("sb3", seed, args))
            line += f" | SB3 {sb3[-1]['steps']} steps {sb3[-1]['wall_s']:.1f} s"
        print(line, file=sys.stderr, flush=True)
    out = {
        "steps_to_950": [r["steps"] for r in ours],
        "wall_s": [round(r["wall_s"], 2) for r in ours],
    }
    if with_sb3:
        out["sb3_steps_to_950"] = [r["steps"] for r in sb3]
        out["sb3_wall_s"] = [round(r["wall_s"], 2) for r in sb3]
        out["steps_ratio"] = [
            round(a["steps"] / b["steps"], 3) if a["steps"] and b["steps"] else None
            for a, b in zip(ours, sb3, strict=True)
        ]
        out["wall_ratio"] = [
            round(a["wall_s"] / b["wall_s"], 3) if a["steps"] and b["steps"] else None
            for a, b in zip(ours, sb3, strict=True)
        ]
    return out


if __name__ == "__main__":
    a = tyro.cli(Args)
    if a.worker is not None:
        workers = {"ours": run_ours, "sb3": run_sb3, "pi0_fast": run_pi0_fast}
        workers["pi0_fast_openpi"] = run_pi0_fast
        print(json.dumps(workers[a.worker](a)))
    elif a.model in ("pi0_fast", "pi0_fast_openpi"):
        if a.quick:
            a = dataclasses.replace(a, max_steps=10_000)
        print_json(main_pi0_fast(a))
    else:
        print_json(main(a))
