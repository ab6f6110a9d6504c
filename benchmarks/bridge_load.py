"""Reward bridge under load: many pendants pressing at once while a policy server writes.

The bridge runs as its own process (`openpi-rl bridge`), exactly as deployed; this process plays
the policy server (a normal `ReplayWriter` appending transitions for a few robots, so events
attach and the two processes contend for SQLite's write lock) and `connections` pendants
sending `rate` events/s in total for `duration_s`, a fraction of them resent with the same
idempotency key after their ack. Afterwards the database is read directly: every acknowledged
event must be stored exactly once.

The bridge runs with its shipped defaults (`max_connections` 256 per port) but for one setting
a real site of this size has: the pendants reach it through the TLS proxy of
deploy/nginx-openpi-rl-bridge.conf, so they all come from the proxy's address and the bridge
trusts it (`trusted_proxies = ["127.0.0.1"]`) to name each pendant in `X-Forwarded-For`, which
every pendant here sends as the proxy would. Without that, one address holds at most 3/4 of
`max_connections` (192 by default).

    python benchmarks/bridge_load.py            # 200 pendants, 1,000 events/s, 10 s
    python benchmarks/bridge_load.py --quick    # smoke run
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import structlog
import tyro
import websockets.asyncio.client

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.replay import ReplayConfig, ReplayWriter

TOKEN = "bench-token-0123456789"


@dataclasses.dataclass
class Args:
    connections: int = 200
    rate: float = 1000.0  # events/s over all connections
    duration_s: float = 10.0
    resend_fraction: float = 0.05  # acked events sent again with the same key
    robots: int = 10
    robot_hz: float = 20.0  # transitions/s per robot written by the "server" meanwhile
    quick: bool = False  # 20 pendants, 200 events/s, 2 s


def start_bridge(root: Path) -> tuple[subprocess.Popen, int, list[str]]:
    config = root / "bridge.toml"
    config.write_text(
        f'replay_dir = "{root / "replay"}"\nws_port = 0\nhttp_port = 0\nmetrics_port = 0\n'
        'trusted_proxies = ["127.0.0.1"]\n'  # the TLS proxy's address: see the docstring
        f'[operators]\nbench = "{TOKEN}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "openpi_rl.cli", "bridge", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    while True:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("bridge exited before listening:\n" + "".join(lines[-20:]))
        lines.append(line)
        if '"bridge.listening"' in line:
            port = json.loads(line)["ws_port"]
            break
    # Keep draining its log, or a full pipe would stall the bridge.
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    return proc, port, lines


def play_server(writer: ReplayWriter, robots: int, hz: float, stop: threading.Event) -> None:
    actions = np.zeros((4, 2), np.float32)
    step, t_next = 0, time.monotonic()
    while not stop.is_set():
        for r in range(robots):
            writer.append_transition(
                f"arm-{r}", "ep-0", step, 1, b"o" * 256, actions, None, 0, 0, 0
            )
        step += 1
        t_next += 1.0 / hz
        time.sleep(max(0.0, t_next - time.monotonic()))


async def pendant(
    port: int, idx: int, n: int, period: float, t0: float, args: Args, out: dict
) -> None:
    rng = random.Random(idx)
    sent: dict[str, float] = {}
    forwarded = {"X-Forwarded-For": f"10.{idx // 65536}.{idx // 256 % 256}.{idx % 256}"}
    async with websockets.asyncio.client.connect(
        f"ws://127.0.0.1:{port}/pendant",
        max_size=2**20,
        ping_interval=None,
        additional_headers=forwarded,  # as the TLS proxy would add it
    ) as ws:
        await ws.send(json.dumps({"type": "hello", "token": TOKEN}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        out["connected"] += 1
        expected = n  # acks still to come (resends add one each)

        async def receive() -> None:
            nonlocal expected
            while expected > 0:
                msg = json.loads(await ws.recv())
                if msg["type"] == "ack":
                    expected -= 1
                    key = msg["idempotency_key"]
                    if msg["duplicate"]:
                        out["duplicates"] += 1
                    else:
                        out["acked"].add(key)
                        out["ack_ms"].append((time.monotonic() - sent[key]) * 1e3)
                        if rng.random() < args.resend_fraction:  # the pendant missed the ack
                            expected += 1
                            await ws.send(json.dumps(event(key)))
                elif msg["type"] == "error":
                    expected -= 1
                    out["errors"].append(msg["error"]["code"])

        def event(key: str) -> dict:
            return {"robot_id": f"arm-{rng.randrange(args.robots)}", "kind": "step_reward",
                    "value": rng.choice((1, -1)), "idempotency_key": key}  # fmt: skip

        receiver = asyncio.create_task(receive())
        start = t0 + idx * period / args.connections  # spread connections over the period
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i * period - time.monotonic()))
            key = f"c{idx}-{i}"
            sent[key] = time.monotonic()
            await ws.send(json.dumps(event(key)))
            out["sent"] += 1
        await asyncio.wait_for(receiver, 60)


async def load(port: int, args: Args) -> dict:
    out = {"connected": 0, "sent": 0, "acked": set(), "duplicates": 0, "errors": [], "ack_ms": []}
    per_conn = max(1, round(args.rate * args.duration_s / args.connections))
    period = args.connections / args.rate
    t0 = time.monotonic() + 2.0  # time to open every connection first
    t = time.monotonic()
    await asyncio.gather(
        *(pendant(port, i, per_conn, period, t0, args, out) for i in range(args.connections))
    )
    out["wall_s"] = time.monotonic() - max(t, t0)
    return out


def main(args: Args) -> None:
    if args.quick:
        args = dataclasses.replace(args, connections=20, rate=200.0, duration_s=2.0)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer = ReplayWriter(ReplayConfig(path=root / "replay"))
        stop = threading.Event()
        server = threading.Thread(
            target=play_server, args=(writer, args.robots, args.robot_hz, stop), daemon=True
        )
        server.start()
        proc, port, _ = start_bridge(root)
        try:
            out = asyncio.run(load(port, args))
        finally:
            proc.terminate()
            proc.wait(30)
            stop.set()
            server.join(10)
            writer.close()
        with sqlite3.connect(root / "replay" / "replay.sqlite") as conn:
            rows = conn.execute(
                "SELECT idempotency_key, count(*), sum(transition_id IS NOT NULL)"
                " FROM reward_events GROUP BY idempotency_key"
            ).fetchall()
    per_key = {k: n for k, n, _ in rows}
    acked = out["acked"]
    ms = sorted(out["ack_ms"]) or [float("nan")]
    print(
        f"{out['connected']} pendants sent {out['sent']} events in {out['wall_s']:.1f} s "
        f"({out['sent'] / out['wall_s']:.0f}/s); acked {len(acked)}, resends answered as "
        f"duplicates {out['duplicates']}, errors {len(out['errors'])}; stored rows {len(rows)} "
        f"(attached {sum(a for *_, a in rows)}), rows per acked key: "
        f"{sorted({per_key.get(k, 0) for k in acked})}; ack p50 {statistics.median(ms):.1f} ms, "
        f"p99 {ms[int(0.99 * (len(ms) - 1))]:.1f} ms"
    )
    print_json(
        {
            "connections": out["connected"],
            "acked": len(acked),
            "stored": sum(1 for k in acked if per_key.get(k) == 1),
            "duplicates": out["duplicates"],
            "missing": sum(1 for k in acked if k not in per_key),
            "sent": out["sent"],
            "events_per_s": round(out["sent"] / out["wall_s"], 1),
            "errors": len(out["errors"]),
            "ack_p50_ms": round(statistics.median(ms), 2),
            "ack_p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2),
        }
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
