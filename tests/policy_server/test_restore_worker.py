"""The restore worker process: real orbax versions on disk, a real subprocess, real signals."""

import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.policy_server.restore_worker import RestoreError, RestoreWorker
from openpi_rl.weights import VersionCheckpoints
from openpi_rl.weights.versions import restore_version

CONFIG = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4, hidden=(32, 32))


def test_worker_restores_what_orbax_restores_in_process_and_outlives_its_crashes(tmp_path):
    ac = build_actor_critic(CONFIG, (16,), 0)
    checkpoints = VersionCheckpoints(tmp_path / "ckpt")
    weights = jax.tree.map(lambda x: x + 1, nnx.state(ac))
    path = checkpoints.save(1, weights, {"step": np.zeros(())}, {})
    checkpoints.close()
    want = [np.asarray(x) for x in jax.tree.leaves(restore_version(path, ac))]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(ac))
    worker = RestoreWorker(abstract, timeout_s=60)

    def restores_right() -> None:
        got = worker.restore(path)
        assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))

    try:
        restores_right()
        pid = worker.pid
        with pytest.raises(RestoreError, match="not found"):  # answered: the worker serves on
            worker.restore(tmp_path / "ckpt" / "7")
        assert worker.pid == pid
        restores_right()

        os.kill(pid, signal.SIGKILL)  # died while idle: restarted by the next restore
        os.waitpid(pid, 0)
        restores_right()
        assert worker.pid != pid and worker.starts == 2

        worker.timeout_s = 1.0
        os.kill(worker.pid, signal.SIGSTOP)  # hung: that restore fails, the worker is replaced
        with pytest.raises(RestoreError, match="no answer"):
            worker.restore(path)
        assert worker.starts == 3
        worker.timeout_s = 60
        restores_right()
    finally:
        worker.close()
    assert worker.pid is None
