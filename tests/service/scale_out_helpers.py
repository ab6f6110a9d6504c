"""A fleet on one machine as it runs on many: `openpi-rl serve` x2 (own endpoints, own robots),
`openpi-rl bridge` and a 2-process `openpi-rl learn` (`jax.distributed` on CPU), all on one
PostgreSQL replay and one checkpoint directory; robots driven through `PolicyClient`.

Each role is a real process with its own TOML file (the same tables `--config FILE` reads in
production), its JSON log in a file; `Fleet.kill()` kills every one still running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from openpi_rl_client import PolicyClient
from tests._net import free_port

MODEL = {"obs_dim": 3, "action_dim": 2, "action_horizon": 2}
HIDDEN = [16, 16]
TARGET = 0.5  # every action dimension's rewarded value: the env reward is -mean |a - 0.5|
OPERATOR_TOKEN = "scale-out-operator-token"

_MODEL_TOML = f"""
value_hidden = {HIDDEN}

[model]
kind = "gaussian_mlp"
obs_dim = {MODEL["obs_dim"]}
action_dim = {MODEL["action_dim"]}
action_horizon = {MODEL["action_horizon"]}
hidden = {HIDDEN}
"""


def serve_toml(url: str, ckpt: Path, endpoint: str, publish: str) -> str:
    return f"""
replay_dir = "{url}"
commit_interval_s = 0.02
metrics_port = {free_port()}
openpi_ws_port = 0
{_MODEL_TOML}
[serve]
endpoint = "{endpoint}"
max_batch = 2

[swap]
learner_endpoint = "{publish}"
checkpoint_dir = "{ckpt}"
restore_in_worker = false   # one JAX process less per server on a 2-core machine
"""


def bridge_toml(url: str, http_port: int) -> str:
    return f"""
replay_dir = "{url}"
ws_port = {free_port()}
http_port = {http_port}
metrics_port = {free_port()}
press_latency_s = 0.1
frame_interval_s = 5.0

[operators]
ana = "{OPERATOR_TOKEN}"
"""


def learn_toml(
    url: str, ckpt: Path, publish: str, servers: list[str], coordinator: str, process_id: int,
    metrics_port: int, updates: int,
) -> str:  # fmt: skip
    return f"""
replay_dir = "{url}"
checkpoint_dir = "{ckpt}"
publish_endpoint = "{publish}"
server_endpoints = {json.dumps(servers)}
metrics_port = {metrics_port}
segment_length = 8
batch_segments = 16
min_transitions = 128   # a full batch (16 columns of 8), as offline
settle_s = 0.0
poll_interval_s = 0.1
heartbeat_s = 0.2
max_kl = 1e9
max_policy_lag = 0   # on-policy: the robots serve faster than this learner trains
max_updates = {updates}
{_MODEL_TOML}
[ppo]
lr = 3e-2
train_iters = 4
minibatch_size = 32
entropy_coef = 0.0
gamma = 0.0   # the reward is the chunk's own (a bandit): 0.9 adds the later chunks' noise

[distributed]
coordinator_address = "{coordinator}"
num_processes = 2
process_id = {process_id}
local_device_count = 2
fsdp_min_size = 0
initialization_timeout_s = 60
heartbeat_timeout_s = 30
"""


class Fleet:
    """The five processes; `start` writes each role's TOML under `root` and starts it."""

    def __init__(self, root: Path, url: str, updates: int):
        self.root, self.url = root, url
        ckpt = root / "ckpt"
        self.ckpt = ckpt
        self.endpoints = {s: f"tcp://127.0.0.1:{free_port()}" for s in ("a", "b")}
        publish = f"tcp://127.0.0.1:{free_port()}"
        coordinator = f"127.0.0.1:{free_port()}"
        self.bridge_http = free_port()
        self.learn_metrics = free_port()
        self.configs = {
            f"serve-{s}": serve_toml(url, ckpt, e, publish) for s, e in self.endpoints.items()
        }
        self.configs["bridge"] = bridge_toml(url, self.bridge_http)
        for pid in (0, 1):
            self.configs[f"learn-{pid}"] = learn_toml(
                url, ckpt, publish, list(self.endpoints.values()), coordinator, pid,
                self.learn_metrics if pid == 0 else free_port(), updates,
            )  # fmt: skip
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENPI_RL_LOG_JSON": "1"}
        env.pop("XLA_FLAGS", None)  # the learner makes its devices ([distributed])
        env.pop("OPENPI_RL_ADMIN_TOKEN", None)
        for name, text in self.configs.items():
            path = self.root / f"{name}.toml"
            path.write_text(text)
            role = name.split("-")[0]
            cmd = [sys.executable, "-m", "openpi_rl.cli", role, "--config", str(path)]
            with open(self.root / f"{name}.log", "w") as log:  # the child keeps its own fd
                self.procs[name] = subprocess.Popen(
                    cmd, env=env, stdout=subprocess.DEVNULL, stderr=log
                )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def events(self, name: str, event: str) -> list[dict]:
        out = []
        for line in self.log(name).splitlines():
            if line.startswith("{"):
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("event") == event:
                    out.append(e)
        return out

    def tails(self, n: int = 1500) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)[-n:]}" for name in self.procs)

    def stacks(self, n: int = 6000) -> str:
        """The learner processes' Python stacks (SIGUSR1: `openpi-rl`'s faulthandler dumps every
        thread to stderr) and every log's tail: what a hang shows."""
        for name in ("learn-0", "learn-1"):
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        return self.tails(n)

    def check_running(self, *names: str) -> None:
        """Fail at once, with the logs, when one of these processes has exited."""
        for name in names or self.procs:
            rc = self.procs[name].poll()
            assert rc is None, f"{name} exited {rc}:\n{self.tails()}"

    def until(self, cond: Callable[[], object], timeout_s: float) -> float:
        """`wait_for(cond)` that fails at once, with the logs, when a process has exited."""

        def polled() -> object:
            self.check_running()
            return cond()

        return wait_for(polled, timeout_s, self.tails)

    def wait_exit(self, name: str, timeout_s: float) -> int:
        return self.procs[name].wait(timeout_s)

    def terminate(self, name: str, timeout_s: float = 30) -> int:
        self.procs[name].terminate()
        return self.procs[name].wait(timeout_s)

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)

    def learner_metric(self, line_start: str) -> float | None:
        """A sample from process 0's /metrics; None when absent or not answering."""
        try:
            url = f"http://127.0.0.1:{self.learn_metrics}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(line_start):
                        return float(line.rsplit(" ", 1)[1])
        except (OSError, urllib.error.URLError):
            return None
        return None

    def feedback(self, event: dict) -> dict:
        """POST /feedback to the bridge as operator ana; the ack (sent once committed)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.bridge_http}/feedback",
            json.dumps(event).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {OPERATOR_TOKEN}"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def bridge_up(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.bridge_http}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False


def health(endpoint: str) -> dict | None:
    """The server's health reply; None while it does not answer."""
    try:
        with PolicyClient(endpoint, robot_id="ops", timeout_s=1.0, retries=0) as client:
            return client.health()
    except Exception:  # not listening yet, or still starting
        return None


class Robots:
    """Robots on one server, each in a thread at about `hz`: episodes of `steps` chunks, the
    env reward -mean |a - TARGET| reported per chunk. Every reply is recorded as
    (transition id, policy version), and every failure."""

    def __init__(self, endpoint: str, names: list[str], steps: int = 8, hz: float = 40.0):
        self.served: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._run, args=(endpoint, n, k, steps, hz), name=f"robot-{n}", daemon=True
            )
            for k, n in enumerate(names)
        ]
        for t in self._threads:
            t.start()

    def _run(self, endpoint: str, name: str, seed: int, steps: int, hz: float) -> None:
        rng = np.random.default_rng(seed)
        episode = 0
        with PolicyClient(endpoint, robot_id=name, timeout_s=10.0, retries=0) as client:
            while not self._stop.is_set():
                try:
                    for t in range(steps):
                        obs = {"state": rng.standard_normal(MODEL["obs_dim"]).astype(np.float32)}
                        out = client.infer(obs, episode_id=f"{name}-{episode}")
                        self.served[name].append((out.transition_id, out.policy_version))
                        reward = -float(np.abs(out.actions - TARGET).mean())
                        client.report(out.transition_id, reward, done=t == steps - 1)
                        time.sleep(1.0 / hz)
                except Exception as e:  # counted: the test expects none
                    self.failures.append(f"{name}: {e!r}")
                episode += 1

    def ids(self, name: str | None = None) -> list[int]:
        names = [name] if name else list(self.served)
        return [tid for n in names for tid, _ in list(self.served[n])]

    def newest(self) -> int:
        """The version every robot has been served by now (the least of their latest)."""
        return min((v[-1][1] for v in self.served.values() if v), default=-1)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def wait_for(
    cond: Callable[[], object], timeout_s: float, what: Callable[[], str] = lambda: ""
) -> float:
    """Poll until cond() holds; the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out after {timeout_s} s: {what()}"
        time.sleep(0.05)
    return time.monotonic() - t0
