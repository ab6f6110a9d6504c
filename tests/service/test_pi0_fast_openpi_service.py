"""openpi's Pi0-FAST (`kind = "pi0_fast_openpi"`, tiny variants, the tokenizer fixtures) through
the service as a user runs it: one openpi-rl.toml, `openpi-rl serve --config FILE --section
serve` as a process, a robot on `PolicyClient` sending `config.make_obs(prompt, state, images)`,
the real replay, and the learner built from the same file's `learn` section. The learner trains
on the served chunks (their token ids and behaviour log-probs), publishes version 1, and the
running server hot-swaps to it without compiling; the chunk served after the swap is the new
weights' (its stored log-prob is theirs, not version 0's). Decoding is constrained to readable
chunks (`constrain_actions`), as a model trained from random weights needs."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from service_helpers import free_port, wait_for

from openpi_rl.daemon import Learner
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.models.pi0_fast_openpi import EOS, Pi0FASTOpenPIConfig
from openpi_rl.replay import ReplayReader
from openpi_rl.service.config import EX_CONFIG, ServiceFile
from openpi_rl_client import PolicyClient

TOK = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"
PROMPTS = ("pick up the red block", "put it in the bowl")


def service_toml(root: Path, ports: dict[str, int], tokenizer: Path = TOK) -> str:
    return f"""
replay_dir = "{root / "replay"}"
checkpoint_dir = "{root / "ckpt"}"
publish_endpoint = "tcp://127.0.0.1:{ports["publish"]}"
value_hidden = [16]

[model]
kind = "pi0_fast_openpi"
gemma_variant = "dummy"
siglip_variant = "dummy"
paligemma_tokenizer = "{tokenizer / "paligemma_tiny.model"}"
fast_tokenizer = "{TOK / "fast_tiny"}"
norm_stats = "{TOK / "norm_stats.json"}"
max_decoding_steps = 36
constrain_actions = true
scan = false  # layers unrolled: faster for a tiny model on a CPU

[serve]
metrics_port = {ports["metrics"]}
openpi_ws_port = 0
commit_interval_s = 0.01

[serve.serve]
endpoint = "tcp://127.0.0.1:{ports["serve"]}"
max_batch = 1

[serve.swap]
peer_timeout_s = 5.0

[learn]
segment_length = 4
batch_segments = 4
min_transitions = 8
settle_s = 0.0
max_kl = 1e9
metrics_port = 0
heartbeat_s = 0.2

[learn.ppo]
lr = 1e-3
train_iters = 1
minibatch_size = 16
bc_coef = 1.0
"""


def _role(config: Path, role: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "openpi_rl.cli", role, "--config", str(config), "--section", role],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        text=True,
        **kwargs,
    )


def _compilations(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("openpi_rl_server_compilations "):
                return float(line.split()[1])
    raise AssertionError("no openpi_rl_server_compilations on /metrics")


def _logp(ac, obs: dict, tokens: np.ndarray) -> float:
    """The policy's log-prob of a chunk's tokens (one compiled function for every version)."""
    graphdef, state = nnx.split(ac)
    batched = {k: jnp.asarray(v)[None] for k, v in obs.items()}
    return float(_policy_logprobs(graphdef, state, batched, jnp.asarray(tokens)[None])[0])


@functools.partial(jax.jit, static_argnums=0)
def _policy_logprobs(graphdef, state, obs, tokens):
    return nnx.merge(graphdef, state).model.policy_logprobs(None, obs, tokens)


def test_serve_learn_and_hot_swap_openpis_pi0_fast(tmp_path):
    ports = {k: free_port() for k in ("publish", "metrics", "serve")}
    path = tmp_path / "openpi-rl.toml"
    path.write_text(service_toml(tmp_path, ports))
    service = ServiceFile.load(path)
    config: Pi0FASTOpenPIConfig = service.role_config("serve").model
    assert isinstance(config, Pi0FASTOpenPIConfig) and config == service.role_config("learn").model
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        server = _role(path, "serve", stderr=err)
    learner = None
    rng = np.random.default_rng(0)
    size, camera = config.image_size, config.cameras[0]

    def observation(i: int, state: bool = True) -> dict[str, np.ndarray]:
        obs = config.make_obs(
            PROMPTS[i % 2],
            rng.normal(size=config.state_dim).astype(np.float32),
            {camera: rng.integers(0, 256, (size, size, 3), np.uint8)},
        )
        return obs if state else {k: v for k, v in obs.items() if k != "state"}

    sent: dict[int, dict[str, np.ndarray]] = {}  # transition id -> observation
    replies: dict[int, np.ndarray] = {}  # transition id -> actions
    rewards: dict[int, float] = {}
    try:
        # The learner starts beside the server (as the daemon runs them) and waits for data.
        learner = Learner(service.role_config("learn"))
        with PolicyClient(
            f"tcp://127.0.0.1:{ports['serve']}", robot_id="arm-1", timeout_s=30.0, retries=60
        ) as client:
            wait_for(lambda: client.health()["status"] == "ready", 120, log.read_text)
            meta = client.metadata()
            assert (meta["action_horizon"], meta["action_dim"]) == (10, 3)
            assert meta["obs_spec"]["tokenized_prompt"] == {
                "shape": [config.max_token_len], "dtype": "int32", "optional": False
            }  # fmt: skip
            assert meta["obs_spec"]["tokenized_prompt_mask"]["dtype"] == "bool"
            compiled = _compilations(ports["metrics"])

            # Three episodes of three chunks; the last chunk of episode 2 an operator take-over.
            executed = np.linspace(-0.5, 0.5, 30, dtype=np.float32).reshape(10, 3)
            for e in range(3):
                for t in range(3):
                    obs = observation(t)
                    out = client.infer(obs, episode_id=f"e{e}")
                    assert out.actions.shape == (10, 3) and out.actions.dtype == np.float32
                    assert out.policy_version == 0
                    tid = out.transition_id
                    sent[tid], replies[tid], rewards[tid] = obs, out.actions, 0.5 * t + e
                    take_over = e == 2 and t == 2
                    ack = client.report(
                        tid, rewards[tid], done=t == 2,
                        executed_actions=executed if take_over else None, intervened=take_over,
                    )  # fmt: skip
                    assert ack["ok"] is True
            # What robots send (cameras and prompt, with or without the state) was compiled
            # before ready: serving it compiles nothing.
            out = client.infer(observation(0, state=False), episode_id="no-state")
            assert out.actions.shape == (10, 3)
            assert _compilations(ports["metrics"]) == compiled

            result = learner.step()
            assert result is not None and result.published and result.version == 1
            m = result.metrics
            assert m["finite"] == 1.0 and result.transitions == 9
            # The stored token ids and log-probs reproduce the serving policy's log-probs.
            assert m["behaviour_logp_gap"] < 1e-3, m
            assert m["bc_loss"] > 0  # the take-over's executed actions, re-encoded as tokens

            wait_for(lambda: client.health()["policy_version"] == 1, 60, client.health)
            health = client.health()
            assert health["learner"]["version"] == 1 and health["versions_behind"] == 0
            obs = observation(1)
            after = client.infer(obs, episode_id="e3")
            assert after.policy_version == 1
            sent[after.transition_id], replies[after.transition_id] = obs, after.actions
            assert _compilations(ports["metrics"]) == compiled  # the swap compiled nothing
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, log.read_text()[-3000:]
    finally:
        server.kill()
        if learner is not None:
            learner.close()

    with ReplayReader(str(tmp_path / "replay")) as reader:
        rows = {r.id: r for r in reader.transitions()}
        assert len(rows) == 11
        for tid, obs in sent.items():
            row = rows[tid]
            stored = reader.observation(row)
            assert stored["tokenized_prompt"].dtype == np.int32
            assert stored["tokenized_prompt_mask"].dtype == np.bool_
            assert stored.keys() == obs.keys()
            for k, v in obs.items():
                np.testing.assert_array_equal(stored[k], v)
            tokens = row.policy_actions
            assert tokens.dtype == np.int32 and tokens.shape == (config.max_decoding_steps,)
            assert np.isfinite(row.logp) and row.logp < 0
            assert row.reward == rewards.get(tid, 0.0)
            np.testing.assert_array_equal(row.actions, replies[tid])
            # The reply's actions are what the stored tokens decode to.
            np.testing.assert_allclose(config.tokens_to_actions(tokens[None])[0], replies[tid])
        assert sum(r.done for r in rows.values()) == 3
        # Constrained decoding: every chunk is one readable "Action: ... | EOS" sequence, and
        # the chunks differ (not the zeros openpi's extract_actions gives a malformed one).
        assert all((r.policy_actions == EOS).sum() == 1 for r in rows.values())
        assert len({r.actions.tobytes() for r in rows.values()}) == len(rows)
        take_over = [r for r in rows.values() if r.intervened]
        assert len(take_over) == 1
        np.testing.assert_array_equal(take_over[0].executed_actions, executed)

        # The chunk served after the swap is version 1's: its log-prob under the learner's
        # version 1 weights is the stored one; under version 0's weights it is not.
        row = rows[after.transition_id]
        assert row.policy_version == 1
        version_0 = build_actor_critic(config, (16,), 0)
        np.testing.assert_allclose(
            _logp(learner.ac, sent[row.id], row.policy_actions), row.logp, atol=1e-3
        )
        assert abs(_logp(version_0, sent[row.id], row.policy_actions) - row.logp) > 0.1
        first = rows[min(rows)]
        assert first.policy_version == 0
        np.testing.assert_allclose(
            _logp(version_0, sent[first.id], first.policy_actions), first.logp, atol=1e-3
        )


@pytest.mark.parametrize("role", ["serve", "learn"])
def test_a_missing_tokenizer_file_is_a_config_error_exit_78(tmp_path, role):
    """The model's files are part of its configuration: a server or learner whose tokenizer
    path is wrong exits EX_CONFIG naming the file (the daemon and systemd hold it down until
    the file is fixed), not 1 with a traceback at every restart."""
    ports = {k: free_port() for k in ("publish", "metrics", "serve")}
    path = tmp_path / "openpi-rl.toml"
    path.write_text(service_toml(tmp_path, ports, tokenizer=tmp_path / "missing"))
    proc = _role(path, role, stderr=subprocess.PIPE)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EX_CONFIG, stderr[-3000:]
    assert f"openpi-rl {role}: model (pi0_fast_openpi) does not build" in stderr
    assert str(tmp_path / "missing" / "paligemma_tiny.model") in stderr
    assert "Traceback" not in stderr


def test_check_names_the_model_configs_own_error(tmp_path):
    """`openpi-rl check` shows what the model config raised (not the roles' wrapper of it)."""
    from openpi_rl.service.check import check_models

    path = tmp_path / "openpi-rl.toml"
    ports = dict.fromkeys(("publish", "metrics", "serve"), 0)
    path.write_text(service_toml(tmp_path, ports, tokenizer=tmp_path / "missing"))
    findings = check_models({"serve": ServiceFile.load(path).role_config("serve")})
    assert len(findings) == 1 and findings[0].where == "serve.model"
    assert findings[0].message.startswith(
        "Pi0FASTOpenPIConfig does not build: FileNotFoundError: PaliGemma tokenizer: file not "
        f"found at {tmp_path / 'missing' / 'paligemma_tiny.model'}"
    )


def test_with_a_fixed_prompt_the_key_sets_robots_send_are_compiled_before_ready():
    """With `prompt` set the model tokenizes the state itself: a robot sends its cameras and its
    state, and `state` is required. The server compiles the key sets the config names before
    it says ready; every one must hold the required keys, and cameras + state must be one."""
    config = Pi0FASTOpenPIConfig(cameras=("base_0_rgb",), prompt="pick up the block")
    required = {k for k, s in config.obs_spec.items() if not s.optional}
    assert required == {"state"}
    sets = {frozenset(k) for k in config.serving_key_sets}
    assert all(required <= keys for keys in sets), sets
    assert frozenset({"base_0_rgb", "state"}) in sets
