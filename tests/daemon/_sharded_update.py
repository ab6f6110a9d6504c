"""Run one learn step on 1 and on 4 forced CPU devices (weights replicated, and sharded
FSDP-style); print the differences as one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python _sharded_update.py
(the flag must be set before jax is imported, hence a subprocess of the test).
"""

import json

import jax
import numpy as np
from flax import nnx

from openpi_rl.daemon import ChunkBatch, DataParallel
from openpi_rl.models import GaussianMLPConfig
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.rl import PPOConfig
from openpi_rl.rl.ppo import make_optimizer

MODEL = GaussianMLPConfig(obs_dim=3, action_dim=2, action_horizon=2, hidden=(16, 16))
T, S = 8, 8
CONFIG = PPOConfig(lr=1e-3, train_iters=3, minibatch_size=16, bc_coef=1.0)


def batch(ac) -> ChunkBatch:
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    valid = np.arange(T)[:, None] < rng.integers(1, T + 1, S)[None]
    obs, actions = {"state": f(T, S, 3)}, f(T, S, 2, 2)
    flat = {"state": obs["state"].reshape(T * S, 3)}
    logp = np.asarray(ac.model.policy_logprobs(jax.random.key(0), flat, actions.reshape(-1, 2, 2)))
    intervened = (rng.random((T, S)) < 0.2) & valid
    return ChunkBatch(
        obs=obs, boot_obs={"state": f(S, 3)}, policy_actions=actions,
        logp=logp.reshape(T, S) + 0.05 * f(T, S), rewards=f(T, S),
        dones=(rng.random((T, S)) < 0.1) & valid, ends=(rng.random((T, S)) < 0.1) & valid,
        valid=valid, intervened=intervened, bc_actions=f(T, S, 2, 2), bc_mask=intervened,
        versions=np.zeros((T, S), np.int32),
    )  # fmt: skip


def main() -> None:
    config = CONFIG
    out, info = {}, {}
    for name, n, fsdp in (("1", 1, None), ("4", 4, None), ("4fsdp", 4, 0)):
        ac = build_actor_critic(MODEL, (16, 16), 0)
        graphdef, params, rest = nnx.split(ac, nnx.Param, ...)
        dp = DataParallel(config, jax.devices()[:n], fsdp_min_size=fsdp)
        opt = dp.put_state(make_optimizer(config).init(params))
        params, rest = dp.put_state(params), dp.put_replicated(rest)
        b = batch(ac)
        new, new_opt, metrics = dp(graphdef, params, rest, opt, jax.random.key(1), b)
        leaves = jax.tree.leaves(new)
        info[name] = {
            "batch_devices": len(dp.put_batch(b).obs["state"].sharding.device_set),
            "params_replicated": all(x.sharding.is_fully_replicated for x in leaves),
            "sharded_leaves": sum(not x.sharding.is_fully_replicated for x in leaves),
            "sharded_opt_leaves": sum(
                not x.sharding.is_fully_replicated for x in jax.tree.leaves(new_opt)
            ),
        }
        out[name] = ([np.asarray(x) for x in leaves], {k: float(v) for k, v in metrics.items()})
    diff = max(
        float(np.abs(a - b).max())
        for other in ("4", "4fsdp")
        for a, b in zip(out["1"][0], out[other][0], strict=True)
    )
    moved = max(
        float(np.abs(a - np.asarray(b)).max())
        for a, b in zip(out["1"][0], jax.tree.leaves(nnx.split(ac, nnx.Param, ...)[1]), strict=True)
    )
    mdiff = {
        f"{k}@{other}": abs(out["1"][1][k] - out[other][1][k])
        for other in ("4", "4fsdp")
        for k in out["1"][1]
    }
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "info": info,
                "param_max_abs_diff": diff,
                "param_max_update": moved,
                "metric_abs_diff": mdiff,
                "metrics": out["4fsdp"][1],
            }
        )
    )


if __name__ == "__main__":
    main()
