"""The whole loop on loopback: a real policy server (ROUTER loop, replay writer, swapper, admin)
and a real learner on the same replay directory and checkpoint directory, robots on real
sockets. The learner runs in this process (driven by `step()` or `run()` in a thread) or as an
`openpi-rl learn` process for kill tests."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from openpi_rl.daemon import Learner, LearnerConfig
from openpi_rl.models import GaussianMLPConfig
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.policy_server.admin import AdminEndpoint, admin_request
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.policy_server.swapper import SwapOptions, Swapper
from openpi_rl.replay import ReplayConfig
from openpi_rl.rl import PPOConfig
from openpi_rl_client import PolicyClient
from tests._net import free_port

MODEL = GaussianMLPConfig(obs_dim=3, action_dim=2, action_horizon=2, hidden=(16, 16))
VALUE_HIDDEN = (16, 16)
TOKEN = "service-test-token"


def learner_config(root: Path, publish_port: int, server_port: int, **overrides) -> LearnerConfig:
    base = LearnerConfig(
        model=MODEL,
        value_hidden=VALUE_HIDDEN,
        replay_dir=str(root / "replay"),
        checkpoint_dir=str(root / "ckpt"),
        ppo=PPOConfig(lr=1e-3, train_iters=2, minibatch_size=16, bc_coef=1.0),
        segment_length=8,
        batch_segments=8,
        min_transitions=16,
        settle_s=0.0,
        max_kl=None,
        poll_interval_s=0.1,
        publish_endpoint=f"tcp://127.0.0.1:{publish_port}",
        heartbeat_s=0.2,
        server_endpoints=(f"tcp://127.0.0.1:{server_port}",),
        metrics_port=None,
    )
    return dataclasses.replace(base, **overrides)


class ServerRig:
    """The policy server with its swapper and admin endpoint, following `publish_port`."""

    def __init__(self, root: Path, publish_port: int, server_port: int | None = None, **swap):
        self.port = server_port or free_port()
        ac = build_actor_critic(MODEL, VALUE_HIDDEN, 0)  # the learner's version 0
        self.server = PolicyServer(
            ac,
            ServeOptions(endpoint=f"tcp://127.0.0.1:{self.port}", max_batch=4),
            ReplayConfig(path=str(root / "replay"), commit_interval_s=0.02),
        )
        options = SwapOptions(
            learner_endpoint=f"tcp://127.0.0.1:{publish_port}",
            checkpoint_dir=str(root / "ckpt"),
            **swap,
        )
        self.swapper = Swapper(self.server, options)
        self.admin = AdminEndpoint(self.swapper, "tcp://127.0.0.1:*", TOKEN)
        self.thread = threading.Thread(target=self.server.run, name="server", daemon=True)
        self.thread.start()
        assert self.server.wait_ready(60)
        self.swapper.start()
        self.admin.start()
        self.endpoint = self.server.endpoint

    @property
    def live(self) -> int:
        return self.server.snapshot.version

    def wait_live(self, version: int, timeout_s: float = 20.0) -> None:
        wait_for(lambda: self.live >= version, timeout_s, lambda: f"live {self.live}")

    def admin_call(self, command: str, version: int | None = None) -> dict:
        return admin_request(self.admin.endpoint, TOKEN, command, version)

    def metric(self, name: str, labels: dict | None = None) -> float | None:
        return self.server.metrics.registry.get_sample_value(name, labels or {})

    def close(self) -> None:
        self.admin.close()
        self.swapper.close()
        self.server.close(wait_s=30)
        self.thread.join(30)


def wait_for(
    cond: Callable[[], bool], timeout_s: float, what: Callable[[], str] = lambda: ""
) -> float:
    """Poll until cond() holds; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out after {timeout_s} s: {what()}"
        time.sleep(0.02)
    return time.monotonic() - t0


def play(
    client: PolicyClient,
    episode: str,
    steps: int,
    rng: np.random.Generator,
    reward: Callable[[np.ndarray], float] = lambda a: 0.0,
    executed: np.ndarray | None = None,
) -> list[int]:
    """One episode through the server: infer, then report (a take-over when `executed` is
    given). Returns the served versions."""
    versions = []
    for t in range(steps):
        out = client.infer({"state": rng.standard_normal(3).astype(np.float32)}, episode_id=episode)
        versions.append(out.policy_version)
        client.report(
            out.transition_id, reward(out.actions), done=t == steps - 1,
            executed_actions=executed, intervened=executed is not None,
        )  # fmt: skip
    return versions


class Robots:
    """Robots in threads at about `hz`, episodes of `steps` chunks, recording each reply's
    version and every failure."""

    def __init__(self, endpoint: str, n: int = 2, steps: int = 8, hz: float = 100.0, reward=None):
        self.versions: dict[str, list[int]] = {f"r{i}": [] for i in range(n)}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._reward = reward or (lambda a: -float(np.abs(a - 0.5).mean()))
        self._threads = [
            threading.Thread(target=self._run, args=(endpoint, name, steps, hz), daemon=True)
            for name in self.versions
        ]
        for t in self._threads:
            t.start()

    def _run(self, endpoint: str, name: str, steps: int, hz: float) -> None:
        rng = np.random.default_rng(int(name[1:]))
        episode = 0
        with PolicyClient(endpoint, robot_id=name, timeout_s=5.0, retries=0) as client:
            while not self._stop.is_set():
                try:
                    for t in range(steps):
                        obs = {"state": rng.standard_normal(3).astype(np.float32)}
                        out = client.infer(obs, episode_id=f"{name}-{episode}")
                        self.versions[name].append(out.policy_version)
                        client.report(
                            out.transition_id, self._reward(out.actions), done=t == steps - 1
                        )
                        time.sleep(1.0 / hz)
                except Exception as e:  # counted: the tests expect none
                    self.failures.append(repr(e))
                episode += 1

    def requests(self) -> int:
        return sum(len(v) for v in self.versions.values())

    def newest(self) -> int:
        return min((v[-1] for v in self.versions.values() if v), default=-1)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def assert_monotone(self) -> None:
        for name, seen in self.versions.items():
            assert seen == sorted(seen), f"{name} was served an older version after a newer one"


def start_learner_thread(config: LearnerConfig) -> tuple[Learner, threading.Thread]:
    learner = Learner(config)
    thread = threading.Thread(target=learner.run, name="learner", daemon=True)
    thread.start()
    return learner, thread
