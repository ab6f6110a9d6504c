"""What acknowledging a report only after its commit costs a robot (issue 12, item 8).

A `report` is answered once the replay has committed it (an acknowledged report survives
`kill -9`); a `health` request is answered from memory. One robot runs infer -> report ->
health against `PolicyServer` with a replay on the local disk, in one run, so both round trips
see the same machine load; the ratio of their percentiles is the price of the commit. Each
report's row is then read back: every acknowledged report is in the store.

    python benchmarks/report_ack.py            # 2000 rounds
    python benchmarks/report_ack.py --quick    # smoke run
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import structlog
import tyro

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.replay import ReplayConfig, ReplayReader
from openpi_rl.rl import ActorCritic
from openpi_rl_client import PolicyClient


@dataclasses.dataclass
class Args:
    rounds: int = 2000
    commit_interval_s: float = 0.05  # the service default: what a report no longer waits for
    quick: bool = False  # 200 rounds


def main(args: Args) -> dict:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    rounds = 200 if args.quick else args.rounds
    config = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4)
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    with tempfile.TemporaryDirectory() as tmp:
        replay = ReplayConfig(path=Path(tmp) / "replay", commit_interval_s=args.commit_interval_s)
        srv = PolicyServer(ac, ServeOptions(endpoint="tcp://127.0.0.1:*"), replay)
        thread = threading.Thread(target=srv.run, name="server", daemon=True)
        thread.start()
        srv.wait_ready(120)
        rng = np.random.default_rng(0)
        report_s, health_s, acked = [], [], {}
        with PolicyClient(srv.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
            for i in range(rounds):
                out = client.infer({"state": rng.standard_normal(6).astype(np.float32)})
                t = time.perf_counter()
                ok = client.report(out.transition_id, reward=float(i % 100), done=i % 50 == 49)
                report_s.append(time.perf_counter() - t)
                if ok.get("ok"):
                    acked[out.transition_id] = float(i % 100)
                t = time.perf_counter()
                client.health()
                health_s.append(time.perf_counter() - t)
        srv.close(wait_s=60)
        thread.join(60)
        with ReplayReader(replay.path) as reader:
            stored = {r.id: r.reward for r in reader.transitions()}
    lost = sum(stored.get(tid) != reward for tid, reward in acked.items())
    r50, r99 = np.percentile(report_s, [50, 99]) * 1e3
    h50, h99 = np.percentile(health_s, [50, 99]) * 1e3
    return {
        "rounds": rounds,
        "acknowledged": len(acked),
        "acknowledged_lost": lost,
        "report_p50_ms": round(r50, 3),
        "report_p99_ms": round(r99, 3),
        "health_p50_ms": round(h50, 3),
        "health_p99_ms": round(h99, 3),
        "report_over_health_p50": round(r50 / h50, 2),
        "report_p99_over_commit_interval": round(r99 / 1e3 / args.commit_interval_s, 3),
    }


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
