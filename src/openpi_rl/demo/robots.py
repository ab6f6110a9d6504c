"""Simulated robots: MuJoCo environments that ask the policy server for every action chunk.

Each robot is a thread with its own `PolicyClient`, as each real robot has its own process:
infer (observation -> chunk) -> play the chunk in its environment (the trainer's `EnvBatch`
with one env: the same chunk playing and action rescaling as `openpi-rl train`) -> report the
chunk's summed reward, `done` when the pole fell, `truncated` at the time limit. A new episode
gets a new episode id. Without `hz` a robot asks again as soon as it has reported (as fast as
the server answers); with it, one chunk per tick.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

import numpy as np
import structlog

from openpi_rl.train.envs import EnvBatch
from openpi_rl_client import PolicyClient

log = structlog.get_logger("openpi_rl.demo")


@dataclasses.dataclass(frozen=True)
class Episode:
    """A finished episode, as its robot saw it."""

    robot_id: str
    episode_id: str
    ret: float  # sum of the environment's rewards
    length: int  # environment steps
    version: int  # policy version that served its first chunk
    last_version: int  # ... and its last
    terminated: bool  # the pole fell (else: time limit)
    t_end: float  # time.monotonic()
    fleet_steps: int  # the fleet's environment steps when it ended


class Fleet:
    """What the robots share with the table, the operator and the result: episodes, latencies,
    versions, counters. Thread-safe. `max_env_steps`: the robots stop once the fleet has taken
    this many environment steps."""

    def __init__(self, max_env_steps: int | None = None, keep_latencies: int = 2000):
        self.max_env_steps = max_env_steps
        self.episodes: list[Episode] = []
        self.latencies_ms: deque[float] = deque(maxlen=keep_latencies)
        self.env_steps = 0
        self.replies = 0
        self.reports = 0
        self.live_version = 0  # newest version in a reply
        self.max_version = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Episode], None]] = []

    def on_episode(self, fn: Callable[[Episode], None]) -> None:
        self._listeners.append(fn)

    def served(self, latency_ms: float, version: int) -> None:
        with self._lock:
            self.latencies_ms.append(latency_ms)
            self.replies += 1
            self.live_version = version
            self.max_version = max(self.max_version, version)

    def stepped(self, n: int) -> None:
        with self._lock:
            self.env_steps += n
            self.reports += 1
            if self.max_env_steps is not None and self.env_steps >= self.max_env_steps:
                self.stop.set()

    def finished(self, **fields) -> Episode:
        with self._lock:
            ep = Episode(**fields, t_end=time.monotonic(), fleet_steps=self.env_steps)
            self.episodes.append(ep)
        for fn in self._listeners:
            fn(ep)
        return ep

    def error(self, robot_id: str, e: Exception) -> None:
        with self._lock:
            self.errors.append(f"{robot_id}: {e!r:.200}")

    def p99_ms(self) -> float:
        with self._lock:
            lat = list(self.latencies_ms)
        return float(np.percentile(lat, 99)) if lat else float("nan")

    def snapshot(self) -> list[Episode]:
        with self._lock:
            return list(self.episodes)


def mean_return(episodes: list[Episode]) -> float:
    return float(np.mean([e.ret for e in episodes])) if episodes else float("nan")


def first_version_return(episodes: list[Episode]) -> float:
    """Mean return of the episodes the first version (0, or the first one served) started."""
    if not episodes:
        return float("nan")
    first = min(e.version for e in episodes)
    return mean_return([e for e in episodes if e.version == first])


class SimRobot(threading.Thread):
    """One robot: `SimRobot(...).start()`; it runs until `fleet.stop` is set."""

    def __init__(
        self,
        endpoint: str,
        robot_id: str,
        fleet: Fleet,
        env_id: str = "InvertedPendulum-v5",
        seed: int = 0,
        rescale: bool = False,
        hz: float | None = None,
        timeout_s: float = 5.0,
        prompt: str | None = None,
    ):
        super().__init__(name=f"robot-{robot_id}", daemon=True)
        self.endpoint, self.robot_id, self.fleet = endpoint, robot_id, fleet
        self.env_id, self.seed, self.rescale, self.hz = env_id, seed, rescale, hz
        self.timeout_s, self.prompt = timeout_s, prompt

    def run(self) -> None:
        env = EnvBatch(self.env_id, 1, self.seed)
        fleet = self.fleet
        period = 1.0 / self.hz if self.hz else 0.0
        next_tick = time.monotonic()
        episode = f"{self.robot_id}-{uuid.uuid4().hex[:12]}"
        first_version: int | None = None
        try:
            with PolicyClient(self.endpoint, self.robot_id, timeout_s=self.timeout_s) as client:
                while not fleet.stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        obs = {"state": env.obs[0]}
                        out = client.infer(obs, episode_id=episode, prompt=self.prompt)
                    except Exception as e:  # counted and shown; the robot asks again
                        fleet.error(self.robot_id, e)
                        fleet.stop.wait(0.5)
                        continue
                    fleet.served((time.perf_counter() - t0) * 1e3, out.policy_version)
                    if first_version is None:
                        first_version = out.policy_version
                    step, n = env.step(out.actions[None], rescale=self.rescale)
                    term, trunc = bool(step.terminated[0]), bool(step.truncated[0])
                    try:
                        client.report(
                            out.transition_id, reward=float(step.rewards[0]), done=term,
                            truncated=trunc,
                        )  # fmt: skip
                    except Exception as e:
                        fleet.error(self.robot_id, e)
                    fleet.stepped(n)
                    if step.finished:
                        _, ret, length = step.finished[0]
                        fleet.finished(
                            robot_id=self.robot_id, episode_id=episode, ret=ret, length=length,
                            version=first_version, last_version=out.policy_version,
                            terminated=term,
                        )  # fmt: skip
                        episode = f"{self.robot_id}-{uuid.uuid4().hex[:12]}"
                        first_version = None
                    if period:
                        next_tick = max(next_tick + period, time.monotonic())
                        fleet.stop.wait(max(0.0, next_tick - time.monotonic()))
        finally:
            env.close()


def start_robots(
    endpoint: str,
    n: int,
    fleet: Fleet,
    env_id: str,
    seed: int,
    rescale: bool,
    hz: float | None = None,
    names: tuple[str, ...] = (),
    prompt: str | None = None,
) -> list[SimRobot]:
    names = tuple(names[:n]) + tuple(f"sim-{i}" for i in range(len(names), n))
    robots = [
        SimRobot(endpoint, name, fleet, env_id, seed + 1000 * i, rescale, hz, prompt=prompt)
        for i, name in enumerate(names)
    ]
    for r in robots:
        r.start()
    log.info("demo.robots", robots=list(names), endpoint=endpoint, hz=hz)
    return robots
