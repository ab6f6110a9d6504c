"""The listeners under attack and the good clients that check they still serve.

`Stack` starts every listener for real on loopback ports the OS picks: the policy server's ZMQ
ROUTER (tiny gaussian_mlp) writing to a temp replay, as `openpi-rl serve` does, its openpi
WebSocket endpoint and admin endpoint, and the reward bridge's WebSocket and HTTP ports on the
same replay. It counts each listener's `internal` errors and probes whether it is alive.
`GoodClient` sends valid requests to one listener at a fixed rate and records latency and
errors; the ZMQ one infers and reports (some transitions twice, some with executed actions, some
ending the episode) and the bridge ones send reward events. Every report and event a good client
saw acknowledged goes into the stack's `GoodLedger`; `check_replay` reads the replay afterwards
and counts those lost and the good robot's transitions that differ from what it reported (a
hostile report applied to them). `fuzz_listeners.py` drives all of it; the hostile inputs come
from `_fuzz_inputs.py` and are delivered by `_fuzz_attacks.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LISTENERS = ("zmq", "openpi_ws", "bridge_ws", "bridge_http", "admin")
OPERATOR_TOKEN = "tok-fuzz-operator-5f1c9a"
ADMIN_TOKEN = "tok-fuzz-admin-77aa21"
QUERY_TOKEN = "tok-fuzz-query-0b3e"
MAX_BYTES = 64 * 1024  # server and openpi_ws frame cap in this run
# The good ZMQ robot. No hostile input names it (without CURVE a robot id is not authenticated:
# a report in its name for its own transition would be its own); hostile reports name its
# transition ids under other robots' names, which must be refused.
GOOD_ROBOT = "good-zmq-3b9e51c2d7"


class GoodLedger:
    """What the good clients were served and saw acknowledged: what the replay must hold."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.served: list[int] = []  # the good robot's transition ids, in order
        # transition id -> the sum of its acknowledged rewards, done, executed actions
        self.reports: dict[int, dict[str, Any]] = {}
        self.events: dict[str, set[str]] = {}  # listener -> idempotency keys acknowledged

    def serve(self, tid: int) -> None:
        with self._lock:
            self.served.append(tid)

    def recent(self, k: int = 64) -> list[int]:
        with self._lock:
            return self.served[-k:]

    def acked(self, tid: int, reward: float, done: bool, executed: np.ndarray | None) -> None:
        with self._lock:
            r = self.reports.setdefault(tid, {"reward": 0.0, "done": False, "executed": None})
            r["reward"] += reward
            r["done"] = r["done"] or done
            if executed is not None:
                r["executed"] = np.asarray(executed, np.float32)

    def event(self, listener: str, key: str) -> None:
        with self._lock:
            self.events.setdefault(listener, set()).add(key)


class Stack:
    """Every listener, for real, on loopback ports chosen by the OS."""

    def __init__(self, tmp: Path, handshake_timeout_s: float):
        import jax

        from openpi_rl.models import GaussianMLPConfig
        from openpi_rl.policy_server.admin import AdminEndpoint
        from openpi_rl.policy_server.openpi_ws import OpenPIWebSocketEndpoint
        from openpi_rl.policy_server.server import PolicyServer, ServeOptions
        from openpi_rl.policy_server.swapper import SwapOptions, Swapper
        from openpi_rl.replay import ReplayConfig
        from openpi_rl.reward_bridge import BridgeConfig, RewardBridge
        from openpi_rl.rl import ActorCritic

        cfg = GaussianMLPConfig(obs_dim=4, action_dim=1)
        ac = ActorCritic(cfg.create(jax.random.key(0)), value_in_dim=4, value_hidden=(8,))
        opts = ServeOptions(
            endpoint="tcp://127.0.0.1:*",
            max_batch=4,
            max_message_bytes=MAX_BYTES,
            handshake_timeout_s=handshake_timeout_s,
        )
        replay_dir = tmp / "replay"
        self.replay_dir = replay_dir
        self.ledger = GoodLedger()
        # The server writes the replay, as `openpi-rl serve` does: a report reaches the writer
        # (the 2**63 transition id that killed it went unnoticed without one).
        self.server = PolicyServer(ac, opts, ReplayConfig(path=replay_dir))
        self.server_thread = threading.Thread(target=self.server.run, name="server", daemon=True)
        self.server_thread.start()
        if not self.server.wait_ready(120):
            raise TimeoutError("policy server not ready")
        self.swapper = Swapper(self.server, SwapOptions(learner_endpoint=None, nice=0)).start()
        self.admin = AdminEndpoint(
            self.swapper, "tcp://127.0.0.1:*", ADMIN_TOKEN, handshake_timeout_s=handshake_timeout_s
        ).start()
        self.ws = OpenPIWebSocketEndpoint(
            self.server.inproc_endpoint,
            self.server.metadata(),
            port=0,
            max_message_bytes=MAX_BYTES,
            open_timeout_s=handshake_timeout_s,
            metrics=self.server.metrics,
        ).start()
        self.bridge = RewardBridge(
            BridgeConfig(
                replay_dir=str(replay_dir),
                ws_port=0,
                http_port=0,
                metrics_port=None,
                operators={"fuzz": OPERATOR_TOKEN},
                query_token=QUERY_TOKEN,
                verdict_settle_s=0.0,
                max_message_bytes=MAX_BYTES,
                max_query_bytes=MAX_BYTES,
                handshake_timeout_s=handshake_timeout_s,
                auth_timeout_s=handshake_timeout_s,
                status_interval_s=1.0,
            )
        ).start()
        self.ports = {
            "zmq": int(self.server.endpoint.rsplit(":", 1)[1]),
            "openpi_ws": self.ws.port,
            "bridge_ws": self.bridge.ws_port,
            "bridge_http": self.bridge.http_port,
            "admin": int(self.admin.endpoint.rsplit(":", 1)[1]),
        }

    def close(self) -> None:
        self.bridge.close()
        self.ws.close()
        self.admin.close()
        self.swapper.close()
        with contextlib.suppress(Exception):  # a dead writer's close raises: counted apart
            self.server.close(wait_s=10)

    def replay_writer_alive(self) -> bool:
        """The server's replay writer: no stage failed and every thread of it runs."""
        w = self.server.replay
        failed = getattr(w, "error", None) or getattr(w, "_error", None)
        return failed is None and all(t.is_alive() for t in getattr(w, "_threads", []))

    def health(self) -> str:
        """What the ZMQ listener's health says now ("ready", "failed", or the error)."""
        from openpi_rl_client import PolicyClient

        try:
            with PolicyClient(self.server.endpoint, "fuzz-health", timeout_s=2.0, retries=1) as c:
                return str(c.health().get("status"))
        except Exception as e:
            return f"{type(e).__name__}: {e}"[:120]

    def check_replay(self) -> dict[str, dict[str, int]]:
        """After close (everything flushed): the good clients' acknowledged reports and events
        against the replay. A report is lost if its transition is missing; a transition is
        altered if its reward, done, truncated, intervened or executed actions differ from
        what the good robot's acknowledged reports make them."""
        from openpi_rl.replay import ReplayReader

        led = self.ledger
        with ReplayReader(self.replay_dir) as r:
            rows = {row.id: row for row in r.transitions(robot_id=GOOD_ROBOT)}
            keys = {e["idempotency_key"] for e in r.reward_events()}
        none = {"reward": 0.0, "done": False, "executed": None}
        lost = altered = 0
        for tid in sorted(set(led.served) | set(led.reports)):
            row = rows.get(tid)
            want = led.reports.get(tid, none)
            if row is None:
                lost += tid in led.reports
                continue
            ex = row.executed_actions
            same_ex = (
                (ex is None)
                if want["executed"] is None
                else (
                    ex is not None and np.array_equal(np.asarray(ex, np.float32), want["executed"])
                )
            )
            if (
                row.reward != want["reward"]
                or row.done != want["done"]
                or row.truncated
                or row.intervened
                or not same_ex
            ):
                altered += 1
        out = {
            "zmq": {
                "good_reports_acked": len(led.reports),
                "acked_reports_lost": lost,
                "good_transitions": len(rows),
                "good_transitions_altered": altered,
            }
        }
        for listener, acked in led.events.items():
            out[listener] = {
                "good_events_acked": len(acked),
                "acked_events_lost": len(acked - keys),
            }
        return out

    def internal_errors(self, listener: str) -> int:
        """Handler bugs caught so far (an `internal` reply), by listener."""

        def count(metrics, name: str, **labels: str) -> int:  # as /metrics shows it
            return int(metrics.registry.get_sample_value(name, labels) or 0)

        if listener in ("zmq", "openpi_ws"):
            return count(self.server.metrics, "openpi_rl_server_errors_total", code="internal")
        if listener == "admin":
            name = "openpi_rl_server_admin_requests_total"
            m = self.swapper.metrics
            return sum(count(m, name, command=c, outcome="failed") for c in _ADMIN_CMDS)
        return count(self.bridge.metrics, "openpi_rl_bridge_errors_total", code="internal")

    def alive(self, listener: str) -> bool:
        threads = {
            "zmq": self.server_thread,
            "openpi_ws": self.ws._thread,
            "admin": self.admin._thread,
            "bridge_ws": self.bridge._thread,
            "bridge_http": self.bridge._thread,
        }
        if not threads[listener].is_alive():
            return False
        probe = _GOOD[listener](self)
        try:
            for _ in range(3):
                probe.call()
            return True
        except Exception:
            return False
        finally:
            probe.close()


_ADMIN_CMDS = ("status", "pin", "unpin", "rollback", "pause-learning", "resume-learning", "invalid")
OBS = {"state": np.zeros(4, np.float32)}


# ---- good clients -------------------------------------------------------------------------------


class _GoodZmq:
    """Infers, then reports the chunk: rewards that sum exactly in binary floating point, every
    third transition reported twice (summed), every fourth with executed actions, every tenth
    ending the episode. A report counts once its reply is {"ok": True}."""

    def __init__(self, stack: Stack):
        from openpi_rl_client import PolicyClient

        self.ledger = stack.ledger
        self.c = PolicyClient(stack.server.endpoint, GOOD_ROBOT, timeout_s=2.0, retries=0)
        self.i = 0

    def call(self) -> None:
        out = self.c.infer(OBS)
        tid = out.transition_id
        self.ledger.serve(tid)
        self.i += 1
        reward, done = (self.i % 8) * 0.125 - 0.25, self.i % 10 == 0
        executed = out.actions if self.i % 4 == 0 else None
        self._report(tid, reward, done, executed)
        if self.i % 3 == 0:
            self._report(tid, 0.5, False, None)
        if done:
            self.c.reset()

    def _report(self, tid: int, reward: float, done: bool, executed: Any) -> None:
        reply = self.c.report(tid, reward, done=done, executed_actions=executed)
        if reply.get("ok") is not True:
            raise RuntimeError(f"zmq report: {reply!r:.100}")
        self.ledger.acked(tid, reward, done, executed)

    def close(self) -> None:
        self.c.close()


class _GoodOpenpiWs:
    def __init__(self, stack: Stack):
        import websockets.sync.client

        from openpi_rl_client import wire

        self.wire = wire
        self.ws = websockets.sync.client.connect(
            f"ws://127.0.0.1:{stack.ws.port}", max_size=None, compression=None, open_timeout=5
        )
        self.ws.recv(timeout=5)  # metadata

    def call(self) -> None:
        self.ws.send(self.wire.packb(OBS))
        reply = self.ws.recv(timeout=2)
        if isinstance(reply, str) or "actions" not in self.wire.unpackb(reply):
            raise RuntimeError(f"openpi_ws: {reply!r:.100}")

    def close(self) -> None:
        self.ws.close()


class _GoodBridgeWs:
    def __init__(self, stack: Stack):
        import websockets.sync.client

        self.ws = websockets.sync.client.connect(
            f"ws://127.0.0.1:{stack.bridge.ws_port}/pendant", open_timeout=5
        )
        self.ws.send(json.dumps({"type": "hello", "token": OPERATOR_TOKEN}))
        self._expect("welcome")
        self.i = 0
        self.ledger = stack.ledger

    def _expect(self, kind: str, key: str | None = None) -> None:
        deadline = time.monotonic() + 2
        while True:  # status pushes arrive in between
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("type") == kind and (key is None or msg.get("idempotency_key") == key):
                return
            if msg.get("type") == "error":
                raise RuntimeError(f"bridge_ws: {msg}")

    def call(self) -> None:
        self.i += 1
        if self.i % 5:
            self.ws.send(json.dumps({"type": "ping"}))
            self._expect("pong")
        else:
            key = uuid.uuid4().hex
            ev = {"type": "feedback", "robot_id": "good", "kind": "step_reward", "value": 0.5}
            self.ws.send(json.dumps({**ev, "idempotency_key": key}))
            self._expect("ack", key)
            self.ledger.event("bridge_ws", key)

    def close(self) -> None:
        self.ws.close()


class _GoodBridgeHttp:
    def __init__(self, stack: Stack):
        self.port = stack.bridge.http_port
        self.i = 0
        self.ledger = stack.ledger

    def call(self) -> None:
        import http.client

        self.i += 1
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            key = None
            if self.i % 2:
                conn.request("GET", "/healthz")
            else:
                ev = {"robot_id": "good", "kind": "step_reward", "value": 0.25}
                key = uuid.uuid4().hex
                body = json.dumps({**ev, "idempotency_key": key})
                headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
                conn.request("POST", "/feedback", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"bridge_http: {resp.status} {data!r:.100}")
            if key is not None:
                self.ledger.event("bridge_http", key)
        finally:
            conn.close()

    def close(self) -> None:
        pass


class _GoodAdmin:
    def __init__(self, stack: Stack):
        self.endpoint = stack.admin.endpoint

    def call(self) -> None:
        from openpi_rl.policy_server.admin import admin_request

        reply = admin_request(self.endpoint, ADMIN_TOKEN, "status", timeout_s=2)
        if not reply.get("ok"):
            raise RuntimeError(f"admin: {reply}")

    def close(self) -> None:
        pass


_GOOD: dict[str, Callable[[Stack], Any]] = {
    "zmq": _GoodZmq,
    "openpi_ws": _GoodOpenpiWs,
    "bridge_ws": _GoodBridgeWs,
    "bridge_http": _GoodBridgeHttp,
    "admin": _GoodAdmin,
}


class GoodClient(threading.Thread):
    """Valid requests at `hz` until stopped; latency and errors recorded."""

    def __init__(self, stack: Stack, listener: str, hz: float):
        super().__init__(name=f"good-{listener}", daemon=True)
        self.stack, self.listener, self.period = stack, listener, 1.0 / hz
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop_ev = threading.Event()

    def run(self) -> None:
        client = None
        next_t = time.monotonic()
        while not self._stop_ev.is_set():
            t0 = time.perf_counter()
            try:
                if client is None:
                    client = _GOOD[self.listener](self.stack)
                client.call()
                self.latencies.append(time.perf_counter() - t0)
            except Exception as e:
                self.errors.append(f"{type(e).__name__}: {e}"[:200])
                with contextlib.suppress(Exception):
                    client.close()
                client = None
            next_t += self.period
            self._stop_ev.wait(max(0.0, next_t - time.monotonic()))
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(10)

    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies, 99) * 1e3) if self.latencies else math.nan
