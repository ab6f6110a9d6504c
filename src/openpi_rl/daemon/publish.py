"""Weight publishing: a ZMQ PUB notice per version and a heartbeat, never a queue of weights.

The learner binds a PUB socket and sends, msgpack via `openpi_rl_client.wire`:

- `{"type": "version", "version": v, "path": p}` once version v is completely on disk;
- `{"type": "heartbeat", "version": v, "path": p, "state": s}` every `heartbeat_s` (the newest
  published version, so a server that connects late, or missed a notice, still catches up;
  `state` is what the learner is doing: starting, waiting, training, refused, stopping).

Weights travel through a single latest-version slot: a subscriber keeps only the newest
version it has heard of (`LatestVersion`), so a slow server skips versions instead of
queueing them.

The other direction (`ServerWatch`): the learner asks each policy server's `health` over the
robots' protocol every 0.25 s. A reply proves the serving loop itself is alive (not only the
process); it also carries `learning_paused`, the operator's switch (`openpi-rl admin
pause-learning`), which the learner obeys between updates.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, Gauge

from openpi_rl_client import PolicyClient, wire

VERSION, HEARTBEAT = "version", "heartbeat"


class Publisher:
    """PUB socket with a heartbeat thread. `publish` and the heartbeat share one lock, since a
    ZMQ socket is not thread-safe. `endpoint` is the bound address (port 0 / `*` resolved)."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        heartbeat_s: float = 0.5,
        context: zmq.Context | None = None,
    ):
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100)  # notices are tiny; a stuck subscriber drops them
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.heartbeat_s = heartbeat_s
        self.version: int | None = None
        self.path: str | None = None
        self.state = "starting"
        self.sent = {VERSION: 0, HEARTBEAT: 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="learner-heartbeat", daemon=True)
        self._thread.start()

    def publish(self, version: int, path: str) -> None:
        with self._lock:
            self.version, self.path = int(version), str(path)
            self._send({"type": VERSION, "version": self.version, "path": self.path})

    def set_state(self, state: str) -> None:
        self.state = state

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._sock.send(wire.packb(msg), zmq.NOBLOCK)
            self.sent[msg["type"]] += 1
        except zmq.Again:  # PUB drops at the high-water mark anyway; never block the learner
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._sock.closed:
                    return
                self._send(
                    {
                        "type": HEARTBEAT,
                        "version": self.version,
                        "path": self.path,
                        "state": self.state,
                    }
                )

    def close(self) -> None:
        """Stop the heartbeat and close the socket. Idempotent."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if not self._sock.closed:
                self._sock.close(linger=0)


class LatestVersion:
    """Subscriber side of the single latest-version slot (for the server's swapper and tests).

    `poll` reads everything pending and returns the newest notice `{version, path}` newer than
    any returned before, or None; older notices are overwritten, never queued.
    """

    def __init__(self, endpoint: str, context: zmq.Context | None = None):
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self.seen: int | None = None  # newest version returned
        self.last_heartbeat: dict[str, Any] | None = None
        self.heartbeat_t: float | None = None  # monotonic time of the last heartbeat
        self.heartbeats = 0

    def poll(self, timeout_s: float = 0.0) -> dict[str, Any] | None:
        newest: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout_s
        while True:
            wait_ms = max(0, int((deadline - time.monotonic()) * 1000)) if newest is None else 0
            if not self._sock.poll(wait_ms):
                break
            msg = wire.unpackb(self._sock.recv())
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == HEARTBEAT:
                self.last_heartbeat, self.heartbeat_t = msg, time.monotonic()
                self.heartbeats += 1
            version, path = msg.get("version"), msg.get("path")
            if version is None or path is None:
                continue
            if (self.seen is None or version > self.seen) and (
                newest is None or version > newest["version"]
            ):
                newest = {"version": int(version), "path": str(path)}
        if newest is not None:
            self.seen = newest["version"]
        return newest

    def close(self) -> None:
        self._sock.close(linger=0)


class ServerWatch:
    """The learner's heartbeat to and from the policy servers: one thread per endpoint asks
    `health` every `interval_s` (timeout `interval_s * 2`). A server without a reply for
    `timeout_s` is down. `paused`: some live server's operator paused learning (a server that
    went down keeps its last word, so a restart of the learner or server is needed to lose it).

    Gauges (in `registry`): openpi_rl_learner_server_up{endpoint},
    openpi_rl_learner_server_heartbeat_age_seconds{endpoint}, openpi_rl_learner_paused.
    """

    def __init__(
        self,
        endpoints: tuple[str, ...],
        interval_s: float = 0.25,
        timeout_s: float = 1.5,
        registry: CollectorRegistry | None = None,
    ):
        self.endpoints, self.interval_s, self.timeout_s = tuple(endpoints), interval_s, timeout_s
        self._started = time.monotonic()
        self.last_ok: dict[str, float | None] = dict.fromkeys(self.endpoints)
        self.last_health: dict[str, dict[str, Any] | None] = dict.fromkeys(self.endpoints)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, args=(e,), name=f"server-watch-{i}", daemon=True)
            for i, e in enumerate(self.endpoints)
        ]
        if registry is not None:
            up = Gauge(
                "openpi_rl_learner_server_up",
                "1 while the policy server answers health (within timeout_s).",
                ["endpoint"],
                registry=registry,
            )
            age = Gauge(
                "openpi_rl_learner_server_heartbeat_age_seconds",
                "Seconds since the server's last health reply (since start when none).",
                ["endpoint"],
                registry=registry,
            )
            for e in self.endpoints:
                up.labels(endpoint=e).set_function(lambda e=e: float(self.alive(e)))
                age.labels(endpoint=e).set_function(lambda e=e: self.age(e))
            Gauge(
                "openpi_rl_learner_paused",
                "1 while a server's operator has paused learning.",
                registry=registry,
            ).set_function(lambda: float(self.paused))
        for t in self._threads:
            t.start()

    def age(self, endpoint: str) -> float:
        t = self.last_ok[endpoint]
        return time.monotonic() - (t if t is not None else self._started)

    def alive(self, endpoint: str) -> bool:
        return self.age(endpoint) < self.timeout_s

    @property
    def paused(self) -> bool:
        return any(bool(h and h.get("learning_paused")) for h in self.last_health.values())

    def _watch(self, endpoint: str) -> None:
        client = PolicyClient(
            endpoint, robot_id="learner", timeout_s=2 * self.interval_s, retries=0
        )
        try:
            while not self._stop.is_set():
                try:
                    self.last_health[endpoint] = client.health()
                    self.last_ok[endpoint] = time.monotonic()
                except Exception:  # a timeout (down or hung) or an error reply: not alive
                    pass
                self._stop.wait(self.interval_s)
        finally:
            client.close()

    def close(self) -> None:
        """Stop watching. Idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
