"""Four simulated robots at 50 Hz against `openpi-rl serve` for 60 s; then a graceful stop.

The server is the real service process (`openpi-rl serve --config FILE`, pi0_fast dummy with two
224x224 cameras, replay logging on). Each robot runs a 50 Hz control loop as a robot does with
openpi-rl: an `ActionChunkBroker` plays the 10-step chunks tick by tick and asks for the next one
(two-camera observation, ~301 KB) in the background while `inference_delay` steps remain; a
second `PolicyClient` reports each chunk's reward once it was played, ending an episode every
500 ticks. After SIGTERM (the server flushes its replay and exits 0) the stored transitions are
counted: every reply must be a stored row, and no request may fail.

    python benchmarks/robots_50hz.py               # 60 s
    python benchmarks/robots_50hz.py --quick       # smoke run: 3 s
    python benchmarks/robots_50hz.py --every-tick  # a request every tick (no chunking)

Last line: {"replies", "stored", "errors", ...}; late_ticks counts control ticks whose action
came more than 2 ms after the tick's deadline.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.replay import ReplayReader
from openpi_rl_client import ActionChunkBroker, PolicyClient

CONFIG = """
replay_dir = "{replay}"
metrics_port = 0
openpi_ws_port = 0

[serve]
endpoint = "tcp://127.0.0.1:{port}"
max_batch = {robots}

[model]
kind = "pi0_fast"
variant = "dummy"
state_dim = 32
image_keys = ["image_0", "image_1"]
image_size = 224
"""


@dataclasses.dataclass
class Args:
    seconds: float = 60.0
    robots: int = 4
    hz: float = 50.0
    episode_ticks: int = 500  # an episode ends (done=True) every this many ticks
    inference_delay: int = 4  # ask for the next chunk when this many steps remain (80 ms)
    every_tick: bool = False  # ask for a chunk every tick instead (no broker)
    quick: bool = False  # smoke run: 3 s
    verbose: bool = False  # print replies slower than 100 ms


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _robot(endpoint: str, name: str, args: Args, start: float, out: dict) -> None:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)]
    period = 1.0 / args.hz
    stats = {"ms": [], "late": 0, "errors": [], "replies": 0, "ticks": 0, "stalls": 0}
    episode = [0]

    with (
        PolicyClient(endpoint, robot_id=name, timeout_s=2.0) as client,
        PolicyClient(endpoint, robot_id=name, timeout_s=2.0) as reporter,
    ):

        def infer(obs: dict):
            t = time.perf_counter()
            result = client.infer(obs, episode_id=f"{name}-ep{episode[0]}", prompt="pick cube")
            stats["ms"].append((time.perf_counter() - t) * 1e3)
            if args.verbose and stats["ms"][-1] > 100:
                print(
                    f"{name}: slow reply {stats['ms'][-1]:.0f} ms at {time.monotonic() - start:.2f} s",
                    file=sys.stderr,
                )
            stats["replies"] += 1
            return result

        def report(result, reward: float, done: bool) -> None:
            try:
                reporter.report(result.transition_id, reward=reward, done=done)
            except Exception as e:  # counted and named in the output
                stats["errors"].append(repr(e))

        broker = None if args.every_tick else ActionChunkBroker(infer, args.inference_delay)
        playing, reward = None, 0.0
        tick, deadline = 0, start
        while deadline < start + args.seconds:
            obs = {
                "image_0": images[0],
                "image_1": images[1],
                "state": rng.standard_normal(32).astype(np.float32),
            }
            try:
                if broker is None:
                    result = infer(obs)
                    action = result.actions[0]
                else:
                    action = broker.step(obs)
                    result = broker.current
            except Exception as e:
                stats["errors"].append(repr(e))
                result, action = playing, np.zeros(7, np.float32)
            now = time.monotonic()
            if now > deadline + period + 0.002:
                stats["late"] += 1  # this tick's action came > 2 ms after its deadline
                deadline = now - period  # a robot's loop re-anchors rather than catching up
            if result is not playing and playing is not None:
                report(playing, reward, done=False)
                reward = 0.0
            playing = result
            reward += float(-np.abs(action).mean())
            tick += 1
            if tick % args.episode_ticks == 0 and playing is not None:
                report(playing, reward, done=True)
                playing, reward = None, 0.0
                episode[0] += 1
                if broker is not None:
                    broker.reset()
            deadline += period
            time.sleep(max(0.0, deadline - time.monotonic()))
        if broker is not None:
            stats["stalls"] = broker.stalls
            broker.close()
    stats["ticks"] = tick
    out[name] = stats


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, seconds=3.0)
    tmp = Path(tempfile.mkdtemp(prefix="robots-50hz-"))
    port = _free_port()
    config = tmp / "serve.toml"
    config.write_text(CONFIG.format(replay=tmp / "replay", port=port, robots=args.robots))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "openpi_rl.cli", "serve", "--config", str(config)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"tcp://127.0.0.1:{port}"
    try:
        with PolicyClient(endpoint, robot_id="probe", timeout_s=2.0, retries=60) as probe:
            while probe.health()["status"] != "ready":
                time.sleep(0.2)
        print(
            f"server ready; {args.robots} robots at {args.hz:g} Hz for {args.seconds:g} s",
            file=sys.stderr,
        )
        out: dict = {}
        start = time.monotonic() + 0.1
        threads = [
            threading.Thread(target=_robot, args=(endpoint, f"robot{i}", args, start, out))
            for i in range(args.robots)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
    finally:
        server.kill()
    stored = ReplayReader(str(tmp / "replay")).count()
    ms = np.concatenate([np.asarray(o["ms"]) for o in out.values()])
    errors = [e for o in out.values() for e in o["errors"]]
    for e in errors[:5]:
        print(f"error: {e}", file=sys.stderr)
    replies = sum(o["replies"] for o in out.values())
    print(
        f"server exit code {exit_code}; ticks {sum(o['ticks'] for o in out.values())}",
        file=sys.stderr,
    )
    return {
        "replies": replies,
        "stored": stored,
        "errors": len(errors) + (exit_code != 0),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "late_ticks": sum(o["late"] for o in out.values()),
        "stalls": sum(o["stalls"] for o in out.values()),
        "ticks": sum(o["ticks"] for o in out.values()),
    }


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
