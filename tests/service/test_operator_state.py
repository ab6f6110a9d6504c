"""The operator's decisions survive restarts: after `admin rollback` and `pause-learning`, a
server restarted as a new `openpi-rl serve` process serves the rollback target (pinned),
still refuses the version rolled back from and keeps learning paused; a restarted learner
trains on from the rollback target's weights and optimiser state, and its next version is
still newer than the one rolled back from."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
from flax import nnx
from service_helpers import MODEL, TOKEN, ServerRig, free_port, learner_config, wait_for

from openpi_rl.daemon import Learner
from openpi_rl.weights.operator_state import load_state
from openpi_rl_client import PolicyClient


def _params(learner: Learner) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(learner.params)]


def _serve_toml(tmp_path, port: int, publish_port: int) -> str:
    path = tmp_path / "serve.toml"
    path.write_text(
        f'replay_dir = "{tmp_path / "replay"}"\nmetrics_port = 0\nopenpi_ws_port = 0\n'
        f"value_hidden = [16, 16]\n\n"
        f'[serve]\nendpoint = "tcp://127.0.0.1:{port}"\nmax_batch = 2\n\n'
        f'[swap]\nlearner_endpoint = "tcp://127.0.0.1:{publish_port}"\n'
        f'checkpoint_dir = "{tmp_path / "ckpt"}"\nadmin_endpoint = "tcp://127.0.0.1:{free_port()}"\n\n'
        f'[model]\nkind = "gaussian_mlp"\nobs_dim = {MODEL.obs_dim}\n'
        f"action_dim = {MODEL.action_dim}\naction_horizon = {MODEL.action_horizon}\n"
        f"hidden = {list(MODEL.hidden)}\n"
    )
    return str(path)


def test_a_restart_after_rollback_serves_the_target_and_the_learner_trains_on_from_it(tmp_path):
    publish_port, server_port = free_port(), free_port()
    config = learner_config(tmp_path, publish_port, server_port)
    learner = Learner(config)  # version 0; versions 1..3 as its updates would write them
    opt_state = jax.device_get(learner.opt_state)
    weights = {}
    for v in (1, 2, 3):
        weights[v] = jax.tree.map(lambda x, v=v: x + 0.01 * v, nnx.state(learner.ac))
        learner.checkpoints.save(v, weights[v], opt_state, {"version": v, "rollback_id": 0})
    learner.close()

    rig = ServerRig(tmp_path, publish_port, server_port)
    try:
        assert rig.live == 3  # started from the newest version on disk
        status = rig.admin_call("rollback")["status"]
        assert status["policy_version"] == 2 and status["pinned"] == 2
        assert rig.admin_call("pause-learning")["status"]["learning_paused"] is True
    finally:
        rig.close()
    state = load_state(tmp_path / "ckpt")
    assert (state.pinned, state.rejected, state.rollback_target) == (2, (3,), 2)

    cmd = [sys.executable, "-m", "openpi_rl.cli", "serve", "--config"]
    cmd.append(_serve_toml(tmp_path, server_port, publish_port))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENPI_RL_ADMIN_TOKEN": TOKEN}
    with open(tmp_path / "serve.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        with PolicyClient(
            f"tcp://127.0.0.1:{server_port}", robot_id="r", timeout_s=2.0, retries=60
        ) as client:
            wait_for(lambda: client.health()["status"] == "ready", 120)
            health = client.health()
            assert health["policy_version"] == 2, health
            assert health["pinned"] == 2 and health["learning_paused"] is True
            out = client.infer({"state": np.zeros(MODEL.obs_dim, np.float32)})
            assert out.policy_version == 2

            # The learner restarts while the server runs: paused (from disk and from the
            # server's health), and its weights are the rollback target's.
            again = Learner(config)
            try:
                assert again.version == 3  # numbering goes on: its next version is 4
                want = jax.tree.leaves(nnx.state(again.ac, nnx.Param))
                target = jax.tree.leaves(nnx.split(weights[2], nnx.Param, ...)[1])
                for a, b in zip(want, target, strict=True):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
                assert again.rollback_id == 1  # the next version's meta records it applied
                assert (
                    again.metrics.registry.get_sample_value("openpi_rl_learner_rollbacks_total")
                    == 1
                )
                assert again.paused
            finally:
                again.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
