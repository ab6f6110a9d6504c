"""Hot-swap under load: robots at 50 Hz while the learner publishes versions (guarantee 3).

The policy server runs as its own process (`openpi-rl serve`, replay logging on), exactly as
deployed. A learner stand-in process writes `versions` real orbax versions (the learner's
`VersionCheckpoints`, weights perturbed per version) before the run, then announces them on
the learner's ZMQ PUB socket (`Publisher`, heartbeats included) at `publish_hz`, so what is
measured is the swap itself, not PPO's CPU use. This process plays `robots` robots, each
sending an observation every 1/`hz` s (infer, then report) with a 1 s timeout.

Quiet and swapping windows alternate in the same run (`block` versions published, then as
long without notices), so both see the same background load of a shared machine: the p99
round-trip latency of requests sent while a block is published (and one notice period after,
while its last swap lands) over the p99 of the quiet windows is the figure (goal <= 2), with
the requests that failed (error or timeout) or came back later than `late_ms`. The run ends
once every robot has been served the last version. The server's own counters (swaps,
compilations) are read from its /metrics; the seconds of each swap's phases (restore, place
on the device, check call) from its `swap` log lines.

    python benchmarks/hot_swap.py            # 4 robots x 50 Hz, 100 versions
    python benchmarks/hot_swap.py --quick    # 10 versions, short baseline
    python benchmarks/hot_swap.py --no-restore-in-worker   # orbax restores in the server
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import tyro
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl_client import PolicyClient

OBS_DIM, ACTION_DIM, HORIZON, HIDDEN = 32, 7, 10, (256, 256)


@dataclasses.dataclass
class Args:
    robots: int = 4
    hz: float = 50.0  # requests per second per robot
    versions: int = 100  # versions the learner publishes
    publish_hz: float = 5.0  # notices per second
    block: int = 10  # versions per swapping window; a quiet window as long follows each
    late_ms: float = 20.0  # a reply later than this counts as late
    max_batch: int = 8
    quick: bool = False  # 10 versions in blocks of 5
    restore_in_worker: bool = True  # the server's swap.restore_in_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_toml() -> str:
    return (
        f'[model]\nkind = "gaussian_mlp"\nobs_dim = {OBS_DIM}\naction_dim = {ACTION_DIM}\n'
        f"action_horizon = {HORIZON}\nhidden = {list(HIDDEN)}\n"
    )


def learner_stand_in(
    endpoint: str, ckpt: str, versions: int, hz: float, block: int, ready, go, windows
) -> None:
    """Write every version to disk, then announce them at `hz` in blocks of `block`, each
    followed by as long a pause; the (start, end) of each block goes to `windows`."""
    import jax
    from flax import nnx

    from openpi_rl.models import GaussianMLPConfig
    from openpi_rl.models.choice import build_actor_critic
    from openpi_rl.weights import Publisher, VersionCheckpoints

    config = GaussianMLPConfig(
        obs_dim=OBS_DIM, action_dim=ACTION_DIM, action_horizon=HORIZON, hidden=HIDDEN
    )
    state = nnx.state(build_actor_critic(config, (64, 64), 0))
    # Saved aside and moved into the server's checkpoint_dir when published: a server that
    # starts after the stand-in wrote its versions would otherwise start from the newest one.
    staging = Path(ckpt).parent / "staging"
    checkpoints = VersionCheckpoints(staging, max_to_keep=None)
    Path(ckpt).mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(1, versions + 1):
        noise = np.random.default_rng(v)
        noisy = jax.tree.map(
            lambda x, n=noise: x + 0.01 * n.standard_normal(x.shape, np.float32), state
        )
        paths.append(str(checkpoints.save(v, noisy, {"step": np.zeros(())}, {})))
    checkpoints.close()
    publisher = Publisher(endpoint, heartbeat_s=0.5)
    ready.set()
    go.wait()
    time.sleep(block / hz)  # a quiet window first
    for start in range(0, versions, block):
        t0 = time.monotonic()
        for v in range(start + 1, min(start + block, versions) + 1):
            os.rename(paths[v - 1], Path(ckpt) / str(v))  # complete, with its manifest
            publisher.publish(v)
            time.sleep(1.0 / hz)
        windows.put((t0, time.monotonic()))
        time.sleep(block / hz)
    time.sleep(5.0)  # keep beating until the robots have seen the last version
    publisher.close()


def start_server(
    root: Path, args: Args, learner_endpoint: str
) -> tuple[subprocess.Popen, str, int]:
    port, metrics_port = _free_port(), _free_port()
    config = root / "serve.toml"
    config.write_text(
        f'replay_dir = "{root / "replay"}"\nmetrics_port = {metrics_port}\nopenpi_ws_port = 0\n\n'
        f'[serve]\nendpoint = "tcp://127.0.0.1:{port}"\nmax_batch = {args.max_batch}\n\n'
        f'[swap]\nlearner_endpoint = "{learner_endpoint}"\n'
        f'checkpoint_dir = "{root / "ckpt"}"\n'
        f"restore_in_worker = {str(args.restore_in_worker).lower()}\n\n" + _model_toml()
    )
    with open(root / "serve.log", "wb") as log:  # JSON lines: the swaps' phases
        proc = subprocess.Popen(
            [sys.executable, "-m", "openpi_rl.cli", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "OPENPI_RL_LOG_JSON": "1"},
        )
    endpoint = f"tcp://127.0.0.1:{port}"
    with PolicyClient(endpoint, robot_id="bench", timeout_s=2.0, retries=60) as client:
        while client.health()["status"] != "ready":
            time.sleep(0.1)
    return proc, endpoint, metrics_port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels or s.name.endswith("_sum") or s.name.endswith("_count")
    }


class Robot(threading.Thread):
    """One robot at `hz`: infer then report, on a fixed schedule; records each infer's
    (start time, round-trip seconds or None when it failed, version, server's queue_ms + infer_ms)."""

    def __init__(self, endpoint: str, name: str, hz: float, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.endpoint, self.hz, self._stop_event = endpoint, hz, stop
        self.samples: list[tuple[float, float | None, int, float]] = []

    def run(self) -> None:
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        period, t_next = 1.0 / self.hz, time.monotonic()
        with PolicyClient(self.endpoint, robot_id=self.name, timeout_s=1.0, retries=0) as client:
            step = 0
            while not self._stop_event.is_set():
                obs = {"state": rng.standard_normal(OBS_DIM).astype(np.float32)}
                t0 = time.monotonic()
                try:
                    out = client.infer(obs)
                    timing = out.server_timing
                    server_ms = timing.get("queue_ms", 0.0) + timing.get("infer_ms", 0.0)
                    self.samples.append((t0, time.monotonic() - t0, out.policy_version, server_ms))
                    step += 1
                    client.report(out.transition_id, reward=0.0, done=step % 50 == 0)
                except Exception:
                    self.samples.append((t0, None, -1, 0.0))
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))


def swap_phases_ms(log: Path) -> dict[str, dict[str, float]]:
    """Mean and max milliseconds of each phase over the server's `swap` log lines."""
    phases: dict[str, list[float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "swap":
            for key, value in event.items():
                if key.endswith("_s") and key != "seconds":
                    phases.setdefault(key.removesuffix("_s"), []).append(value * 1e3)
    return {
        k: {"mean": round(float(np.mean(v)), 3), "max": round(float(np.max(v)), 3)}
        for k, v in phases.items()
    }


def p99_ms(latencies: list[float]) -> float:
    return float(np.percentile(np.asarray(latencies) * 1e3, 99)) if latencies else float("nan")


def main(args: Args) -> None:
    if args.quick:
        args = dataclasses.replace(args, versions=10, block=5)
    root = Path(tempfile.mkdtemp(prefix="hot_swap_"))
    learner_endpoint = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    ready, go, windows = ctx.Event(), ctx.Event(), ctx.Queue()
    stand_in_args = (learner_endpoint, str(root / "ckpt"), args.versions, args.publish_hz)
    learner = ctx.Process(
        target=learner_stand_in, args=(*stand_in_args, args.block, ready, go, windows)
    )
    learner.start()
    server, endpoint, metrics_port = start_server(root, args, learner_endpoint)
    stop = threading.Event()
    try:
        if not ready.wait(600):
            raise RuntimeError("the learner stand-in did not write its versions")
        before = scrape(metrics_port)
        robots = [Robot(endpoint, f"robot-{i}", args.hz, stop) for i in range(args.robots)]
        for r in robots:
            r.start()
        time.sleep(1.0)  # every robot connected and served
        t_start = time.monotonic()
        go.set()
        deadline = t_start + 2 * args.versions / args.publish_hz + 60
        while time.monotonic() < deadline:
            if all(r.samples and r.samples[-1][2] == args.versions for r in robots):
                break
            time.sleep(0.1)
        time.sleep(args.block / args.publish_hz)  # the last quiet window
        stop.set()
        for r in robots:
            r.join(10)
        after = scrape(metrics_port)
    finally:
        stop.set()
        server.terminate()
        server.wait(60)
        learner.join(30)
        if learner.is_alive():
            learner.kill()

    # monotonic clocks are system-wide on Linux: the stand-in's windows compare with ours.
    spans = [windows.get(timeout=10) for _ in range(-(-args.versions // args.block))]
    tail = 1.0 / args.publish_hz  # the last notice's swap lands after its window closes

    def swapping_at(t: float) -> bool:
        return any(a <= t <= b + tail for a, b in spans)

    samples = [s for r in robots for s in r.samples if s[0] >= t_start]
    ok = [s for s in samples if s[1] is not None]
    baseline = [lat for t, lat, *_ in ok if not swapping_at(t)]
    swapping = [lat for t, lat, *_ in ok if swapping_at(t)]
    p99_base, p99_swap = p99_ms(baseline), p99_ms(swapping)
    swap_count = after["openpi_rl_server_swap_seconds_count"]
    print_json(
        {
            "swaps": int(after["openpi_rl_server_swaps_total"]),
            "requests": len(samples),
            "failed": len(samples) - len(ok),
            "late": sum(lat > args.late_ms / 1e3 for _, lat, *_ in ok),
            "p99_ratio": round(p99_swap / p99_base, 3),
            "p99_ms_baseline": round(p99_base, 3),
            "p99_ms_swapping": round(p99_swap, 3),
            "p50_ms": round(float(np.median(np.asarray([s[1] for s in ok]) * 1e3)), 3),
            "max_ms": round(max(s[1] for s in ok) * 1e3, 3),
            "final_version": max(s[2] for s in ok),
            "versions_published": args.versions,
            "swap_seconds_mean": round(after["openpi_rl_server_swap_seconds_sum"] / swap_count, 4)
            if swap_count
            else None,
            "compilations_during_run": int(
                after["openpi_rl_server_compilations"] - before["openpi_rl_server_compilations"]
            ),
            # Where a late reply's time went: [round trip, in the server (queue + infer)] ms.
            "late_ms": [
                [round(s[1] * 1e3, 1), round(s[3], 1)] for s in ok if s[1] > args.late_ms / 1e3
            ][:10],
            "late_quiet": sum(lat > args.late_ms / 1e3 for lat in baseline),
            "late_swapping": sum(lat > args.late_ms / 1e3 for lat in swapping),
            "requests_quiet": len(baseline),
            "requests_swapping": len(swapping),
            "swap_phase_ms": swap_phases_ms(root / "serve.log"),
            "restore_in_worker": args.restore_in_worker,
            "robots": args.robots,
            "hz": args.hz,
        }
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
