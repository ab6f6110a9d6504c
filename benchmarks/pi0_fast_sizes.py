"""Pi0FAST variants: parameter count of each (from `nnx.eval_shape`, nothing allocated), and on
this machine the time of `sample_actions` (batch 1, one chunk, KV-cache decoding) and of one PPO
minibatch update for the variants that fit (`dummy` and `small` on a CPU).

    python benchmarks/pi0_fast_sizes.py                 # dummy and small
    python benchmarks/pi0_fast_sizes.py --timed dummy small gemma_300m   # on an accelerator
    python benchmarks/pi0_fast_sizes.py --quick         # dummy only, fewer repeats
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import tyro
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.models.pi0_fast import VARIANTS, Pi0FASTConfig, param_count
from openpi_rl.rl import ActorCritic, PPOBatch, PPOConfig, PPOTrainer


@dataclasses.dataclass
class Args:
    timed: tuple[str, ...] = ("dummy", "small")
    repeats: int = 5
    minibatch: int = 8
    quick: bool = False


def median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def time_variant(variant: str, args: Args) -> tuple[float, float, int]:
    config = Pi0FASTConfig(variant=variant)
    model = config.create(jax.random.key(0))
    ac = ActorCritic(model, value_in_dim=config.value_in_dim)
    graphdef, state = nnx.split(ac)

    @jax.jit
    def sample(state, key, obs):
        return nnx.merge(graphdef, state).act(key, obs)

    obs1 = config.fake_obs(1)
    keys = iter(jax.random.split(jax.random.key(1), 10_000))
    sample_ms = median_ms(lambda: sample(state, next(keys), obs1), args.repeats)
    steps = int(model._decode(jax.random.key(2), obs1)["i"])

    obs = config.fake_obs(args.minibatch)
    _, logp, value, tokens = sample(state, jax.random.key(3), obs)
    adv = jnp.linspace(-1.0, 1.0, args.minibatch)
    batch = PPOBatch(obs, tokens, logp, value, adv, value + adv)
    trainer = PPOTrainer(ac, PPOConfig(lr=1e-4, train_iters=1, minibatch_size=args.minibatch))
    update_ms = median_ms(lambda: trainer.update(jax.random.key(4), batch), args.repeats)
    return sample_ms, update_ms, steps


def main(args: Args) -> dict:
    timed = ("dummy",) if args.quick else args.timed
    repeats = 2 if args.quick else args.repeats
    args = dataclasses.replace(args, repeats=repeats)
    params = {v: param_count(Pi0FASTConfig(variant=v)) for v in VARIANTS}
    sample_ms, update_ms = {}, {}
    for v in timed:
        sample_ms[v], update_ms[v], steps = time_variant(v, args)
        print(
            f"{v:>10}: {params[v] / 1e6:8.1f} M params  sample {sample_ms[v]:8.1f} ms "
            f"({steps} decode steps)  update (minibatch {args.minibatch}) {update_ms[v]:8.1f} ms",
            file=sys.stderr,
            flush=True,
        )
    return {
        "params": params,
        "sample_ms": {k: round(v, 2) for k, v in sample_ms.items()},
        "update_ms": {k: round(v, 2) for k, v in update_ms.items()},
        "device": jax.devices()[0].device_kind,
    }


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
