"""Pi0FAST KV-cache decoding on this machine: the cost of one decode step at batch 1, 2, 4, 8,
of the prefix pass, and of serving 4 robots in one batch against one at a time.

    python benchmarks/pi0_fast_decode.py            # batches 1 2 4 8
    python benchmarks/pi0_fast_decode.py --quick    # batches 1 4, fewer repeats

Model: variant "dummy" (width 64, depth 2), two 224x224 images + 32-d state: a 409-token
prefix and up to N + 1 = 71 decode steps. A step's cost is measured with the number of steps
fixed by the EOA logit: +100 ends every row at step 1 (the prefix pass and one step), -100
never ends (71 steps), so per step = (t_71 - t_1) / 70. The reference ("before") is the
decoding loop this replaced, run on the same weights in the same process: a cache of
[B, S, K, hd] per layer, written then read through a bitcast (which made XLA copy the caches
each step), and the sampling noise drawn inside the loop. Both draw the same tokens.
The machine is shared, so runs are interleaved and medians taken, of wall time and of this
process's CPU time (`*_cpu_*`); `load` is the 1-minute load average at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.models.pi0_fast import Pi0FAST, Pi0FASTConfig

CONFIG = Pi0FASTConfig(variant="dummy", image_keys=("image_0", "image_1"), state_dim=32)


@dataclasses.dataclass
class Args:
    batches: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 9
    robots: int = 4  # served in one batch, or one at a time
    quick: bool = False


def _attention_before(q, k, v, mask):
    b, t, h, hd = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, h // kh, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * hd)


def decode_before(model: Pi0FAST, rng, obs) -> jax.Array:
    """The replaced `Pi0FAST._decode` (tokens only)."""
    x, m_pre = model._prefix(obs)
    b, p = m_pre.shape
    n1 = model.num_tokens + 1
    cache_k, cache_v = [], []
    mask = jnp.broadcast_to(m_pre[:, None], (b, p, p))
    for blk in model.blocks:
        q, k, v = blk.qkv(x)
        x = blk.mix(x, _attention_before(q, k, v, mask))
        pad = ((0, 0), (0, n1), (0, 0), (0, 0))
        cache_k.append(jnp.pad(k, pad))
        cache_v.append(jnp.pad(v, pad))
    valid = jnp.concatenate([m_pre, jnp.zeros((b, n1), bool)], 1)

    def step(carry):
        i = carry["i"]
        h = model._embed_actions(carry["last"][:, None], p + i)
        valid = jax.lax.dynamic_update_slice_in_dim(
            carry["valid"], jnp.ones((b, 1), bool), p + i, 1
        )
        ks, vs = [], []
        for blk, ck, cv in zip(model.blocks, carry["k"], carry["v"], strict=True):
            q, k, v = blk.qkv(h)
            ck = jax.lax.dynamic_update_slice_in_dim(ck, k, p + i, 1)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, v, p + i, 1)
            h = blk.mix(h, _attention_before(q, ck, cv, valid[:, None]))
            ks.append(ck)
            vs.append(cv)
        logits = model._logits(h, i[None])[:, 0]
        logp_all = jax.nn.log_softmax(logits)
        tok = jax.random.categorical(jax.random.fold_in(rng, i), logits)
        done = carry["done"]
        tok = jnp.where(done, model.eoa, tok).astype(jnp.int32)
        tok_logp = jnp.take_along_axis(logp_all, tok[:, None], 1)[:, 0]
        return {
            "i": i + 1, "last": tok, "done": done | (tok == model.eoa),
            "ids": carry["ids"].at[:, i].set(tok),
            "logp": carry["logp"] + jnp.where(done, 0.0, tok_logp),
            "k": ks, "v": vs, "valid": valid,
        }  # fmt: skip

    init = {
        "i": jnp.int32(0), "last": jnp.full((b,), model.boa, jnp.int32),
        "done": jnp.zeros((b,), bool), "ids": jnp.full((b, n1), model.eoa, jnp.int32),
        "logp": jnp.zeros((b,)), "k": cache_k, "v": cache_v, "valid": valid,
    }  # fmt: skip
    return jax.lax.while_loop(lambda c: (c["i"] < n1) & ~jnp.all(c["done"]), step, init)["ids"]


def observations(batch: int, seed: int = 0) -> dict[str, jax.Array]:
    r = np.random.default_rng(seed)
    obs = {
        key: r.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8) for key in CONFIG.image_keys
    }
    obs["state"] = r.normal(size=(batch, CONFIG.state_dim)).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in obs.items()}


def timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def timed_cpu(fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds: this process's CPU time is less inflated than wall time when other
    processes share the cores."""
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t, time.process_time() - c


def main(args: Args) -> dict:
    batches = (1, 4) if args.quick else args.batches
    repeats = 3 if args.quick else args.repeats
    model = CONFIG.create(jax.random.key(0))
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0)
    impls = {
        "before": jax.jit(lambda st, obs: decode_before(nnx.merge(graphdef, st), rng, obs)),
        "after": jax.jit(lambda st, obs: nnx.merge(graphdef, st)._decode(rng, obs)["ids"]),
    }

    def eoa_bias(value: float):
        m = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
        m.head.bias[...] = m.head.bias[...].at[m.eoa].set(value)
        return nnx.split(m)[1]

    ends_at_once, never_ends = eoa_bias(100.0), eoa_bias(-100.0)
    steps = model.num_tokens + 1
    obs = observations(2)
    same = bool(jnp.all(impls["before"](state, obs) == impls["after"](state, obs)))

    per_step, per_step_cpu, prefix = ({k: {} for k in impls} for _ in range(3))
    for b in batches:
        obs = observations(b)
        times = {(k, s): [] for k in impls for s in ("short", "long")}
        for fn in impls.values():  # compile
            timed(fn, ends_at_once, obs)
        for _ in range(repeats):
            for k, fn in impls.items():
                times[k, "short"].append(timed_cpu(fn, ends_at_once, obs))
                times[k, "long"].append(timed_cpu(fn, never_ends, obs))
        for k in impls:
            short, long = (statistics.median(t for t, _ in times[k, s]) for s in ("short", "long"))
            per_step[k][b] = round(1000 * (long - short) / (steps - 1), 4)
            short_cpu, long_cpu = (
                statistics.median(c for _, c in times[k, s]) for s in ("short", "long")
            )
            per_step_cpu[k][b] = round(1000 * (long_cpu - short_cpu) / (steps - 1), 4)
            prefix[k][b] = round(1000 * short, 3)
        print(
            f"B={b}: per step "
            + "  ".join(
                f"{k} {per_step[k][b]:.3f} ms (CPU {per_step_cpu[k][b]:.3f})" for k in impls
            )
            + "   prefix + 1 step "
            + "  ".join(f"{k} {prefix[k][b]:.2f} ms" for k in impls),
            file=sys.stderr,
            flush=True,
        )

    # Serving `robots` robots with the untrained weights: rows end at different steps.
    batch_obs = observations(args.robots, seed=1)
    rows = [{k: v[r : r + 1] for k, v in batch_obs.items()} for r in range(args.robots)]
    serve = {"one_at_a_time": {}, "batched": {}}
    for k, fn in impls.items():
        timed(fn, state, batch_obs), timed(fn, state, rows[0])
        one, batched = [], []
        for _ in range(repeats):
            one.append(sum(timed(fn, state, row) for row in rows))
            batched.append(timed(fn, state, batch_obs))
        serve["one_at_a_time"][k] = round(1000 * statistics.median(one), 3)
        serve["batched"][k] = round(1000 * statistics.median(batched), 3)
    ids = np.asarray(impls["after"](state, batch_obs))
    tokens_per_row = [int(np.argmax(np.append(r == model.eoa, True))) for r in ids]
    print(
        f"serving {args.robots} robots (tokens per row {tokens_per_row}): {serve}", file=sys.stderr
    )

    ratio = {k: {b: round(per_step[k][b] / per_step[k][1], 2) for b in batches} for k in impls}
    ratio_cpu = {
        k: {b: round(per_step_cpu[k][b] / per_step_cpu[k][1], 2) for b in batches} for k in impls
    }
    return {
        "per_step_ms": per_step,
        "per_step_cpu_ms": per_step_cpu,
        "prefix_plus_one_step_ms": prefix,
        "per_step_over_b1": ratio,
        "per_step_cpu_over_b1": ratio_cpu,
        "serve_ms": serve,
        "batched_over_one_at_a_time": {
            k: round(serve["batched"][k] / serve["one_at_a_time"][k], 2) for k in impls
        },
        "tokens_per_row": tokens_per_row,
        "same_tokens": same,
        "load": round(os.getloadavg()[0], 1),
    }


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
