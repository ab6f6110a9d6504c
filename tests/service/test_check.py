"""`openpi-rl check --config FILE` names every problem of a configuration and of the machine at
once (busy port, unwritable directory, model that does not build, unknown key, roles that
disagree) with a non-zero exit status, and passes the shipped example."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from openpi_rl.service.check import check_main
from tests._net import free_port

EXAMPLE = Path(__file__).parents[2] / "systemd" / "openpi-rl.toml.example"


def example_on(tmp_path: Path) -> str:
    """The shipped example with its directories under tmp_path and every port a free one (the
    test machine may run other services on the example's ports)."""
    text = EXAMPLE.read_text().replace("/var/lib/openpi-rl", str(tmp_path / "var"))
    ports = {p: free_port() for p in set(re.findall(r"(?:= |:)(\d{4,5})\b(?!\.)", text))}
    return re.sub(r"(= |:)(\d{4,5})\b(?!\.)", lambda m: f"{m[1]}{ports[m[2]]}", text)


def test_the_shipped_example_passes_with_exit_0(tmp_path, capsys):
    config = tmp_path / "openpi-rl.toml"
    config.write_text(example_on(tmp_path))
    assert check_main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith(": ok"), out
    assert "problem" not in out
    assert not (tmp_path / "var").exists()  # check creates nothing


def test_every_problem_is_named_at_once_and_the_exit_status_is_1(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    (tmp_path / "a-file").write_text("")
    text = example_on(tmp_path)
    text = re.sub(r"(?m)^checkpoint_dir = .*$", f'checkpoint_dir = "{tmp_path}/a-file/ckpt"', text)
    text = text.replace("obs_dim = 4", "obs_dim = 4\nhidden = [-1, 8]")  # cannot build
    text = re.sub(r"(?m)^(\[serve\].*\nmetrics_port = )\d+", rf"\g<1>{busy_port}", text)
    text = text.replace("robots = [", "colour = 'red'\nrobots = [")  # unknown key
    text = text.replace("[learn.ppo]", "value_hidden = [32]\n\n[learn.ppo]")  # disagrees
    config = tmp_path / "openpi-rl.toml"
    config.write_text(text)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "openpi_rl.cli", "check", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        busy.close()
    problems = [ln for ln in out.stdout.splitlines() if ln.startswith("problem")]
    assert out.returncode == 1, out.stdout + out.stderr
    expected = {
        "serve.metrics_port": f"127.0.0.1:{busy_port} is in use",
        "learn.checkpoint_dir": "a-file is not a directory",
        "serve.model": "GaussianMLPConfig does not build",
        "bridge": "unknown key(s) ['colour']",
        "learn.value_hidden": "differs from serve.value_hidden",
    }
    for where, what in expected.items():
        assert any(f" {where}: " in ln and what in ln for ln in problems), (where, out.stdout)
    assert out.stdout.strip().endswith(f"{len(problems)} problem(s)")


def test_two_roles_on_one_port_and_an_unreadable_file(tmp_path, capsys):
    text = example_on(tmp_path)
    port = re.search(r"(?m)^\[serve\].*\nmetrics_port = (\d+)", text).group(1)
    text = re.sub(r"(?m)^(\[learn\].*\nmetrics_port = )\d+", rf"\g<1>{port}", text)
    config = tmp_path / "openpi-rl.toml"
    config.write_text(text)
    assert check_main(["--config", str(config)]) == 1
    assert (
        f"learn.metrics_port: port {port} is also serve.metrics_port's" in capsys.readouterr().out
    )

    config.write_text("replay_dir = \n")  # not TOML: nothing else can be checked
    assert check_main(["--config", str(config)]) == 78
    assert "config:" in capsys.readouterr().out


# -- the memory a PaliGemma variant needs (models/paligemma/memory.py)


def test_memory_estimate_counts_openpis_tree_and_what_lora_trains():
    from openpi_rl.models.paligemma import param_shapes
    from openpi_rl.models.paligemma.memory import memory_estimate, paligemma_variant_config

    full = memory_estimate("gemma_2b")
    assert full.params == full.trainable == 2_923_335_408  # openpi's full tree
    assert full.serve_weights_bytes == 2 * full.params  # bf16 for serving
    assert full.train_weights_bytes == full.train_grads_bytes == 4 * full.params
    assert full.train_adam_bytes == 8 * full.params
    # KV cache: k and v, 18 layers, 1 KV head of 256, 3 x 256 patches + 250 + 256 positions, bf16.
    assert full.serve_positions == 3 * 256 + 250 + 256
    assert full.serve_kv_cache_bytes == 2 * 18 * 1 * full.serve_positions * 256 * 2
    # frozen_filter with gemma_2b_lora: the decoder's base weights freeze; its LoRA adapters
    # (27,869,184) and the whole SigLIP tower train.
    lora = memory_estimate("gemma_2b_lora")
    shapes = param_shapes(paligemma_variant_config("gemma_2b_lora"))
    siglip = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("PaliGemma/img/"))
    assert siglip == 414_803_696
    assert lora.params == 2_923_335_408 + 27_869_184
    assert lora.trainable == 27_869_184 + siglip
    assert lora.train_bytes < full.train_bytes and lora.train_activations_bytes > 0
    assert "2,951,204,592 params" in lora.summary() and "trains 442,672,880" in lora.summary()


def test_model_memory_prints_the_estimate_for_a_variant(capsys):
    assert check_main(["--model-memory", "gemma_2b_lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("paligemma gemma_2b_lora: 2,951,204,592 params; serving batch 1")
    assert "PPO update minibatch 8 (trains 442,672,880)" in out
    assert check_main(["--model-memory", "gemma_7b"]) == 2
    assert "expected one of" in capsys.readouterr().err


def test_a_paligemma_model_config_gets_an_info_line():
    import dataclasses

    from openpi_rl.service.check import model_memory

    @dataclasses.dataclass
    class Model:  # a config naming openpi's variant
        paligemma_variant: str = "tiny_lora"

    @dataclasses.dataclass
    class Role:
        model: object

    findings = model_memory({"serve": Role(Model()), "learn": Role(object())})
    assert [(f.where, f.severity) for f in findings] == [("serve.model", "info")]
    assert str(findings[0]).startswith("info     serve.model: paligemma tiny_lora: ")


def test_check_prints_the_memory_of_a_pi0_fast_openpi_model(tmp_path):
    text = example_on(tmp_path).replace(
        'kind = "gaussian_mlp"', 'kind = "pi0_fast_openpi"\ngemma_variant = "tiny"'
    )
    config = tmp_path / "openpi-rl.toml"
    config.write_text(text.replace("obs_dim = 4\naction_dim = 1", "action_dim = 1"))
    out = subprocess.run(
        [sys.executable, "-m", "openpi_rl.cli", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("info")]
    assert len(lines) == 2 and " serve.model: paligemma tiny: 524,352 params;" in lines[0]
    assert "serving batch 8 (float32 weights" in lines[0]  # the server's max_batch
    assert " learn.model: paligemma tiny: 524,352 params;" in lines[1]


def test_memory_estimate_of_a_models_own_config_follows_its_sizes():
    from openpi_rl.models.paligemma.memory import memory_estimate, paligemma_variant_config

    config = paligemma_variant_config("gemma_2b_lora")
    a = memory_estimate(config, num_images=1, prompt_len=48, decode_steps=32)
    b = memory_estimate("gemma_2b_lora", num_images=1, prompt_len=48, decode_steps=32)
    assert a.params == b.params and a.trainable == b.trainable
    assert a.serve_positions == 256 + 48 + 32 and a.serve_dtype == "bfloat16"


def test_curves_need_a_writable_dir_and_wandb_installed(tmp_path, monkeypatch):
    from openpi_rl.service.check import check

    (tmp_path / "a-file").write_text("")
    config = tmp_path / "openpi-rl.toml"
    curves = f'\n[learn.curves]\nwandb = true\ndir = "{tmp_path}/a-file/run"\n'
    config.write_text(example_on(tmp_path) + curves)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    found = {f.where: f.message for f in check(config) if f.severity == "problem"}
    assert "openpi-rl[wandb]" in found.pop("learn.curves.wandb")
    assert "is not a directory" in found.pop("learn.curves.dir")
    assert not found


def test_learn_distributed_is_checked(tmp_path, monkeypatch):
    from openpi_rl.service.check import check

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "openpi-rl.toml"

    def problems(table: str) -> dict[str, str]:
        config.write_text(example_on(tmp_path) + "\n[learn.distributed]\n" + table)
        return {f.where: f.message for f in check(config) if f.severity == "problem"}

    key = "learn.distributed."
    found = problems('num_processes = 2\nprocess_id = 2\ncoordinator_address = "nohost"\n')
    assert found.keys() == {key + "process_id", key + "coordinator_address"}, found
    assert "[0, 2)" in found[key + "process_id"]
    assert "host:port" in found[key + "coordinator_address"]
    assert "needs a coordinator" in problems("num_processes = 2\n")[key + "coordinator_address"]
    config.write_text(
        example_on(tmp_path).replace("[learn.ppo]", "[learn.ppo]\nminibatch_size = 16")
        + "\n[learn.distributed]\nlocal_device_count = 3\n"
    )
    found = {f.where: f.message for f in check(config) if f.severity == "problem"}
    assert "multiple of the 3 devices" in found.pop("learn.ppo.minibatch_size"), found
    assert not found
    assert problems('coordinator_address = "10.0.0.1:1234"\nnum_processes = 2\n') == {}
    assert problems("local_device_count = 2\nfsdp_min_size = 0\n") == {}


def test_a_replay_database_must_be_reachable(tmp_path, pg_url):
    from openpi_rl.service.check import check

    config = tmp_path / "openpi-rl.toml"

    def problems(replay: str) -> dict[str, str]:
        text = re.sub(
            r'(?m)^replay_dir = "[^"]*"', f'replay_dir = "{replay}"', example_on(tmp_path)
        )
        config.write_text(text)
        return {f.where: f.message for f in check(config) if f.severity == "problem"}

    assert problems(pg_url) == {}  # a database: no directory to check, and it connects
    missing = pg_url.replace("/replay_", "/no_such_db_")
    found = problems(missing.replace("postgres@", "postgres:hunter2@"))
    assert list(found) == ["serve.replay_dir"], found  # named once, under the first role
    assert "no_such_db_" in found["serve.replay_dir"] and "hunter2" not in found["serve.replay_dir"]
    assert not (tmp_path / "var" / "replay").exists()
