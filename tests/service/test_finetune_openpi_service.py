"""Fine-tuning a pretrained openpi Pi0-FAST through the service, as an openpi user does it: one
openpi-rl.toml naming the openpi checkpoint, its tokenizers and norm stats (`[model]`), the
robot's input map (`[serve] inputs = "libero"`); `openpi-rl serve` as a process; the robot
unchanged on openpi-client (PyPI, its own venv) sending LIBERO-style observations with a prompt
over openpi's WebSocket protocol. Version 0 answers with openpi's own actions for that checkpoint
(tests/fixtures/openpi_pi0_fast/libero/, made by openpi's policy code), the replay holds each
prompt and its tokens, the learner runs a LoRA PPO update (adapters and value head only) and
publishes a version that holds only those, and the running server swaps to it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from service_helpers import free_port, wait_for

from openpi_rl.daemon import Learner
from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig
from openpi_rl.policy_server.inputs import RobotInputs
from openpi_rl.replay import ReplayReader
from openpi_rl.service.config import ServiceFile
from openpi_rl.service.export import export_main
from openpi_rl.weights.start import build_start
from openpi_rl_client import PolicyClient

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LIBERO = FIXTURES / "openpi_pi0_fast" / "libero"
TOK = FIXTURES / "tokenizers"
META = json.loads((LIBERO / "pipeline.json").read_text())

# The robot: openpi-client's own WebsocketClientPolicy, as openpi's LIBERO example calls it.
ROBOT = """
import json, sys
import numpy as np
from openpi_client import websocket_client_policy
port, npz, prompts = int(sys.argv[1]), np.load(sys.argv[2]), json.loads(sys.argv[3])
policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
out = []
for i, prompt in enumerate(prompts):
    obs = {k.split("/", 1)[1]: npz[k] for k in npz.files if k.startswith(f"{i}/")}
    obs["prompt"] = prompt
    reply = policy.infer(obs)
    out.append({"actions": reply["actions"].tolist(), "version": int(reply["policy_version"]),
                "tid": int(reply["transition_id"])})
print(json.dumps(out))
"""


def service_toml(root: Path, ports: dict[str, int]) -> str:
    cameras = ", ".join(f'"{c}"' for c in META["cameras"])
    return f"""
replay_dir = "{root / "replay"}"
checkpoint_dir = "{root / "ckpt"}"
publish_endpoint = "tcp://127.0.0.1:{ports["publish"]}"
value_hidden = [16]

[model]                                   # the openpi checkpoint, fine-tuned with LoRA
kind = "pi0_fast_openpi"
checkpoint = "{LIBERO / "params"}"
gemma_variant = "dummy_lora"
siglip_variant = "dummy"
paligemma_tokenizer = "{TOK / "paligemma_tiny.model"}"
fast_tokenizer = "{TOK / "fast_tiny"}"
norm_stats = "{LIBERO / "assets" / "norm_stats.json"}"
cameras = [{cameras}]
state_dim = {META["state_dim"]}
action_dim = {META["action_dim"]}
action_horizon = {META["action_horizon"]}
max_token_len = {META["max_token_len"]}
max_decoding_steps = {META["max_decoding_steps"]}
temperature = 0.0
scan = false

[serve]
inputs = "libero"
metrics_port = {ports["metrics"]}
openpi_ws_port = {ports["ws"]}
commit_interval_s = 0.01

[serve.serve]
endpoint = "tcp://127.0.0.1:{ports["serve"]}"
max_batch = 1

[learn]
segment_length = 2
batch_segments = 2
min_transitions = 2  # an open episode gives all but its newest chunk (the bootstrap)
settle_s = 0.0
max_kl = 1e9
metrics_port = 0
heartbeat_s = 0.2

[learn.ppo]
lr = 1e-2
train_iters = 1
minibatch_size = 4
"""


def _robot(python: str, port: int, prompts: list[str]) -> list[dict]:
    out = subprocess.run(
        [python, "-c", ROBOT, str(port), str(LIBERO / "pipeline.npz"), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_openpi_client_robot_fine_tunes_a_pretrained_pi0_fast_with_lora(
    tmp_path, openpi_client_python
):
    golden = np.load(LIBERO / "pipeline.npz")
    ports = {k: free_port() for k in ("publish", "metrics", "serve", "ws")}
    path = tmp_path / "openpi-rl.toml"
    path.write_text(service_toml(tmp_path, ports))
    service = ServiceFile.load(path)
    assert isinstance(service.role_config("serve").model, Pi0FASTOpenPIConfig)
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openpi_rl.cli",
                "serve",
                "--config",
                str(path),
                "--section",
                "serve",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stderr=err,
            text=True,
        )
    learner = None
    try:
        learner = Learner(service.role_config("learn"))
        with PolicyClient(f"tcp://127.0.0.1:{ports['serve']}", robot_id="ops", timeout_s=30.0) as c:
            wait_for(lambda: c.health()["status"] == "ready", 180, log.read_text)
            prompts = META["prompts"]
            before = _robot(openpi_client_python, ports["ws"], prompts)
            # Version 0 is the checkpoint: openpi's own actions for it (LoRA b = 0 adds nothing).
            for i, reply in enumerate(before):
                assert reply["version"] == 0
                np.testing.assert_allclose(reply["actions"], golden["actions"][i], atol=1e-6)

            results = []
            wait_for(lambda: results.append(learner.step()) or results[-1] is not None, 60)
            result = results[-1]
            assert result is not None and result.published and result.version == 1, result
            assert result.metrics["finite"] == 1.0
            wait_for(lambda: c.health()["policy_version"] == 1, 120, c.health)
            after = _robot(openpi_client_python, ports["ws"], prompts[:1])
            assert after[0]["version"] == 1
        server.terminate()
        assert server.wait(60) == 0, log.read_text()[-3000:]
    finally:
        server.kill()
        if learner is not None:
            learner.close()

    with ReplayReader(str(tmp_path / "replay")) as reader:
        rows = {r.id: r for r in reader.transitions()}
        for i, reply in enumerate(before):
            row = rows[reply["tid"]]
            stored = reader.stored_observation(row)
            assert stored.prompt == prompts[i]
            np.testing.assert_array_equal(
                stored.arrays["tokenized_prompt"], golden["tokenized_prompt"][i]
            )
            np.testing.assert_array_equal(row.policy_actions, golden["greedy_tokens"][i])
        assert reader.stored_observation(rows[after[0]["tid"]]).prompt == prompts[0]
    # Two prompts on the same images and state: different action tokens.
    assert not np.array_equal(rows[before[0]["tid"]].policy_actions, rows[before[1]["tid"]].policy_actions)  # fmt: skip
    # The LoRA version holds only what trains (adapters, value head, their optimizer state).
    v0, v1 = _bytes(tmp_path / "ckpt" / "0"), _bytes(tmp_path / "ckpt" / "1")
    assert v1 < 0.5 * v0, (v0, v1)

    # Version 1 goes back to openpi's layout; a config starting from it acts as the server did.
    out = tmp_path / "exported"
    assert export_main([str(out), "--config", str(path), "--version", "1"]) == 0
    assert (out / "assets" / "norm_stats.json").read_bytes() == (
        LIBERO / "assets" / "norm_stats.json"
    ).read_bytes()
    config = dataclasses.replace(service.role_config("serve").model, checkpoint=str(out))
    inputs = RobotInputs(config.obs_spec, config.tokenize, default="libero")
    raw = {k.split("/", 1)[1]: golden[k] for k in golden.files if k.startswith("0/")}
    obs = {k: np.asarray(v)[None] for k, v in inputs.observation("r", raw, prompts[0]).items()}
    ids = config.create(jax.random.key(0)).decode(jax.random.key(0), obs, greedy=True)["ids"]
    np.testing.assert_array_equal(np.asarray(ids[0]), rows[after[0]["tid"]].policy_actions)
    assert export_main([str(out), "--config", str(path)]) == 2  # OUT exists: refused

    # One of our versions as a new run's checkpoint: version 1 again, its value head included.
    ours = dataclasses.replace(config, checkpoint=str(tmp_path / "ckpt" / "1"))
    learn = service.role_config("learn")
    ac = build_start(ours, learn.value_hidden, learn.seed)
    ids = ac.model.decode(jax.random.key(0), obs, greedy=True)["ids"]
    np.testing.assert_array_equal(np.asarray(ids[0]), rows[after[0]["tid"]].policy_actions)
    fresh = build_start(config, learn.value_hidden, learn.seed)
    assert float(ac.value(None, obs)[0]) != float(fresh.value(None, obs)[0])  # the trained critic
