"""`openpi-rl check --config FILE` names every problem of a configuration and of the machine at
once (busy port, unwritable directory, model that does not build, unknown key, roles that
disagree) with a non-zero exit status, and passes the shipped example."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from openpi_rl.daemon.check import check_main

EXAMPLE = Path(__file__).parents[2] / "systemd" / "openpi-rl.toml.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
