"""Weight publishing: a ZMQ PUB notice per version and a heartbeat, never a queue of weights.

The learner binds a PUB socket and sends, msgpack via `openpi_rl_client.wire`:

- `{"type": "version", "version": v}` once version v (and its manifest) is completely on disk;
- `{"type": "heartbeat", "version": v, "state": s}` every `heartbeat_s` (the newest
  published version, so a server that connects late, or missed a notice, still catches up;
  `state` is what the learner is doing: starting, waiting, training, refused, stopping).

A notice names a version, never a path: a server loads `<its own checkpoint_dir>/<v>` and
checks the version's content hash (checkpoints.py). The channel itself is closed: by default
(`"auto"`) an `ipc://` socket in a private (0700) runtime directory, `<checkpoint_dir>/.run/`
(`$XDG_RUNTIME_DIR/openpi-rl/` or `/tmp/openpi-rl-<uid>/` when that path is too long for a
socket), so only the checkpoint directory's owner can publish; across hosts, `tcp://` with
CURVE (the PUB's secret key, the subscriber's copy of its public key: `openpi-rl keys
generate`), so a subscriber hears only our learner.

Weights travel through a single latest-version slot: a subscriber keeps only the newest
version it has heard of (`LatestVersion`), so a slow server skips versions instead of
queueing them.

The other direction (`ServerWatch`): the learner asks each policy server's `health` over the
robots' protocol every 0.25 s. A reply proves the serving loop itself is alive (not only the
process); it also carries `learning_paused`, the operator's switch (`openpi-rl admin
pause-learning`), which the learner obeys between updates.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import structlog
import zmq
from prometheus_client import CollectorRegistry, Gauge

from openpi_rl_client import PolicyClient, wire

log = structlog.get_logger("openpi_rl.publish")

VERSION, HEARTBEAT = "version", "heartbeat"
AUTO = "auto"  # the endpoint: an ipc socket in a private directory found from checkpoint_dir
MAX_VERSION = 2**31 - 1  # notices naming a version past this are malformed
_IPC_PATH_MAX = 100  # sun_path holds 107 bytes on Linux


def runtime_dir(checkpoint_dir: str | Path) -> Path:
    """Where the notice socket of `checkpoint_dir` lives (not created here)."""
    return Path(checkpoint_dir).absolute() / ".run"


def notice_endpoint(endpoint: str, checkpoint_dir: str | Path | None) -> str:
    """`endpoint` with "auto" resolved: `ipc://<checkpoint_dir>/.run/notices.ipc`, or a name
    hashed from the checkpoint directory under `$XDG_RUNTIME_DIR/openpi-rl/` (else
    `/tmp/openpi-rl-<uid>/`) when that path is too long for a unix socket. Learner and server
    resolve the same address from the same checkpoint_dir."""
    if endpoint != AUTO:
        return endpoint
    if checkpoint_dir is None:
        raise ValueError(f"endpoint {AUTO!r}: needs a checkpoint_dir to place the socket in")
    path = runtime_dir(checkpoint_dir) / "notices.ipc"
    if len(str(path)) > _IPC_PATH_MAX:
        name = hashlib.sha256(str(Path(checkpoint_dir).absolute()).encode()).hexdigest()[:16]
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = (
            Path(xdg) / "openpi-rl"
            if xdg
            else Path(tempfile.gettempdir()) / f"openpi-rl-{os.getuid()}"
        )
        path = base / f"notices-{name}.ipc"
    return f"ipc://{path}"


def private_dir(path: Path, create: bool) -> None:
    """Make sure `path` is a directory only we can enter (create it 0700 if asked): a socket
    in it can be bound and reached by our user alone. Raises PermissionError otherwise."""
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"{path}: expected a directory of uid {os.getuid()} with mode 0700, got "
            f"uid {st.st_uid} mode {oct(stat.S_IMODE(st.st_mode))}"
        )


def _ipc_dir(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]).parent if endpoint.startswith("ipc://") else None


def _load_key(key_file: str, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")
    public, secret_key = zmq.auth.load_certificate(key_file)
    if secret and not secret_key:
        raise ValueError(f"{key_file}: holds no secret key (use the .key_secret file)")
    return public, secret_key


class Publisher:
    """PUB socket with a heartbeat thread. `publish` and the heartbeat share one lock, since a
    ZMQ socket is not thread-safe. `endpoint` is the bound address (port 0 / `*` resolved)."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        heartbeat_s: float = 0.5,
        context: zmq.Context | None = None,
        curve_secret_key_file: str | None = None,
    ):
        """`endpoint`: resolved already (`notice_endpoint`). An `ipc://` endpoint's directory
        is created 0700 (or must be so). `curve_secret_key_file`: the learner's key pair
        (`openpi-rl keys generate DIR learner`, the `.key_secret` file): the PUB is a CURVE
        server and subscribers that hold its public key know the notices are ours."""
        ipc_dir = _ipc_dir(endpoint)
        if ipc_dir is not None:
            private_dir(ipc_dir, create=True)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100)  # notices are tiny; a stuck subscriber drops them
        if curve_secret_key_file is not None:
            public, secret = _load_key(curve_secret_key_file, secret=True)
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = public, secret
        elif endpoint.startswith("tcp://") and not endpoint.startswith("tcp://127.0.0.1:"):
            log.warning("publish.unauthenticated", endpoint=endpoint, hint="set a CURVE key")
        self._sock.bind(endpoint)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.heartbeat_s = heartbeat_s
        self.version: int | None = None
        self.state = "starting"
        self.sent = {VERSION: 0, HEARTBEAT: 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="learner-heartbeat", daemon=True)
        self._thread.start()

    def publish(self, version: int) -> None:
        """Announce `version`, complete on disk with its manifest."""
        with self._lock:
            self.version = int(version)
            self._send({"type": VERSION, "version": self.version})

    def set_state(self, state: str) -> None:
        self.state = state

    @property
    def socket(self) -> zmq.Socket:
        """The bound PUB socket, which the heartbeat thread also uses (fault injection)."""
        return self._sock

    def send_raw(self, data: bytes) -> None:
        """Send `data` as is on the channel, as any peer on it could (subscribers' tests)."""
        with self._lock:
            self._sock.send(data)

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._sock.send(wire.packb(msg), zmq.NOBLOCK)
            self.sent[msg["type"]] += 1
        except zmq.Again:  # PUB drops at the high-water mark anyway; never block the learner
            pass

    def died(self) -> bool:
        """True if the heartbeat thread ended without `close()`: servers would take the
        learner for dead while it learns on (it exits non-zero instead, to be restarted)."""
        return not self._thread.is_alive() and not self._stop.is_set()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._sock.closed:
                    return
                self._send(
                    {
                        "type": HEARTBEAT,
                        "version": self.version,
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
    any returned before, or None; older notices are overwritten, never queued. `path` is None
    unless the sender named one (ours never does; the swapper refuses a path that is not its
    own). A notice whose version is not an int in [0, MAX_VERSION] is dropped and counted in
    `malformed`. `curve_server_key_file`: the learner's public key (`.key` file): only a
    publisher holding its secret key gets through the CURVE handshake.
    """

    def __init__(
        self,
        endpoint: str,
        context: zmq.Context | None = None,
        curve_server_key_file: str | None = None,
    ):
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # a notice is tens of bytes
        if curve_server_key_file is not None:
            server_key, _ = _load_key(curve_server_key_file, secret=False)
            self._sock.curve_serverkey = server_key
            self._sock.curve_publickey, self._sock.curve_secretkey = zmq.curve_keypair()
        ipc_dir = _ipc_dir(endpoint)
        if ipc_dir is not None and ipc_dir.exists():
            private_dir(ipc_dir, create=False)  # else someone else could be the publisher
        self._sock.connect(endpoint)
        self.seen: int | None = None  # newest version returned
        self.malformed = 0
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
            try:
                msg = wire.unpackb(self._sock.recv())
            except Exception as e:  # garbage on the channel: dropped, counted
                self._malformed(repr(e))
                continue
            if not isinstance(msg, dict) or msg.get("type") not in (VERSION, HEARTBEAT):
                self._malformed("not a version notice or heartbeat")
                continue
            if msg["type"] == HEARTBEAT:
                self.last_heartbeat, self.heartbeat_t = msg, time.monotonic()
                self.heartbeats += 1
            version, path = msg.get("version"), msg.get("path")
            if version is None and msg["type"] == HEARTBEAT:
                continue  # a learner that has published nothing yet
            if not isinstance(version, int) or isinstance(version, bool):
                self._malformed(f"version: expected an int, got {type(version).__name__}")
                continue
            if not 0 <= version <= MAX_VERSION:
                self._malformed(f"version: expected 0..{MAX_VERSION}, got {version}")
                continue
            if path is not None and not isinstance(path, str):
                self._malformed(f"path: expected a str, got {type(path).__name__}")
                continue
            if (self.seen is None or version > self.seen) and (
                newest is None or version > newest["version"]
            ):
                newest = {"version": version, "path": path}
        if newest is not None:
            self.seen = newest["version"]
        return newest

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        log.warning("publish.notice_malformed", reason=why, malformed=self.malformed)

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

    def died(self) -> bool:
        """True if a watching thread ended without `close()` (pauses would go unseen)."""
        return not self._stop.is_set() and not all(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Stop watching. Idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
