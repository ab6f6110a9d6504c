"""One GPU shared by the policy server and the learner, set from the service file: `[gpu]`
becomes each role's JAX environment (memory share, preallocation, devices) under the daemon
and when a role runs alone from the file; with no `[gpu]` nothing is set. `openpi-rl check`
prints what serving and one update need (openpi's gemma_2b_lora, bf16, LoRA) against each
role's share, and refuses shares that add up to more than the device or a need past a share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openpi_rl.service.check import check_main
from openpi_rl.service.children import ChildSpec, role_specs, spawn
from openpi_rl.service.config import ServiceFile
from tests._net import free_port

GPU_ENV = (
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
    "CUDA_VISIBLE_DEVICES",
)

# openpi's Pi0-FAST as the README's GPU section runs it: gemma_2b_lora, three cameras, its
# prompt and decoding lengths, bf16 compute over float32 weights.
OPENPI_MODEL = """
[model]
kind = "pi0_fast_openpi"
gemma_variant = "gemma_2b_lora"
siglip_variant = "So400m/14"
cameras = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
max_token_len = 250
max_decoding_steps = 256
dtype = "bfloat16"
param_dtype = "float32"
"""

H100 = """
[gpu]
memory_gib = 79.6
memory_fraction = { serve = 0.3, learn = 0.65 }
preallocate = false
"""


def service_file(tmp_path: Path, model: str = OPENPI_MODEL, gpu: str = H100, **sizes) -> Path:
    """A service file with every directory under tmp_path, every port a free one, the bridge
    off (it uses no accelerator) and the server's max_batch / learner's minibatch_size."""
    p = {k: free_port() for k in ("serve", "ws", "learn", "pub", "daemon", "zmq")}
    text = f"""
replay_dir = "{tmp_path}/replay"
checkpoint_dir = "{tmp_path}/checkpoints"
publish_endpoint = "tcp://127.0.0.1:{p["pub"]}"
{model}
{gpu}
[daemon]
roles = ["serve", "learn"]
metrics_port = {p["daemon"]}

[serve]
metrics_port = {p["serve"]}
openpi_ws_port = {p["ws"]}

[serve.serve]
endpoint = "tcp://127.0.0.1:{p["zmq"]}"
max_batch = {sizes.get("max_batch", 8)}

[learn]
metrics_port = {p["learn"]}

[learn.ppo]
minibatch_size = {sizes.get("minibatch_size", 16)}
"""
    path = tmp_path / "openpi-rl.toml"
    path.write_text(text)
    return path


def run_check(path: Path, capsys) -> tuple[int, list[str]]:
    rc = check_main(["--config", str(path)])
    return rc, capsys.readouterr().out.splitlines()


def test_server_and_learner_sharing_an_h100_pass_and_check_prints_what_each_needs(tmp_path, capsys):
    rc, lines = run_check(service_file(tmp_path), capsys)
    assert rc == 0, lines
    assert lines[-1].endswith(": ok")
    serve = next(ln for ln in lines if " gpu.memory_fraction.serve: " in ln)
    learn = next(ln for ln in lines if " gpu.memory_fraction.learn: " in ln)
    assert serve.startswith("info") and learn.startswith("info")
    assert "the policy server needs " in serve and "for serving batch 8" in serve
    assert "of its 0.3 x 79.6 GiB = 23.9 GiB" in serve
    # auto with a _lora variant: only the LoRA adapters and the value head train.
    head = 2048 * 64 + 64 + 64 * 64 + 64 + 64 + 1
    assert (
        f"for a PPO update of minibatch 16 (lora: trains {27_869_184 + head:,} parameters)" in learn
    )
    assert "of its 0.65 x 79.6 GiB = 51.7 GiB" in learn
    assert not [ln for ln in lines if ln.startswith(("problem", "warning"))]


def test_a_learner_needing_more_than_its_share_is_refused_naming_the_fix(tmp_path, capsys):
    gpu = H100.replace("learn = 0.65", "learn = 0.5")
    rc, lines = run_check(service_file(tmp_path, gpu=gpu, minibatch_size=64), capsys)
    assert rc == 1, lines
    (problem,) = [ln for ln in lines if ln.startswith("problem")]
    assert problem.startswith("problem  gpu.memory_fraction.learn: the learner needs ")
    needs = float(problem.split("needs ")[1].split(" GiB")[0])
    assert needs > 0.5 * 79.6  # what it needs, and what it has:
    assert "for a PPO update of minibatch 64" in problem and "0.5 x 79.6 GiB = 39.8 GiB" in problem
    assert "raise gpu.memory_fraction.learn, or lower learn.ppo.minibatch_size" in problem
    assert lines[-1].endswith("1 problem(s)")


def test_a_server_needing_more_than_its_share_is_refused(tmp_path, capsys):
    gpu = H100.replace("serve = 0.3", "serve = 0.1")
    rc, lines = run_check(service_file(tmp_path, gpu=gpu), capsys)
    assert rc == 1
    (problem,) = [ln for ln in lines if ln.startswith("problem")]
    assert " gpu.memory_fraction.serve: the policy server needs " in problem
    assert "0.1 x 79.6 GiB = 8.0 GiB: raise gpu.memory_fraction.serve, or lower " in problem
    assert "serve.serve.max_batch" in problem


def test_shares_adding_up_to_more_than_the_device_are_refused_unless_on_two_devices(
    tmp_path, capsys
):
    gpu = H100.replace("learn = 0.65", "learn = 0.8")
    rc, lines = run_check(service_file(tmp_path, gpu=gpu), capsys)
    assert rc == 1
    (problem,) = [ln for ln in lines if ln.startswith("problem")]
    assert " gpu.memory_fraction: serve 0.3 + learn 0.8 = 1.1 of one device" in problem
    # A share left out is JAX's own, 0.75 each: two processes preallocating 150%.
    rc, lines = run_check(service_file(tmp_path, gpu="[gpu]\npreallocate = true"), capsys)
    assert rc == 1
    assert any(
        "serve 0.75 (JAX's default) + learn 0.75 (JAX's default) = 1.5" in ln for ln in lines
    )
    two = gpu + 'visible_devices = { serve = "0", learn = "1" }\n'
    rc, lines = run_check(service_file(tmp_path, gpu=two), capsys)
    assert rc == 0, lines


def test_float32_compute_on_a_gpu_is_a_warning(tmp_path, capsys):
    model = OPENPI_MODEL.replace('dtype = "bfloat16"', 'dtype = "float32"')
    rc, lines = run_check(service_file(tmp_path, model=model, minibatch_size=4), capsys)
    assert rc == 0, lines
    assert any(
        ln.startswith("warning  serve.model.dtype: float32 compute on a GPU") for ln in lines
    )


def test_wrong_gpu_keys_are_named(tmp_path, capsys):
    for gpu, what in [
        ("[gpu]\nmemory_fraction = { serve = 1.5 }", "gpu.memory_fraction.serve: expected 0 < x"),
        ("[gpu]\nmemory_fraction = { robot = 0.5 }", "gpu.memory_fraction: ['robot'] not in"),
        ('[gpu]\nallocator = "fast"', "gpu.allocator: expected one of"),
        ("[gpu]\nmemory_gb = 80", "unknown key(s) ['memory_gb']"),
    ]:
        rc, lines = run_check(service_file(tmp_path, model="", gpu=gpu), capsys)
        assert rc == 78, (gpu, lines)
        assert what in lines[0], (gpu, lines)


def test_without_a_gpu_table_no_role_gets_an_environment(tmp_path, capsys):
    path = service_file(tmp_path, model="", gpu="")
    service = ServiceFile.load(path)
    assert all(spec.env == {} for spec in role_specs(service))
    rc, lines = run_check(path, capsys)
    assert rc == 0 and not [ln for ln in lines if " gpu." in ln], lines


def test_the_daemon_starts_each_role_with_its_gpu_environment(tmp_path):
    gpu = H100 + 'visible_devices = { serve = "0" }\nallocator = "bfc"\n'
    service = ServiceFile.load(service_file(tmp_path, model="", gpu=gpu))
    specs = {spec.role: spec for spec in role_specs(service)}
    assert specs["serve"].env == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_ALLOCATOR": "bfc",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    assert specs["learn"].env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.65"
    assert "CUDA_VISIBLE_DEVICES" not in specs["learn"].env
    # ...and the process gets it, over what the daemon's own environment says.
    out = tmp_path / "env.json"
    dump = f"import json, os; json.dump({{k: os.environ.get(k) for k in {GPU_ENV}}}, open({str(out)!r}, 'w'))"
    spec = ChildSpec("serve", [sys.executable, "-c", dump], env=specs["serve"].env)
    proc = spawn(spec, str(tmp_path / "notify.sock"), {**os.environ, "CUDA_VISIBLE_DEVICES": "3"})
    assert proc.wait(timeout=30) == 0
    assert json.loads(out.read_text()) == specs["serve"].env


@pytest.mark.parametrize("role", ["serve", "learn"])
def test_a_role_run_alone_from_the_file_sets_its_environment_before_it_starts(tmp_path, role):
    """`openpi-rl ROLE --config FILE --section ROLE` (what the systemd units run): the role's
    `[gpu]` environment is in place when the role starts."""
    path = service_file(tmp_path, model="", gpu=H100)
    module, function = {
        "serve": ("openpi_rl.policy_server.serve", "serve"),
        "learn": ("openpi_rl.daemon.learner", "learn"),
    }[role]
    code = f"""
import json, os, sys
import {module} as m
def fake(config):
    json.dump({{k: os.environ.get(k) for k in {GPU_ENV}}}, sys.stdout)
    return 0
m.{function} = fake
from openpi_rl.cli import main
sys.exit(main([{role!r}, "--config", {str(path)!r}, "--section", {role!r}]))
"""
    env = {k: v for k, v in os.environ.items() if k not in GPU_ENV}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3" if role == "serve" else "0.65",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_ALLOCATOR": None,
        "CUDA_VISIBLE_DEVICES": None,
    }


def test_a_changed_share_restarts_only_its_role_on_reload(tmp_path):
    """SIGHUP restarts a role whose inputs changed: the learner's new share is the learner's."""
    path = service_file(tmp_path, model="", gpu=H100)
    before = {s.role: s.inputs for s in role_specs(ServiceFile.load(path))}
    path.write_text(path.read_text().replace("learn = 0.65", "learn = 0.6"))
    after = {s.role: s.inputs for s in role_specs(ServiceFile.load(path))}
    assert before["serve"] == after["serve"] and before["learn"] != after["learn"]


def test_full_finetuning_needs_adam_over_every_weight_and_check_says_lora_would_fit(
    tmp_path, capsys
):
    from openpi_rl.daemon.learner import LearnerConfig

    if "finetune" not in LearnerConfig.__dataclass_fields__:
        pytest.skip("LearnerConfig has no finetune setting yet")
    path = service_file(tmp_path)
    path.write_text(path.read_text().replace("[learn]\n", '[learn]\nfinetune = "full"\n'))
    rc, lines = run_check(path, capsys)
    assert rc == 1
    (problem,) = [ln for ln in lines if ln.startswith("problem")]
    assert " gpu.memory_fraction.learn: the learner needs " in problem
    head = 2048 * 64 + 64 + 64 * 64 + 64 + 64 + 1  # the value head on gemma's width
    assert f"(full: trains {2_951_204_592 + head:,} parameters)" in problem
    assert 'or finetune = "lora" (a _lora variant)' in problem
