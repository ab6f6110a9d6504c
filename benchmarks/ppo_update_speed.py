"""Samples/s of one PPO update: our fused `ppo_update` vs a per-minibatch `nnx.jit` loop, a plain
jax+optax update fused by hand (what the library's abstractions must not cost more than), and
Stable-Baselines3's `PPO.train()`, all on the same sizes in one run.

gaussian_mlp 64x64 actor and critic, 2048 samples x 10 epochs, minibatch 64.

    python benchmarks/ppo_update_speed.py            # full
    python benchmarks/ppo_update_speed.py --quick    # smoke run, no SB3
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.rl import ActorCritic, PPOBatch, PPOConfig, PPOTrainer, ppo_loss
from openpi_rl.rl.ppo import make_optimizer


@dataclasses.dataclass
class Args:
    samples: int = 2048
    epochs: int = 10
    minibatch: int = 64
    repeats: int = 21  # timed updates per contender, interleaved (median taken)
    quick: bool = False  # fewer repeats, skip SB3
    sb3: bool = True


def make_batch(n: int, obs_dim: int = 4, act_dim: int = 1, seed: int = 0) -> PPOBatch:
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return PPOBatch({"state": f(n, obs_dim)}, f(n, 1, act_dim), f(n) - 1.0, f(n), f(n), f(n))


def timed_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls alternating between them so that the
    shared machine's noise falls on all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build(config: PPOConfig) -> ActorCritic:
    model = GaussianMLPConfig().create(jax.random.key(0))
    return ActorCritic(model, value_in_dim=4, value_hidden=(64, 64), rngs=nnx.Rngs(1))


# ----------------------------------------------------------------- plain reference (no library)


def plain_init(key: jax.Array) -> dict:
    ks = jax.random.split(key, 6)
    orth = lambda k, i, o, s: jax.nn.initializers.orthogonal(s)(k, (i, o))  # noqa: E731
    layer = lambda k, i, o, s: {"w": orth(k, i, o, s), "b": jnp.zeros(o)}  # noqa: E731
    r2 = math.sqrt(2)
    return {
        "pi": [layer(ks[0], 4, 64, r2), layer(ks[1], 64, 64, r2), layer(ks[2], 64, 1, 0.01)],
        "vf": [layer(ks[3], 4, 64, r2), layer(ks[4], 64, 64, r2), layer(ks[5], 64, 1, 1.0)],
        "log_std": jnp.zeros((1, 1)),
    }


def plain_mlp(layers: list, x: jax.Array) -> jax.Array:
    for lyr in layers[:-1]:
        x = jnp.tanh(x @ lyr["w"] + lyr["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def plain_update_fn(config: PPOConfig, n: int):
    tx = make_optimizer(config)
    mb = config.minibatch_size
    n_mb = n // mb

    def loss_fn(p, b: PPOBatch):
        x = b.obs["state"]
        mean = plain_mlp(p["pi"], x)[:, None, :]
        z = (b.actions - mean) * jnp.exp(-p["log_std"])
        logp = (
            (-0.5 * (z * z + math.log(2 * math.pi)) - p["log_std"]).reshape(x.shape[0], -1).sum(-1)
        )
        ent = jnp.sum(p["log_std"] + 0.5 * (math.log(2 * math.pi) + 1))
        v = plain_mlp(p["vf"], x)[:, 0]
        ratio = jnp.exp(logp - b.old_logp)
        adv = (b.advantages - b.advantages.mean()) / (b.advantages.std() + 1e-8)
        eps = config.clip_ratio
        pl = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - eps, 1 + eps)).mean()
        vl = jnp.square(v - b.returns).mean()
        return pl + config.value_coef * vl - config.entropy_coef * ent

    @jax.jit
    def update(p, opt_state, key, batch):
        def mb_step(carry, idx):
            p, s = carry
            g = jax.grad(loss_fn)(p, jax.tree.map(lambda a: a[idx], batch))
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        def epoch(carry, k):
            idx = jax.random.permutation(k, n)[: n_mb * mb].reshape(n_mb, mb)
            return jax.lax.scan(mb_step, carry, idx)[0], None

        return jax.lax.scan(epoch, (p, opt_state), jax.random.split(key, config.train_iters))[0]

    return update


# ----------------------------------------------------------------- unfused (nnx.jit per minibatch)


def unfused_update_fn(ac: ActorCritic, config: PPOConfig, n: int):
    optimizer = nnx.Optimizer(ac, make_optimizer(config), wrt=nnx.Param)

    @nnx.jit
    def step(ac, optimizer, mb):
        grads = nnx.grad(lambda m: ppo_loss(m, jax.random.key(0), mb, config)[0])(ac)
        optimizer.update(ac, grads)

    def update(batch: PPOBatch, rng: np.random.Generator):
        host = jax.device_get(batch)  # minibatches sliced in NumPy, as a CleanRL-style loop does
        mb = config.minibatch_size
        for _ in range(config.train_iters):
            perm = rng.permutation(n)
            for i in range(n // mb):
                idx = perm[i * mb : (i + 1) * mb]
                step(ac, optimizer, jax.tree.map(lambda a, idx=idx: a[idx], host))
        return nnx.state(ac, nnx.Param)

    return update


def main(args: Args) -> dict:
    repeats = 5 if args.quick else args.repeats
    config = PPOConfig(
        lr=3e-4, train_iters=args.epochs, minibatch_size=args.minibatch, entropy_coef=0.0
    )
    n = args.samples
    batch = make_batch(n)
    samples = n * args.epochs

    trainer = PPOTrainer(build(config), config)
    key = jax.random.key(0)
    p = plain_init(jax.random.key(0))
    plain_state = [p, make_optimizer(config).init(p)]
    plain = plain_update_fn(config, n)
    t = timed_interleaved(
        {
            "fused": lambda: trainer.update(key, batch),
            "plain": lambda: plain(plain_state[0], plain_state[1], key, batch),
        },
        repeats,
    )
    t_fused, t_plain = t["fused"], t["plain"]

    unfused = unfused_update_fn(build(config), config, n)
    np_rng = np.random.default_rng(0)
    t_unfused = timed_interleaved({"unfused": lambda: unfused(batch, np_rng)}, 2)["unfused"]

    out = {
        "fused_samples_per_s": round(samples / t_fused),
        "plain_fused_samples_per_s": round(samples / t_plain),
        "unfused_samples_per_s": round(samples / t_unfused),
        "fused_over_plain": round(t_plain / t_fused, 3),
        "fused_over_unfused": round(t_unfused / t_fused, 2),
    }
    if args.sb3 and not args.quick:
        from _sb3 import sb3_update_samples_per_s

        sb3 = sb3_update_samples_per_s(n_samples=n, n_epochs=args.epochs, batch_size=args.minibatch)
        out["sb3_samples_per_s"] = round(sb3)
        out["fused_over_sb3"] = round(samples / t_fused / sb3, 2)
    for k, v in out.items():
        print(f"{k:>28}: {v}", file=sys.stderr)
    return out


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
