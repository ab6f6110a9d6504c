"""One process of a 2-process learner: one sharded learn step, then an orbax round trip.

    python _distributed_update.py PROCESS_ID PORT OUT_DIR

Both processes (2 CPU devices each) join on 127.0.0.1:PORT into one 4-device mesh; weights and
optimizer state are sharded FSDP-style over it, each process feeds its half of the batch's
columns. Each writes OUT_DIR/<id>.npz: the new weights gathered whole, its metrics, what it
found after saving (params, opt_state) with orbax into OUT_DIR/ckpt and restoring them; process
0 also the same step on its own 2 devices (the single-process data-parallel path).
"""

import json
import sys
from pathlib import Path

from openpi_rl.daemon.distributed import DistributedConfig, initialize

pid, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
cluster = initialize(
    DistributedConfig(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
        local_device_count=2, initialization_timeout_s=60, heartbeat_timeout_s=30,
        fsdp_min_size=0,
    )
)  # fmt: skip

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from _sharded_update import CONFIG, MODEL, batch  # noqa: E402
from flax import nnx  # noqa: E402

from openpi_rl.daemon import DataParallel  # noqa: E402
from openpi_rl.daemon.sharding import gather  # noqa: E402
from openpi_rl.models.choice import build_actor_critic  # noqa: E402
from openpi_rl.rl.ppo import make_optimizer  # noqa: E402


def step(dp: DataParallel, whole: bool) -> tuple:
    ac = build_actor_critic(MODEL, (16, 16), 0)
    graphdef, params, rest = nnx.split(ac, nnx.Param, ...)
    opt = dp.put_state(make_optimizer(CONFIG).init(params))
    params, rest = dp.put_state(params), dp.put_replicated(rest)
    b = batch(ac)
    mine = b if whole else dp.share(b)
    new, new_opt, metrics = dp(graphdef, params, rest, opt, jax.random.key(1), mine)
    return new, new_opt, {k: float(v) for k, v in metrics.items()}, dp.columns(8)


def main() -> None:
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    dp = DataParallel(CONFIG, fsdp_min_size=0)  # every global device
    new, new_opt, metrics, columns = step(dp, whole=False)
    result: dict = {
        "process": jax.process_index(),
        "columns": [columns.start, columns.stop],
        "metrics": metrics,
        "sharded_leaves": sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(new)),
        "local_shard_shapes": [
            [list(s.data.shape) for s in x.addressable_shards] for x in jax.tree.leaves(new)
        ],
    }
    arrays = {f"p{i}": x for i, x in enumerate(jax.tree.leaves(gather(new)))}

    # Every process saves its shards into one directory; restoring gives the same layout.
    state = {"params": new, "opt_state": new_opt}
    path = out / "ckpt" / "1"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, state)
        ckptr.wait_until_finished()
        back = ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    result["restored_same_sharding"] = all(
        a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True)
    )
    result["restored_equal"] = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(gather(state)), jax.tree.leaves(gather(back)), strict=True)
    )

    if pid == 0:  # the single-process path: a mesh of this process's devices, weights whole
        local = DataParallel(CONFIG, jax.local_devices())
        new_local, _, local_metrics, _ = step(local, whole=True)
        arrays |= {f"local{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(new_local))}
        result["local_metrics"] = local_metrics
    np.savez(out / f"{pid}.npz", result=json.dumps(result), **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
