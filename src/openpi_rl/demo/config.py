"""The demo's service: an `openpi-rl.toml` for `openpi-rl daemon`, tuned to learn fast.

The service is the real one (server, bridge and learner as child processes of the daemon); only
the settings differ from `systemd/openpi-rl.toml.example`: every port is a free loopback port,
paths live in the demo's work directory, and the learner takes the PPO settings that
`openpi-rl train` uses on this task (`TRAIN_PPO_DEFAULTS`: lr 2e-3, 10 epochs, minibatch 64,
no entropy bonus) on batches about the size of its rollouts (64 segments of up to 16 chunks),
polling the replay every 50 ms so the robots' data is used as soon as it is there.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import socket
from pathlib import Path
from typing import Annotated, Any

from openpi_rl.secret import SECRET
from openpi_rl.service.config import ServiceFile

PENDANT_PORT = 8765  # the bridge's usual port; a free one when it is taken


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it can be bound on loopback now, else a free port the kernel picks."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


@dataclasses.dataclass(frozen=True)
class DemoService:
    """What the demo's robots, operator and table need from a service file."""

    path: Path
    endpoint: str  # the policy server's ZMQ endpoint (robots connect here)
    pendant_url: Annotated[str, SECRET]  # the page, token included (`#token=...`)
    pendant_ws: str  # the operators' WebSocket
    operator_token: Annotated[str | None, SECRET]
    replay_dir: Path
    model: object  # the served model's config (its `normalized_actions` says how to rescale)
    robots: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> DemoService:
        """Read a service file (the demo's or yours: `openpi-rl demo --config FILE`)."""
        service = ServiceFile.load(path)
        serve = service.role_config("serve")
        bridge = service.role_config("bridge")
        host = "127.0.0.1" if bridge.host in ("0.0.0.0", "::", "") else bridge.host
        token = next(iter(bridge.operators.values()), None)
        base = f"http://{host}:{bridge.ws_port}/"
        return cls(
            path=service.path,
            endpoint=serve.serve.endpoint.replace("tcp://*:", "tcp://127.0.0.1:").replace(
                "tcp://0.0.0.0:", "tcp://127.0.0.1:"
            ),
            pendant_url=base + (f"#token={token}" if token else ""),
            pendant_ws=f"ws://{host}:{bridge.ws_port}/pendant",
            operator_token=token,
            replay_dir=Path(serve.replay_dir),
            model=serve.model,
            robots=tuple(bridge.robots),
        )


DEMO_MODEL = """[model]                     # MuJoCo InvertedPendulum-v5: 4 observations, 1 action
kind = "gaussian_mlp"
obs_dim = 4
action_dim = 1"""


def write_demo_config(
    workdir: Path,
    robots: int,
    token: str,
    seed: int = 0,
    pendant_port: int = PENDANT_PORT,
    model: str = DEMO_MODEL,
    extra: str = "",
    ppo: Any = None,
    learn: dict[str, Any] | None = None,
) -> Path:
    """Write `workdir/openpi-rl.toml`: InvertedPendulum-v5's policy (`model`, the [model] table:
    gaussian_mlp, obs 4, action 1), fresh ports, the replay and checkpoints under `workdir`;
    `extra` is appended (tables of its own); `ppo` (a PPOConfig) replaces the learner's PPO
    settings and `learn` the given keys of its table. Returns its path."""
    from openpi_rl.train.train_ppo import TRAIN_PPO_DEFAULTS

    ppo = TRAIN_PPO_DEFAULTS if ppo is None else ppo
    ppo_lines = "\n".join(
        f"{f.name} = {_toml(getattr(ppo, f.name))}"
        for f in dataclasses.fields(ppo)
        if getattr(ppo, f.name) is not None
    )
    workdir.mkdir(parents=True, exist_ok=True)
    port = {
        name: free_port()
        for name in ("endpoint", "publish", "serve_m", "bridge_http", "bridge_m", "learn_m")
    }
    port["pendant"] = free_port(pendant_port)
    names = ", ".join(f'"sim-{i}"' for i in range(robots))
    text = f"""# openpi-rl demo: the real service (openpi-rl daemon), settings for a fast-learning demo.
replay_dir = "{workdir / "replay"}"
checkpoint_dir = "{workdir / "checkpoints"}"
publish_endpoint = "tcp://127.0.0.1:{port["publish"]}"
value_hidden = [64, 64]
seed = {seed}
log_json = true

{model}

[daemon]
metrics_port = 0            # not needed by the demo: any free port
stop_timeout_s = 30.0
nice = {{}}                   # robots run flat out here: the learner needs its share of the CPU

[serve]
metrics_port = {port["serve_m"]}
openpi_ws_port = 0          # any free port

[serve.serve]
endpoint = "tcp://127.0.0.1:{port["endpoint"]}"
max_batch = 8

[bridge]
ws_port = {port["pendant"]}
http_port = {port["bridge_http"]}
metrics_port = {port["bridge_m"]}
robots = [{names}]
verdict_settle_s = 0.1

[bridge.operators]
demo = "{token}"

[learn]
metrics_port = {port["learn_m"]}
segment_length = 16         # chunks per GAE column (long episodes are cut and bootstrapped)
batch_segments = 64         # up to 1,024 chunks per update, about one `openpi-rl train` rollout
min_transitions = 256
max_policy_lag = 2
max_kl = 0.2                # lr 2e-3 moves a small MLP further than a fine-tuned pi0 (~0.06)
settle_s = 0.2              # robots report before their next request: 0.2 s is plenty
poll_interval_s = 0.05
heartbeat_s = 0.5

[learn.ppo]                 # openpi-rl train's settings for this task (TRAIN_PPO_DEFAULTS)
{ppo_lines}
{extra}"""
    head, table = text.split("\n[learn]\n")
    for key, value in (learn or {}).items():
        table, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {_toml(value)}", table, count=1)
        if n == 0:
            table = f"{key} = {_toml(value)}\n" + table
    text = head + "\n[learn]\n" + table
    path = workdir / "openpi-rl.toml"
    path.write_text(text)
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
