"""Secrets are never printed: `--help` of every subcommand (tyro prints defaults, and the
defaults are the config file's values), config errors and `openpi-rl check` show a secret field
as `***`. The secrets sit in a real service file and the environment; the commands run as real
processes, as an operator types them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from openpi_rl.secret import MASK, is_secret, mask_url, masked, redact, unmask
from tests.deploy.daemon_process import PORTS, service_config

API_KEY = "api-key-9f8e7d6c5b"
ADMIN = "admin-token-1a2b3c4d"
OPERATOR = "operator-token-5e6f7a8b"
QUERY = "query-token-0c1d2e3f"
SECRETS = (API_KEY, ADMIN, OPERATOR, QUERY)


def secret_file(tmp_path: Path) -> Path:
    text = service_config(tmp_path, dict.fromkeys(PORTS, 0))
    text = text.replace("[serve]\n", f'[serve]\nopenpi_api_key = "{API_KEY}"\n')
    text = text.replace(
        "[serve.serve]\n", f'[serve.swap]\nadmin_token = "{ADMIN}"\n\n[serve.serve]\n'
    )
    text = text.replace('ana = "a-test-token"', f'ana = "{OPERATOR}"')
    text = text.replace("[bridge]\n", f'[bridge]\nquery_token = "{QUERY}"\n')
    path = tmp_path / "openpi-rl.toml"
    path.write_text(text)
    return path


def openpi_rl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENPI_RL_ADMIN_TOKEN": ADMIN}
    return subprocess.run(
        [sys.executable, "-m", "openpi_rl.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.mark.parametrize("role", ["serve", "bridge"])
def test_help_of_a_role_shows_the_config_files_secrets_masked(tmp_path, role):
    path = secret_file(tmp_path)
    out = openpi_rl(role, "--config", str(path), "--section", role, "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "metrics-port" in text  # it is the help
    assert not [s for s in SECRETS if s in text], text
    assert MASK in text  # the secret field is there, masked


def test_help_of_every_other_subcommand_shows_no_secret(tmp_path):
    path = secret_file(tmp_path)
    for args in (
        ("learn", "--config", str(path), "--section", "learn", "--help"),
        ("daemon", "--help"),
        ("check", "--help"),
        ("admin", "--help"),
        ("train", "--reward-url", f"ws://127.0.0.1:1/query?token={QUERY}", "--help"),
        ("demo", "--help"),
        ("--help",),
    ):
        out = openpi_rl(*args)
        text = out.stdout + out.stderr
        assert not [s for s in SECRETS if s in text], (args, text)


def test_a_config_error_in_a_secret_field_names_the_key_not_the_value(tmp_path):
    path = secret_file(tmp_path)
    text = path.read_text()
    path.write_text(text.replace(f'ana = "{OPERATOR}"', "ana = 8675309123"))
    out = openpi_rl("bridge", "--config", str(path), "--section", "bridge")
    assert out.returncode == 78
    assert "bridge.operators.ana: expected str, got int ***" in out.stderr
    assert "8675309123" not in out.stderr

    path.write_text(text.replace(f'openpi_api_key = "{API_KEY}"', "openpi_api_key = 4815162342"))
    out = openpi_rl("check", "--config", str(path))
    assert "serve.openpi_api_key" in out.stdout, out.stdout
    assert "4815162342" not in out.stdout + out.stderr


def test_masked_reads_the_marker_on_nested_fields_and_flags_still_win():
    from openpi_rl.policy_server.serve import ServeConfig
    from openpi_rl.policy_server.swapper import SwapOptions
    from openpi_rl.reward_bridge import BridgeConfig

    serve = ServeConfig(openpi_api_key=API_KEY, swap=SwapOptions(admin_token=ADMIN))
    shown = masked(serve)
    assert shown.openpi_api_key == MASK and shown.swap.admin_token == MASK
    assert shown.model == serve.model and shown.seed == serve.seed
    assert API_KEY not in repr(shown) and ADMIN not in repr(shown)
    assert unmask(shown, serve) == serve

    bridge = BridgeConfig(operators={"ana": OPERATOR, "bo": "x" * 12}, query_token=QUERY)
    assert masked(bridge).operators == {"ana": MASK, "bo": MASK}  # names stay: not secrets
    given = dataclasses.replace(masked(bridge), query_token="from-a-flag")
    assert unmask(given, bridge) == dataclasses.replace(bridge, query_token="from-a-flag")
    assert redact(f"bad token {OPERATOR}!", bridge) == "bad token ***!"


def test_urls_keep_where_they_point_and_lose_their_credentials():
    assert mask_url("postgresql://ana:pw@db:5432/replay") == "postgresql://ana:***@db:5432/replay"
    assert mask_url("ws://h:1/query?token=abc&x=1") == "ws://h:1/query?token=***&x=1"
    assert mask_url("http://h:1/#token=abc") == "http://h:1/#***"
    assert mask_url("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5557"


def test_every_field_named_like_a_secret_carries_the_marker():
    """A new token field without the marker would print in --help: caught here."""
    from openpi_rl.daemon.learner import LearnerConfig
    from openpi_rl.demo import DemoConfig
    from openpi_rl.demo.config import DemoService
    from openpi_rl.policy_server.serve import ServeConfig
    from openpi_rl.reward_bridge import BridgeConfig
    from openpi_rl.service.config import DaemonConfig
    from openpi_rl.train.train_ppo import PPOTrainConfig

    words = ("token", "api_key", "password", "secret", "operators", "_url")

    # a path to a key file is not the key (the file is kept 0600, and its path helps an operator)
    def is_path(name: str) -> bool:
        return name.endswith("_key_file")  # curve_secret_key_file, publish_curve_secret_key_file

    unmarked = []

    def walk(cls: type, where: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if any(w in f.name for w in words) and not is_path(f.name) and not is_secret(hint):
                unmarked.append(f"{where}{f.name}")
            bare = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if dataclasses.is_dataclass(bare):
                walk(bare, f"{where}{f.name}.")

    for cls in (
        ServeConfig,
        BridgeConfig,
        LearnerConfig,
        DaemonConfig,
        PPOTrainConfig,
        DemoConfig,
        DemoService,
    ):
        walk(cls, f"{cls.__name__}.")
    assert unmarked == []


def test_a_reward_provider_names_its_url_without_the_query_token():
    """The trainer's `reward_url` carries the bridge's `?token=`: errors and logs show the URL
    without it (here: a real connection refused by a closed loopback port)."""
    import numpy as np

    from openpi_rl.rl.reward import RewardError
    from openpi_rl.rl.reward_human import HumanRewardHTTP
    from tests.deploy.daemon_process import free_port

    provider = HumanRewardHTTP(f"http://127.0.0.1:{free_port()}/query?token={QUERY}", timeout_s=2)
    with pytest.raises(RewardError) as e:
        provider.get({"state": np.zeros(2, np.float32)}, np.zeros((1, 1), np.float32))
    assert "/query?token=***" in str(e.value) and QUERY not in str(e.value)
    assert QUERY not in repr(provider)
