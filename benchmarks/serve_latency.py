"""Round-trip latency of the policy server on loopback, against the transport's floor and a
one-request-at-a-time reference server, all in one run.

Every server runs in its own process (multiprocessing, spawn); the robots run in this one.
The observation is what a two-camera robot sends: two 224x224x3 uint8 images, a 32-d float32
state and a prompt (about 301 KB as msgpack).

- echo:      a bare pyzmq ROUTER that sends the same bytes back (the transport floor). Its
             robot does what `PolicyClient` does around the socket (pack the observation
             with the wire codec, send, receive, unpack), so every ratio is the server's cost.
- floor:     the least a server with a JAX model can do: unpack, the same jitted
             `PolicySnapshot.sample` of the no-op model on one observation, pack. No
             validation, no replay, no metrics: what our server adds is noop over floor.
- noop:      our PolicyServer with a no-op model (validation, replay logging, metrics on),
             driven by `PolicyClient`.
- noop_pg:   (`--pg`) the same noop server with its replay on PostgreSQL: a throw-away
             server (`LocalCluster`) with a real server's durability (fsync and
             synchronous_commit on); observation records in segment files beside it
             (`--pg-records segments`, the default) or in its table (`table`).
             `noop_pg_p99_over_noop`: its p99 over the SQLite noop's, same run (goal <= 1.1).
             The database's processes run in a cpu cgroup at a tenth of the servers' weight
             (`--pg-cpu-weight`), as the shipped units have a postgresql unit beside a server.
- pi0_fast:  our PolicyServer with `Pi0FASTConfig(variant="dummy")`.
- ws:        our openpi WebSocket endpoint (the noop server) driven by the real
             openpi-client 0.1.2 from its own venv (.venv-openpi-client).
- fleet:     4 robots (threads) sending at once to pi0_fast dummy, our server (max_batch 4)
             vs a reference that serves one request at a time as openpi's loop does
             (decode -> the same jitted `PolicySnapshot.sample` on one observation -> encode).
             `fleet4_model_bound`: the model alone, one call on 4 observations over 4 calls on
             one, measured after the servers stop: what batching saves in model time here.
             `fleet4_steady_*`: without each block's first 2 requests per robot (every block
             starts cold: the robots were idle during the other server's block).

Cases run interleaved in blocks so the shared machine's noise falls on all alike.

    python benchmarks/serve_latency.py            # full: 500 timed requests per case
    python benchmarks/serve_latency.py --quick    # smoke run: 50
    python benchmarks/serve_latency.py --profile  # + where the noop server's time goes
    python benchmarks/serve_latency.py --pg --no-ws --no-fleet   # replay on SQLite vs PostgreSQL
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import tyro
import zmq

sys.path.insert(0, str(Path(__file__).parent))
import contextlib

from _common import print_json
from _cpu_weight import unweigh_cluster, weigh_cluster

from openpi_rl_client import PolicyClient, wire

ROOT = Path(__file__).resolve().parents[1]
OPENPI_VENV = ROOT / ".venv-openpi-client"
IMAGE = (224, 224, 3)
STATE_DIM = 32
PROMPT = "pick up the red cube and put it in the bowl"


@dataclasses.dataclass
class Args:
    requests: int = 500  # timed requests per single-robot case
    warmup: int = 50  # untimed requests per case before timing
    block: int = 50  # requests per interleaved block
    robots: int = 4  # fleet case
    fleet_requests: int = 125  # timed requests per robot per fleet server
    ws: bool = True  # the openpi-client case (needs .venv-openpi-client)
    fleet: bool = True  # the 4-robot case
    profile: bool = False  # time the noop server's steps and cProfile its serving thread
    pg: bool = False  # also the noop server with its replay on PostgreSQL (a LocalCluster)
    pg_records: Literal["segments", "table"] = "segments"
    """noop_pg's observation records: segment files beside the database (observations_dir, the
    fleet's fast setting) or the database's observations table."""
    pg_cpu_weight: float = 0.1
    """The database's CPU weight relative to the policy server's, as a cpu cgroup holding all
    of its processes (0: left as started). 0.1 is what the shipped units give them on a shared
    host: the policy server's `CPUWeight=1000` against the default 100 of Debian's postgresql
    unit. Left as started, each PostgreSQL process is its own session (setsid), so each weighs
    as much as the benchmark's session (robot and servers) together."""
    quick: bool = False  # 50 timed requests per case (fleet: 25 per robot)


def observation(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image_0": rng.integers(0, 256, IMAGE, dtype=np.uint8),
        "image_1": rng.integers(0, 256, IMAGE, dtype=np.uint8),
        "state": rng.standard_normal(STATE_DIM).astype(np.float32),
    }


# ----------------------------------------------------------------- models (server processes)


def _noop_actor_critic():
    import jax.numpy as jnp
    from flax import nnx

    from openpi_rl.rl import ActorCritic
    from openpi_rl.rl.rl_api import ArraySpec

    class NoopModel(nnx.Module):
        """Declares the two-camera observation; answers zeros. Only the serving path costs."""

        def __init__(self, horizon: int = 10, action_dim: int = 7):
            self.horizon, self.action_dim = horizon, action_dim
            self.bias = nnx.Param(jnp.zeros((action_dim,), jnp.float32))  # so it has state

        @property
        def obs_spec(self):
            return {
                "image_0": ArraySpec(IMAGE, "uint8"),
                "image_1": ArraySpec(IMAGE, "uint8"),
                "state": ArraySpec((STATE_DIM,), "float32"),
            }

        def sample_actions(self, rng, obs):
            b = obs["state"].shape[0]
            return jnp.zeros((b, self.horizon, self.action_dim), jnp.float32) + self.bias[...]

        def policy_logprobs(self, rng, obs, actions):
            return jnp.zeros(actions.shape[:1], jnp.float32)

        def value_features(self, rng, obs):
            return obs["state"][:, :4]

        def entropy(self, rng, obs):
            return jnp.zeros(obs["state"].shape[:1], jnp.float32)

    return ActorCritic(NoopModel(), value_in_dim=4, value_hidden=(8,), rngs=nnx.Rngs(0))


def _pi0_fast_actor_critic():
    import jax
    from flax import nnx

    from openpi_rl.models.pi0_fast import Pi0FASTConfig
    from openpi_rl.rl import ActorCritic

    config = Pi0FASTConfig(
        variant="dummy", image_keys=("image_0", "image_1"), state_dim=STATE_DIM, image_size=224
    )
    model = config.create(jax.random.key(0))
    return ActorCritic(
        model, value_in_dim=config.value_in_dim, value_hidden=(64,), rngs=nnx.Rngs(1)
    )


# ----------------------------------------------------------------- server processes


def _stop_event(conn) -> threading.Event:
    """Set once the parent sends anything (or goes away)."""
    stop = threading.Event()

    def wait():
        with contextlib.suppress(EOFError):
            conn.recv()
        stop.set()

    threading.Thread(target=wait, daemon=True).start()
    return stop


def _echo_server(conn) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    conn.send({"endpoint": sock.getsockopt(zmq.LAST_ENDPOINT).decode()})
    stop = _stop_event(conn)
    while not stop.is_set():
        if sock.poll(100):
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    conn.send({})
    sock.close(0)
    ctx.term()


def _error_count(metrics) -> int:
    total = 0
    for metric in metrics.registry.collect():
        if metric.name == "openpi_rl_server_errors":
            total += sum(int(s.value) for s in metric.samples if s.name.endswith("_total"))
    return total


def _our_server(
    conn, model: str, max_batch: int, replay_dir: str, ws: bool, profile: bool,
    observations_dir: str | None = None,
):  # fmt: skip
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings+
    from openpi_rl.policy_server.openpi_ws import OpenPIWebSocketEndpoint
    from openpi_rl.policy_server.serve import tune_serving_process
    from openpi_rl.policy_server.server import PolicyServer, ServeOptions
    from openpi_rl.replay import ReplayConfig

    ac = _noop_actor_critic() if model == "noop" else _pi0_fast_actor_critic()
    server = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=max_batch),
        # a directory, or a PostgreSQL database's URL (its records beside it, or in it)
        ReplayConfig(path=replay_dir, observations_dir=observations_dir),
    )
    tune_serving_process()  # as `openpi-rl serve` does
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        thread = threading.Thread(target=prof.runcall, args=(server.run,), daemon=True)
    else:
        thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    server.wait_ready(600)
    endpoint = None
    if ws:
        endpoint = OpenPIWebSocketEndpoint(server.inproc_endpoint, server.metadata(), port=0)
        endpoint.start()
    breakdown = _step_breakdown(server) if profile else None
    conn.send({"endpoint": server.endpoint, "ws_port": endpoint and endpoint.port})
    stop = _stop_event(conn)
    stop.wait()
    if endpoint is not None:
        endpoint.close()
    server.close(wait_s=60)
    thread.join(60)
    stats = {"served": server.served, "server_errors": _error_count(server.metrics)}
    if server.replay is not None:
        stats["replay"] = server.replay.counters()
    if prof is not None:
        import io
        import pstats

        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        stats["cprofile"] = out.getvalue()
        stats["breakdown"] = breakdown
    conn.send(stats)


def _step_breakdown(server, n: int = 300) -> dict[str, float]:
    """Median µs of each step the serving loop takes for one robot's infer request, timed in
    isolation in the server's process (the loop is idle meanwhile: no robot is connected)."""
    from openpi_rl_client import protocol

    obs = observation()
    msg = {
        "type": "infer",
        "protocol_version": protocol.PROTOCOL_VERSION,
        "robot_id": "breakdown",
        "request_id": "x-0",
        "episode_id": "e",
        "observation": obs,
        "prompt": PROMPT,
    }
    payload = wire.packb(msg)
    steps: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        steps.setdefault(name, []).append((time.perf_counter() - t) * 1e6)
        return out

    for i in range(n):
        frame = zmq.Frame(payload)
        timed("recv copy (bytes of the frame)", lambda frame=frame: frame.bytes)
        m = timed("wire.unpackb", lambda: wire.unpackb(payload))
        _, m = timed("protocol.validate_request", lambda m=m: protocol.validate_request(m))
        timed("validate_observation", lambda m=m: server._check_infer(m))
        out = timed(
            "snapshot.sample (B=1)",
            lambda m=m, i=i: server.snapshot.sample(10_000 + i, [m["observation"]]),
        )
        timed(
            "metrics.batch_size.observe", lambda: server.metrics.batch_size.observe(1)
        )  # as in _serve
        reply = {
            "actions": np.ascontiguousarray(out.actions[0], np.float32),
            "policy_version": 0,
            "transition_id": i,
            "server_timing": {"queue_ms": 0.0, "infer_ms": 0.0},
            "request_id": "x-0",
        }
        timed("wire.packb(reply)", lambda r=reply: wire.packb(r))
        timed(
            "metrics: counter + histogram",
            lambda: (
                server.metrics.requests.labels(type="breakdown").inc(),
                server.metrics.request_seconds.labels(type="breakdown").observe(1e-4),
            ),
        )
    return {k: round(float(np.median(v)), 1) for k, v in steps.items()}


def _reference_server(conn, model: str = "pi0_fast") -> None:
    """openpi's serving loop on our model: one request at a time, decode -> sample -> encode."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from openpi_rl.policy_server.snapshot import PolicySnapshot, example_observation

    ac = _noop_actor_critic() if model == "noop" else _pi0_fast_actor_critic()
    spec = ac.model.obs_spec
    snapshot = PolicySnapshot(0, ac, spec, (1,))
    snapshot.warm_up(example_observation(spec))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    conn.send({"endpoint": sock.getsockopt(zmq.LAST_ENDPOINT).decode()})
    stop = _stop_event(conn)
    counter = 0
    while not stop.is_set():
        if not sock.poll(100):
            continue
        identity, _, payload = sock.recv_multipart()
        msg = wire.unpackb(payload)
        counter += 1
        out = snapshot.sample(counter, [msg["observation"]])
        reply = {
            "actions": np.ascontiguousarray(out.actions[0], np.float32),
            "policy_version": 0,
            "transition_id": counter,
            "request_id": msg["request_id"],
        }
        sock.send_multipart([identity, b"", wire.packb(reply)])
    conn.send({"served": counter})
    sock.close(0)
    ctx.term()


def _model_bound(conn, repeats: int = 15) -> None:
    """The model's own share of the fleet goal: one call on 4 observations over 4 calls on one
    (the same jitted sampler, medians of interleaved repeats). A batching server cannot beat
    the reference by more than this on this machine, whatever else it does."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from openpi_rl.policy_server.snapshot import PolicySnapshot, example_observation

    ac = _pi0_fast_actor_critic()
    snapshot = PolicySnapshot(0, ac, ac.model.obs_spec, (1, 4))
    snapshot.warm_up(example_observation(ac.model.obs_spec))
    obs = [observation(seed=i + 1) for i in range(4)]
    batched, single = [], []
    for k in range(repeats):
        t = time.perf_counter()
        snapshot.sample(k, obs)
        batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i, o in enumerate(obs):
            snapshot.sample(k * 4 + i, [o])
        single.append(time.perf_counter() - t)
    b, s = float(np.median(batched)), float(np.median(single))
    conn.send({"batched_ms": b * 1e3, "one_at_a_time_ms": s * 1e3, "ratio": b / s})


class Proc:
    """A server in its own (spawned) process; `info` is what it sent once ready."""

    def __init__(self, target, *args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 900
        while not self.conn.poll(1):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{target.__name__} did not come up (see its traceback)")
        self.info = self.conn.recv()

    def stop(self) -> dict:
        self.conn.send("stop")
        stats = self.conn.recv() if self.conn.poll(120) else {}
        self.proc.join(30)
        return stats


# ----------------------------------------------------------------- robots (this process)

WS_ROBOT = """
import json, sys, time
import numpy as np
from openpi_client import websocket_client_policy
rng = np.random.default_rng(0)
obs = {"image_0": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
       "image_1": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
       "state": rng.standard_normal(32).astype(np.float32), "prompt": sys.argv[2]}
policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=int(sys.argv[1]))
print(json.dumps({"ready": policy.get_server_metadata()["action_horizon"]}), flush=True)
for line in sys.stdin:
    ms, errors = [], 0
    for _ in range(int(line)):
        t = time.perf_counter()
        try:
            out = policy.infer(obs)
            assert out["actions"].shape == (10, 7)
        except Exception as e:
            errors += 1
            print(repr(e), file=sys.stderr)
        ms.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"ms": ms, "errors": errors}), flush=True)
"""


class WSRobot:
    """The real openpi-client in its own venv, timing `n` calls per `run(n)`."""

    def __init__(self, port: int):
        python = OPENPI_VENV / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(
                f"{python} missing: python3 -m venv .venv-openpi-client && "
                ".venv-openpi-client/bin/pip install openpi-client==0.1.2 typing_extensions"
            )
        self.proc = subprocess.Popen(
            [str(python), "-c", WS_ROBOT, str(port), PROMPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        json.loads(self.proc.stdout.readline())

    def run(self, n: int) -> tuple[list[float], int]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["ms"], out["errors"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class EchoRobot:
    """A DEALER doing `PolicyClient`'s own work per request: pack the request, send, receive,
    unpack the reply (here the request itself, echoed)."""

    def __init__(self, endpoint: str, msg: dict):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.msg = msg

    def run(self, n: int) -> tuple[list[float], int]:
        ms, errors = [], 0
        for i in range(n):
            t = time.perf_counter()
            self.sock.send_multipart([b"", wire.packb({**self.msg, "request_id": str(i)})])
            if not self.sock.poll(5000):
                errors += 1
                continue
            reply = wire.unpackb(self.sock.recv_multipart()[-1])
            ms.append((time.perf_counter() - t) * 1e3)
            errors += reply.get("request_id") != str(i)
        return ms, errors

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class ZMQRobot:
    def __init__(self, endpoint: str, obs: dict, robot_id: str = "robot", timeout_s: float = 30):
        self.client = PolicyClient(endpoint, robot_id=robot_id, timeout_s=timeout_s, retries=0)
        self.obs = obs

    def run(self, n: int) -> tuple[list[float], int]:
        ms, errors = [], 0
        for _ in range(n):
            t = time.perf_counter()
            try:
                result = self.client.infer(self.obs, prompt=PROMPT)
                errors += result.actions.shape != (10, 7)
            except Exception as e:
                print(f"robot {self.client.robot_id}: {e!r}", file=sys.stderr)
                errors += 1
                continue
            ms.append((time.perf_counter() - t) * 1e3)
        return ms, errors

    def close(self) -> None:
        self.client.close()


def interleaved(robots: dict, requests: int, warmup: int, block: int) -> dict:
    """Warm each robot up, then time `requests` per robot in alternating blocks, in a new
    random order (seeded) each round. A server commits its replay rows up to
    `commit_interval_s` after its block, during the next case's: shuffled, each case follows
    each other alike often. (A rotation would not do: it keeps every case's predecessor, and
    noop_pg's blocks always took the SQLite noop server's commits.)"""
    lat: dict[str, list[float]] = {name: [] for name in robots}
    errors = 0
    for robot in robots.values():
        errors += robot.run(warmup)[1]
    names = list(robots)
    rng = random.Random(0)
    done = 0
    while done < requests:
        n = min(block, requests - done)
        rng.shuffle(names)
        for name in names:
            ms, e = robots[name].run(n)
            lat[name] += ms
            errors += e
        done += n
    return {"lat": lat, "errors": errors}


# The fleet alternates servers in blocks (fair noise), so each block starts cold: the robots
# were idle while the other server's block ran, and all send at once. A real fleet starts
# once. `steady` leaves out each robot's first STEADY_AFTER requests of every block.
STEADY_AFTER = 2


def fleet(endpoints: dict, robots: int, requests: int, warmup: int, block: int) -> dict:
    """`robots` threads sending at once to each server; servers alternate in rounds."""
    obs = [observation(seed=i + 1) for i in range(robots)]
    clients = {
        name: [ZMQRobot(ep, obs[i], robot_id=f"robot-{i}") for i in range(robots)]
        for name, ep in endpoints.items()
    }
    lat: dict[str, list[float]] = {name: [] for name in endpoints}
    steady: dict[str, list[float]] = {name: [] for name in endpoints}
    errors = [0]

    def burst(name: str, n: int, keep: bool) -> None:
        barrier = threading.Barrier(robots)
        lock = threading.Lock()

        def robot(c: ZMQRobot) -> None:
            barrier.wait()
            ms, e = c.run(n)
            with lock:
                errors[0] += e
                if keep:
                    lat[name] += ms
                    steady[name] += ms[STEADY_AFTER:]

        threads = [threading.Thread(target=robot, args=(c,)) for c in clients[name]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    for name in endpoints:
        burst(name, max(1, warmup // robots), keep=False)
    done = 0
    while done < requests:
        n = min(block, requests - done)
        for name in endpoints:
            burst(name, n, keep=True)
        done += n
    for cs in clients.values():
        for c in cs:
            c.close()
    return {"lat": lat, "steady": steady, "errors": errors[0]}


def pct(ms: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms), q)) if ms else float("nan")


def main(args: Args) -> dict:
    requests = 50 if args.quick else args.requests
    fleet_requests = 25 if args.quick else args.fleet_requests
    block = min(args.block, requests)
    tmp = tempfile.TemporaryDirectory(prefix="serve-latency-")
    obs = observation()
    msg = {"type": "infer", "protocol_version": 1, "robot_id": "robot", "episode_id": "e"}
    payload = wire.packb({**msg, "request_id": "x-0", "observation": obs, "prompt": PROMPT})
    print(f"request: {len(payload) / 1e3:.0f} KB msgpack; starting servers", file=sys.stderr)

    # Single-robot cases: echo, noop (ZMQ), ws (openpi-client -> the same noop server), pi0_fast.
    echo = Proc(_echo_server)
    floor = Proc(_reference_server, "noop")
    noop = Proc(_our_server, "noop", 8, f"{tmp.name}/noop", args.ws, args.profile)
    cluster = noop_pg = cpu_note = None
    if args.pg:  # a real server's durability: options=() keeps fsync and synchronous_commit on
        from openpi_rl.replay.pg_cluster import LocalCluster

        cluster = LocalCluster(options=()).start()
        atexit.register(cluster.stop)  # pg_ctl daemonizes it: stop it even if a server fails
        cpu_note = weigh_cluster(cluster, args.pg_cpu_weight)
        print(cpu_note, file=sys.stderr)
        obs_dir = f"{tmp.name}/pg_observations" if args.pg_records == "segments" else None
        noop_pg = Proc(_our_server, "noop", 8, cluster.create_database(), False, False, obs_dir)
    pi0 = Proc(_our_server, "pi0_fast", 4, f"{tmp.name}/pi0", False, False)
    ref = Proc(_reference_server)
    robots = {
        "echo": EchoRobot(echo.info["endpoint"], {**msg, "observation": obs, "prompt": PROMPT}),
        "floor": ZMQRobot(floor.info["endpoint"], obs),
        "noop": ZMQRobot(noop.info["endpoint"], obs),
    }
    if noop_pg is not None:
        robots["noop_pg"] = ZMQRobot(noop_pg.info["endpoint"], obs)
    if args.ws:
        robots["ws"] = WSRobot(noop.info["ws_port"])
    robots["pi0_fast"] = ZMQRobot(pi0.info["endpoint"], obs)
    print(f"single robot: {requests} timed requests per case", file=sys.stderr)
    single = interleaved(robots, requests, args.warmup, block)
    for r in robots.values():
        r.close()

    fl = {"lat": {}, "errors": 0}
    if args.fleet:
        print(f"fleet: {args.robots} robots x {fleet_requests} timed requests", file=sys.stderr)
        endpoints = {"fleet4": pi0.info["endpoint"], "fleet4_reference": ref.info["endpoint"]}
        fl = fleet(endpoints, args.robots, fleet_requests, args.warmup, max(1, block // 2))

    servers = [("echo", echo), ("noop", noop), ("noop_pg", noop_pg), ("pi0", pi0), ("ref", ref)]
    stats = {name: p.stop() for name, p in servers if p is not None}
    if cluster is not None:
        cluster.stop()
        unweigh_cluster()
    bound = None
    if args.fleet:  # alone on the machine's cores, after the servers have gone
        mb = Proc(_model_bound)
        bound = mb.info
        mb.proc.join(30)
        print(f"model alone, 4 robots: {bound}", file=sys.stderr)
    tmp.cleanup()

    lat = {**single["lat"], **fl["lat"]}
    server_errors = sum(s.get("server_errors", 0) for s in stats.values())
    errors = single["errors"] + fl["errors"] + server_errors
    # Every timed request must have got a reply.
    expected = {k: requests for k in single["lat"]} | {
        k: fleet_requests * args.robots for k in fl["lat"]
    }
    errors += sum(expected[k] - len(v) for k, v in lat.items() if len(v) < expected[k])

    print(
        f"\n{'case':>25} {'n':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}",
        file=sys.stderr,
    )
    rows = {**lat, **{f"{k} steady": v for k, v in fl.get("steady", {}).items()}}
    for name, ms in rows.items():
        print(
            f"{name:>25} {len(ms):>6} {pct(ms, 50):>8.3f} {pct(ms, 90):>8.3f} "
            f"{pct(ms, 99):>8.3f} {max(ms, default=float('nan')):>8.3f}",
            file=sys.stderr,
        )
    print(f"errors: {errors} (server-side error replies: {server_errors})", file=sys.stderr)
    for name, s in stats.items():
        if "replay" in s:
            print(f"{name} server: served {s['served']}, replay {s['replay']}", file=sys.stderr)
    if args.profile and "breakdown" in stats["noop"]:
        print("\nnoop server, one infer request's steps in isolation (median µs):", file=sys.stderr)
        for k, v in stats["noop"]["breakdown"].items():
            print(f"  {k:>34}: {v:8.1f}", file=sys.stderr)
        print("\ncProfile of the noop server's serving thread:", file=sys.stderr)
        print(stats["noop"]["cprofile"], file=sys.stderr)

    r = lambda x: round(x, 3)  # noqa: E731
    echo50, echo99 = pct(lat["echo"], 50), pct(lat["echo"], 99)
    noop50, noop99 = pct(lat["noop"], 50), pct(lat["noop"], 99)
    f99, ref99 = pct(lat.get("fleet4", []), 99), pct(lat.get("fleet4_reference", []), 99)
    steady = fl.get("steady", {})
    s99, sref99 = pct(steady.get("fleet4", []), 99), pct(steady.get("fleet4_reference", []), 99)
    out = {
        "echo_p50_ms": r(echo50),
        "echo_p99_ms": r(echo99),
        "noop_p50_ms": r(noop50),
        "noop_p99_ms": r(noop99),
        "p99_over_echo": r(noop99 / echo99),
        "pi0_fast_p50_ms": r(pct(lat["pi0_fast"], 50)),
        "ws_p50_ms": r(pct(lat["ws"], 50)) if "ws" in lat else None,
        "overhead_over_echo": r(noop50 / echo50),
        "fleet4_p99_ms": r(f99),
        "fleet4_reference_p99_ms": r(ref99),
        "fleet4_p99_over_reference": r(f99 / ref99),
        "fleet4_model_bound": r(bound["ratio"]) if bound else None,
        "fleet4_steady_p99_ms": r(s99),
        "fleet4_steady_reference_p99_ms": r(sref99),
        "fleet4_steady_p99_over_reference": r(s99 / sref99),
        "floor_p50_ms": r(pct(lat["floor"], 50)),
        "floor_over_echo": r(pct(lat["floor"], 50) / echo50),
        "floor_p99_over_echo": r(pct(lat["floor"], 99) / echo99),
        "noop_over_floor": r(noop50 / pct(lat["floor"], 50)),
        "errors": int(errors),
    }
    if "noop_pg" in lat:
        pg99 = pct(lat["noop_pg"], 99)
        out |= {
            "noop_pg_p50_ms": r(pct(lat["noop_pg"], 50)),
            "noop_pg_p99_ms": r(pg99),
            "noop_pg_p99_over_noop": r(pg99 / noop99),
            "noop_pg_p50_over_noop": r(pct(lat["noop_pg"], 50) / noop50),
            "noop_pg_records": args.pg_records,
            "noop_pg_cpu": cpu_note,
        }
    goals = {
        "noop p50 <= 1.25x echo p50": out["overhead_over_echo"] <= 1.25,
        "noop p99 <= 2x echo p99": out["p99_over_echo"] <= 2.0,
        "fleet4 p99 <= 0.5x reference p99": out["fleet4_p99_over_reference"] <= 0.5,
    }
    if "noop_pg_p99_over_noop" in out:
        goals["noop_pg p99 <= 1.1x noop (SQLite) p99"] = out["noop_pg_p99_over_noop"] <= 1.1
    print("\ngoals:", file=sys.stderr)
    for k, ok in goals.items():
        print(f"  {'met   ' if ok else 'MISSED'} {k}", file=sys.stderr)
    return out


if __name__ == "__main__":
    print_json(main(tyro.cli(Args)))
