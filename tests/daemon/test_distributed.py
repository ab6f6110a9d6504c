"""The learner across processes: 2 processes x 2 CPU devices joined by `jax.distributed` make the
same update as one device, save / restore their sharded state with orbax together, and run
`openpi-rl learn` as one learner (process 0 reading the replay and publishing)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _sharded_update import CONFIG, MODEL, batch
from flax import nnx
from learner_helpers import Recorder, learner_config, versions_diff

from openpi_rl.daemon import DataParallel, Learner
from openpi_rl.daemon.distributed import (
    DistributedConfig,
    DistributedConfigError,
    problems_of,
    resolve,
)
from openpi_rl.daemon.lockstep import pack, unpack
from openpi_rl.daemon.sharding import leaf_spec
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.rl.ppo import make_optimizer
from openpi_rl.weights.operator_state import OperatorState, save_state
from openpi_rl.weights.versions import verify_version

SCRIPT = Path(__file__).parent / "_distributed_update.py"
LEARNER = Path(__file__).parent / "_distributed_learner.py"
TIMEOUT_S = 150  # a crashed peer leaves the other waiting in a collective: kill both by then


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(out: Path, script: Path = SCRIPT, *args: str) -> list[str]:
    """Both processes (`script ID PORT OUT ARGS`); both killed if either fails or overstays.
    Returns their logs."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(out), *args],
            cwd=SCRIPT.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [p.communicate()[0] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{logs[i][-3000:]}"
    return logs


def _one_device_update() -> tuple[list[np.ndarray], dict[str, float]]:
    ac = build_actor_critic(MODEL, (16, 16), 0)
    graphdef, params, rest = nnx.split(ac, nnx.Param, ...)
    dp = DataParallel(CONFIG, jax.devices()[:1])
    opt = dp.put_state(make_optimizer(CONFIG).init(params))
    new, _, metrics = dp(
        graphdef, dp.put_state(params), dp.put_replicated(rest), opt, jax.random.key(1), batch(ac)
    )
    return [np.asarray(x) for x in jax.tree.leaves(new)], {k: float(v) for k, v in metrics.items()}


def test_two_process_sharded_update_equals_single_process(tmp_path):
    _run_two(tmp_path)
    results = [json.loads(str(np.load(tmp_path / f"{i}.npz")["result"])) for i in (0, 1)]
    want, want_metrics = _one_device_update()
    arrays = [np.load(tmp_path / f"{i}.npz") for i in (0, 1)]

    # Each process fed its half of the 8 columns; weights were split across all 4 devices.
    assert [r["columns"] for r in results] == [[0, 4], [4, 8]]
    assert all(r["sharded_leaves"] >= 4 for r in results), results
    # Gathered, the new weights are the 1-device update's, on both processes, and the
    # single-process 2-device path (process 0's own devices, weights whole) agrees too.
    for i in (0, 1):
        got = [arrays[i][f"p{j}"] for j in range(len(want))]
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True)) <= 1e-5
    local = [arrays[0][f"local{j}"] for j in range(len(want))]
    assert max(float(np.abs(a - b).max()) for a, b in zip(local, want, strict=True)) <= 1e-5
    before = jax.tree.leaves(nnx.state(build_actor_critic(MODEL, (16, 16), 0), nnx.Param))
    moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(want, before, strict=True))
    assert moved > 1e-3  # the update did move the weights
    for i in (0, 1):
        for k, v in want_metrics.items():
            assert abs(results[i]["metrics"][k] - v) <= 1e-4, (k, results[i]["metrics"][k], v)
    # orbax: both processes saved their shards into one directory and restored them as sharded.
    assert all(r["restored_same_sharding"] and r["restored_equal"] for r in results), results
    assert sorted(p.name for p in (tmp_path / "ckpt" / "1").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]


@pytest.mark.parametrize(
    ("shape", "devices", "min_size", "spec"),
    [
        ((64, 16), 4, 0, ("data", None)),  # the largest dimension divisible by the devices
        ((3, 16), 4, 0, (None, "data")),  # 3 is not: the next one
        ((16, 16), 4, 0, ("data", None)),  # equal ones: the first
        ((3, 5), 4, 0, ()),  # none divisible: replicated
        ((), 4, 0, ()),  # a scalar (Adam's count): replicated
        ((64, 64), 4, 4097, ()),  # below the size threshold: replicated
        ((64, 64), 4, None, ()),  # FSDP off
        ((64, 64), 1, 0, ()),  # one device
    ],
)
def test_leaf_spec(shape, devices, min_size, spec):
    assert tuple(leaf_spec(shape, devices, min_size)) == spec


def test_config_comes_from_the_table_then_the_environment():
    table = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert resolve(table, env) == type(resolve(table, env))("10.0.0.1:1234", 4, 3)
    got = resolve(DistributedConfig(), env)
    assert (got.coordinator_address, got.num_processes, got.process_id) == ("h:1", 2, 1)
    alone = resolve(DistributedConfig(), {})
    assert (alone.joined, alone.num_processes, alone.process_id) == (False, 1, 0)


@pytest.mark.parametrize(
    ("config", "env", "key", "words"),
    [
        (DistributedConfig(num_processes=2, process_id=2, coordinator_address="h:1"), {},
         "learn.distributed.process_id", "[0, 2)"),
        (DistributedConfig(num_processes=2, coordinator_address="h"), {},
         "learn.distributed.coordinator_address", "host:port"),
        (DistributedConfig(num_processes=2), {}, "learn.distributed.coordinator_address",
         "needs a coordinator"),
        (DistributedConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES", "unset"),
        (DistributedConfig(local_device_count=0), {}, "learn.distributed.local_device_count",
         ">= 1"),
        (DistributedConfig(coordinator_address="h:1", num_processes=2, local_device_count=3), {},
         "learn.ppo.minibatch_size", "multiple of the 6 devices"),
    ],
)  # fmt: skip
def test_config_problems_name_the_key(config, env, key, words):
    problems = problems_of(config, env, minibatch_size=16)
    assert [k for k, _ in problems] == [key], problems
    assert words in problems[0][1]
    if key != "learn.ppo.minibatch_size":  # the learner's own check (DataParallel) names that
        with pytest.raises(DistributedConfigError, match=key.split(".")[-1]):
            resolve(config, env)


def _record(replays: list[Path], episodes: range) -> None:
    """The same episodes (same observations, actions, rewards) into each replay."""
    for root in replays:
        recorder = Recorder(root)
        rng = np.random.default_rng(episodes.start)
        for e in episodes:
            recorder.episode("r0", f"e{e}", 3 + e % 4, rng)
        recorder.close()


def test_two_process_learner_publishes_the_versions_one_process_would(tmp_path):
    """`openpi-rl learn` as 2 processes on one replay: the versions a 1-device learner publishes
    on the same data, every process saving its shards under process 0's one manifest; both
    restarted, they resume and apply the operator's rollback together."""
    alone = tmp_path / "alone"
    _record([tmp_path / "replay", alone / "replay"], range(16))  # 8 segments per update: 2
    _run_two(tmp_path, LEARNER, "2")  # both exit 0: process 1 stops when process 0 does
    learner = Learner(learner_config(alone), devices=jax.devices()[:1])
    try:
        assert [learner.step().version for _ in range(2)] == [1, 2]
    finally:
        learner.close()
    for version in (1, 2):
        path = tmp_path / "ckpt" / str(version)
        verify_version(path, version)  # process 0's manifest covers both processes' files
        assert len(list((path / "weights").glob("ocdbt.process_*"))) == 2
        assert versions_diff(path, alone / "ckpt" / str(version)) <= 1e-5

    # Restarted after a rollback to version 1: version 3 trains on from version 1's state.
    for root in (tmp_path, alone):
        save_state(root / "ckpt", OperatorState(rollback_target=1, rollback_id=1))
    _record([tmp_path / "replay", alone / "replay"], range(16, 24))
    _run_two(tmp_path, LEARNER, "1")
    learner = Learner(learner_config(alone), devices=jax.devices()[:1])
    try:
        assert learner.rollback_id == 1  # applied at start: it trains on from version 1
        assert learner.step().version == 3
    finally:
        learner.close()
    # Trained on from version 2 instead, the weights would be far apart.
    assert versions_diff(tmp_path / "ckpt" / "3", alone / "ckpt" / "3") <= 1e-5


def test_a_turns_batch_travels_as_npz_bytes_unchanged():
    ac = build_actor_critic(MODEL, (16, 16), 0)
    b = batch(ac)
    back = unpack(pack(b))
    assert jax.tree.structure(back) == jax.tree.structure(b)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(b), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
