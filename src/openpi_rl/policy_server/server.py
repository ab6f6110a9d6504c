"""The ZMQ serving loop: ROUTER socket, micro-batching, validation, replies, replay logging.

One thread serves: it drains every request waiting on the socket, answers cheap messages at
once, and runs infer requests as one padded batch per group of observation keys (robots that
arrive while the model runs are batched on the next pass: continuous batching). The replay
writer has its own thread; the reply never waits for the disk (guarantee 1). Bad input of any
kind gets an error reply and a counter, and the loop goes on (guarantee 6).

Limits (guarantee 6 against hostile clients): frames over `max_message_bytes` get `too_large`
(libzmq drops a connection past 4x that); each connection (ROUTER identity) has a token bucket
of `rate_limit_per_s`, and a request over it gets `overloaded` without being decoded; a peer
that has not finished the ZMQ handshake after `handshake_timeout_s` is dropped (slow-loris).
With `curve_secret_key_file` the socket speaks CURVE and admits only the public keys in
`curve_allowed_clients_dir` (`openpi-rl keys generate DIR`); an unknown key is refused at the
handshake, so it never reaches this loop.

Framing: a DEALER client sends [b"", payload]; the ROUTER sees [identity, b"", payload] and
replies [identity, b"", reply]. A REQ client produces the same frames.

Mixed into `PolicyServer`: `Replies` (replies.py: sending, error replies, the resend window),
`Transitions` (transitions.py: transition ids, replay rows) and `Stages` (stages.py: a dead
stage fails health); its knobs are `ServeOptions` (options.py).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog
import zmq

from openpi_rl.guards import RateLimiter
from openpi_rl.policy_server.batching import ArrivalForecast
from openpi_rl.policy_server.curve import curve_server
from openpi_rl.policy_server.inputs import RobotInputs
from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl.policy_server.options import ServeOptions
from openpi_rl.policy_server.replies import Replies, _Pending
from openpi_rl.policy_server.reports import Reports
from openpi_rl.policy_server.returns import EpisodeReturns
from openpi_rl.policy_server.robots import RobotLedger
from openpi_rl.policy_server.snapshot import (
    PolicySnapshot,
    example_observation,
    key_sets,
    padded_sizes,
)
from openpi_rl.policy_server.stages import Stages, SwapStage
from openpi_rl.policy_server.transitions import Transitions
from openpi_rl.replay import ReplayAdder, ReplayConfig
from openpi_rl.replay.writer import ReplayClosed, ReplayFull
from openpi_rl.rl.actor_critic import ActorCritic
from openpi_rl.rl.rl_api import validate_observation
from openpi_rl_client import protocol, wire

log = structlog.get_logger("openpi_rl.policy_server")


class PolicyServer(Replies, Transitions, Stages):
    """`PolicyServer(ac, options, replay_config).run()`; `close()` from any thread stops it."""

    def __init__(
        self,
        ac: ActorCritic,
        options: ServeOptions = ServeOptions(),  # noqa: B008 (ServeOptions is frozen)
        replay_config: ReplayConfig | None = None,
        version: int = 0,
        metrics: ServerMetrics | None = None,
        inputs: RobotInputs | None = None,
    ):
        self.options = options
        self.obs_spec = ac.model.obs_spec
        self.config = getattr(ac.model, "config", None)
        # Robots' observations -> the model's arrays (input maps, resizing, prompt tokens).
        self.inputs = inputs if inputs is not None else RobotInputs(self.obs_spec)
        self.snapshot = PolicySnapshot(version, ac, self.obs_spec, padded_sizes(options.max_batch))
        self.metrics = metrics or ServerMetrics()
        self.metrics.policy_version.set(version)
        self.metrics.compilations.set_function(lambda: self.snapshot.compilations)
        self.swapper: SwapStage | None = None  # set by Swapper(self, ...): hot-swap and admin
        # Per-version episode returns (automatic rollback).
        self.returns = EpisodeReturns(max_robots=options.max_robots)
        self.replay = replay_config.create() if replay_config is not None else None
        # Served chunks become replay rows there (steps, episodes, observation records).
        self.adder = ReplayAdder(self.replay, options.max_robots) if self.replay else None
        self._ctx = zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # The codec answers messages over the cap with `too_large`; libzmq's hard limit (which
        # drops the connection without a reply) only guards memory against absurd frames.
        self.socket.setsockopt(zmq.MAXMSGSIZE, 4 * options.max_message_bytes)
        # Bounded memory per peer: past these, libzmq drops (RCV) or refuses (SND) messages.
        self.socket.setsockopt(zmq.RCVHWM, options.rcvhwm)
        self.socket.setsockopt(zmq.SNDHWM, options.sndhwm)
        self._curve = options.curve_secret_key_file is not None
        self.socket.setsockopt(zmq.HANDSHAKE_IVL, int(options.handshake_timeout_s * 1000))
        if options.curve_secret_key_file is not None or options.curve_allowed_clients_dir:
            if not (options.curve_secret_key_file and options.curve_allowed_clients_dir):
                raise ValueError(
                    "CURVE needs both curve_secret_key_file and curve_allowed_clients_dir"
                )
            curve_server(
                self.socket, options.curve_secret_key_file, options.curve_allowed_clients_dir
            )
        self._limiter = RateLimiter(options.rate_limit_per_s, options.rate_limit_burst)
        self.socket.bind(options.endpoint)
        self.endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        # In-process front ends (the openpi WebSocket endpoint) reach the same loop here.
        self.inproc_endpoint = f"inproc://openpi-rl-server-{id(self):x}"
        self.socket.bind(self.inproc_endpoint)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._running = False  # run() started: it releases on its way out
        self._finish_lock = threading.Lock()
        self._finished = threading.Event()
        self._counter = 0  # sampling calls: the key is derived from (version, counter)
        self._unlogged = 0  # transition ids when no replay is configured
        self.robots = RobotLedger(options.max_robots, options.report_window)
        if self.replay is not None:
            self._restore_robots()
        self.failure: str | None = None  # a stage that died: health says so, run() ends
        self._stages: dict[str, Callable[[], bool]] = {}  # name -> alive (watch())
        self._next_check = 0.0
        # (robot_id, request_id) -> the packed reply, or the request while it is still pending.
        # A client that timed out resends the same request_id from a new socket (lazy pirate);
        # answering from here keeps one request one transition and one report one reward.
        self._warned_sets: set[tuple[str, ...]] = set()
        self._recent: OrderedDict[tuple[str, str], bytes | _Pending] = OrderedDict()
        self._arrivals = ArrivalForecast(max_robots=options.max_robots)
        self._request_metrics: dict[str, tuple[Any, Any]] = {}  # kind -> (counter, histogram)
        self._call_s = 0.0  # running mean of one model call: the predictive hold's ceiling
        self.served = 0
        self.key_sets = key_sets(self.obs_spec, ac.model, options.warm_key_sets)
        self._warmed_sorted = {tuple(sorted(k)) for k in self.key_sets}  # as _serve groups them
        example = example_observation(self.obs_spec)
        self.action_shape = tuple(self.snapshot.sample(0, [example]).actions.shape[1:])
        self.reports = Reports(
            self.robots, self.action_shape, options.reward_range, self.metrics, self.replay
        )

    # -- lifecycle

    def warm_up(self) -> None:
        """Compile every padded batch size; until then infer answers `not_ready`."""
        t = time.perf_counter()
        self.warm(self.snapshot)
        self._ready.set()
        self.metrics.ready.set(1)
        log.info("ready", seconds=round(time.perf_counter() - t, 2), sizes=self.snapshot.sizes)

    def warm(self, snapshot: PolicySnapshot) -> bool:
        """Run `snapshot` on every padded batch size and key set the server serves (it compiles
        only the first time: versions share the jitted sampler). True if outputs are finite."""
        example = example_observation(self.obs_spec)
        return snapshot.warm_up(example, [k for k in self.key_sets if k != tuple(example)])

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def arrivals(self) -> ArrivalForecast:
        """The robots' forecast arrivals (think times) that the batcher holds batches by."""
        return self._arrivals

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every batch size is compiled (`run()` warms up); False past `timeout`."""
        return self._ready.wait(timeout)

    def swap(self, snapshot: PolicySnapshot) -> PolicySnapshot:
        """Make `snapshot` live (one reference assignment: `_serve` reads it once per batch, so
        the swap lands between batches); returns the snapshot it replaced."""
        old, self.snapshot = self.snapshot, snapshot
        self.metrics.policy_version.set(snapshot.version)
        return old

    def run(self) -> None:
        """Serve until `close()`; warms up in a thread so health answers meanwhile. Releases
        the socket and flushes the replay on its way out."""
        self._running = True
        if self._stop.is_set():  # closed before it ran
            self._finish()
            return
        threading.Thread(target=self.warm_up, name="warm-up", daemon=True).start()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.reports.wake_fd, zmq.POLLIN)
        pending: list[_Pending] = []
        serve_at = 0.0  # when the open batch is due (one forecast per pass)
        while not self._stop.is_set():
            timeout_ms = 100 if not pending else max(0.0, serve_at - time.perf_counter()) * 1e3
            events = dict(poller.poll(timeout_ms))
            if self.reports.wake_fd in events:
                for p, reply in self.reports.completed():  # acknowledged once committed
                    self._reply(p, reply, remember="error" not in reply, kind="report")
            if self.socket in events:
                self._drain(pending)
            if time.perf_counter() >= self._next_check:
                self._check_stages()
            if not pending:
                continue
            serve_at = self._serve_at(pending)
            if (
                len(pending) >= self.options.max_batch
                or time.perf_counter() >= serve_at
                or not self._ready.is_set()
            ):
                try:
                    self._serve(pending)
                except Exception:  # a bug must not end serving; the robots see a timeout
                    log.exception("serving pass failed")
                pending = []
        self._finish()

    def _serve_at(self, pending: list[_Pending]) -> float:
        """When to serve the open batch: after `max_wait_us`, or later while robots are due."""
        t_first = pending[0].t_recv
        at = t_first + self.options.max_wait_us / 1e6
        window = min(self.options.expected_wait_us / 1e6, self._call_s)
        if window > 0 and len(pending) < self.options.max_batch:
            present = {str(p.msg.get("robot_id")) for p in pending}
            now = time.perf_counter()
            at = max(at, self._arrivals.hold_until(t_first, now, window, present))
        return at

    def close(self, wait_s: float | None = None) -> None:
        """Stop serving; the loop flushes the replay and closes the socket. Idempotent, from
        any thread or a signal handler (it sets a flag `run` polls). With `wait_s`, return once
        that is done (or the time is up). A server whose `run()` never started is released here."""
        self._stop.set()
        if not self._running:
            self._finish()
        elif wait_s is not None:
            self._finished.wait(wait_s)

    def _finish(self) -> None:
        with self._finish_lock:  # run's exit and a close() before run() started
            if self._closed:
                return
            self._closed = True
        self.socket.close(linger=0)
        if self.replay is not None:
            try:
                self.replay.close()
            except Exception:  # a failed writer: what it could commit, it did
                log.exception("replay close failed")
        self.reports.close()
        log.info("stopped", served=self.served)
        self._finished.set()

    # -- requests

    def _drain(self, pending: list[_Pending]) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            t_recv = time.perf_counter()
            if len(frames) < 2:
                continue  # not a DEALER/REQ envelope: nothing to reply to
            # The payload stays in the frame's memory (a 300 KB request is not copied): the
            # decoded arrays share it, and the adder encodes them into the replay's record once.
            identity, payload = frames[0].bytes, frames[-1].buffer
            rid = None
            if not self._limiter.allow(identity):
                self.metrics.rate_limited.labels(listener="zmq").inc()
                reply = self._error(protocol.OVERLOADED, "rate limited: too many requests")
                self._send(identity, reply, "invalid", t_recv)
                continue
            try:
                msg = wire.unpackb(payload, max_bytes=self.options.max_message_bytes)
                rid = msg.get("request_id") if isinstance(msg, dict) else None
                kind, msg = protocol.validate_request(msg)
                if self._curve and "robot_id" in msg:
                    self._check_key(frames[-1], msg["robot_id"])
                key = (str(msg.get("robot_id")), str(rid)) if rid is not None else None
                if key is not None and self._resent(key, identity, kind, t_recv):
                    continue
                if kind == "infer":
                    self._check_infer(msg)
                    p = _Pending(identity, msg, t_recv)
                    self._arrivals.arrived(str(msg.get("robot_id")), t_recv)
                    pending.append(p)
                    if key is not None:
                        self._remember(key, p)
                    if len(pending) >= self.options.max_batch:
                        return
                    continue
                if kind == "report" and self.replay is not None:
                    self._report(_Pending(identity, msg, t_recv), key)
                    continue  # acknowledged once committed (_acknowledge_reports)
                reply = self._handle(kind, msg)
                if key is not None and kind == "report":
                    reply["request_id"] = rid
                    self._remember(key, self._send(identity, reply, kind, t_recv))
                    continue
            except protocol.ProtocolError as e:
                reply = self._error(e.code, e.message)
                kind = "invalid"
            except Exception:  # a bug must not kill the server; the traceback goes to the log
                log.exception("request failed")
                reply = self._error(protocol.INTERNAL, "internal error (see the server log)")
                kind = "invalid"
            if rid is not None:
                reply["request_id"] = rid  # the client matches replies to requests by it
            self._send(identity, reply, kind, t_recv)

    def _check_infer(self, msg: dict) -> None:
        if not self._ready.is_set():
            raise protocol.ProtocolError(protocol.NOT_READY, "warming up: compiling the policy")
        obs = msg["observation"]
        try:
            if not self.inputs.identity:  # replaced: the replay stores what the model reads
                robot = str(msg.get("robot_id"))
                obs = msg["observation"] = self.inputs.observation(robot, obs, msg.get("prompt"))
            validate_observation(obs, self.obs_spec, batched=False)
        except ValueError as e:
            raise protocol.ProtocolError(protocol.INVALID_OBSERVATION, str(e)) from None

    def metadata(self) -> dict:
        """What a robot needs to know: the observation spec, the chunk shape, the live version."""
        return {
            "obs_spec": {
                k: {"shape": list(s.shape), "dtype": s.dtype, "optional": s.optional}
                for k, s in self.obs_spec.items()
            },
            "action_horizon": self.action_shape[0],
            "action_dim": self.action_shape[1],
            "policy_version": self.snapshot.version,
        }

    def _handle(self, kind: str, msg: dict) -> dict:
        if kind == "health":
            status = "ready" if self._ready.is_set() else "warming"
            if self.failure is not None:
                status = "failed"
            reply = {"status": status, "policy_version": self.snapshot.version}
            if self.failure is not None:
                reply["reason"] = self.failure
            if self.swapper is not None:  # the learner's liveness; the learner reads the pause
                reply.update(self.swapper.health())
            return reply
        if kind == "metadata":
            return self.metadata()
        if kind == "report":  # no replay: nothing to store, acknowledged at once
            self._checked_report(msg)
            return {"ok": True}
        raise protocol.ProtocolError(protocol.UNKNOWN_TYPE, f"unknown message type {kind!r}")

    def _check_key(self, frame: zmq.Frame, robot: str) -> None:
        """With CURVE, a robot id belongs to the first client key that uses it."""
        try:
            key = frame.get("User-Id")  # the ZAP handler's user id: the client's public key
        except zmq.ZMQError:
            return  # the in-process front end (openpi WebSocket): it authenticates its own
        if key and not self.robots.bind_key(robot, key.encode()):
            raise protocol.ProtocolError(
                protocol.UNAUTHORIZED, f"robot_id {robot!r} is bound to another client key"
            )

    def _checked_report(self, msg: dict) -> tuple[int, float, np.ndarray | None]:
        checked = self.reports.check(msg)
        ended = bool(msg["done"]) or bool(msg["truncated"])
        self.returns.reported(msg["robot_id"], checked[1], ended)
        return checked

    def _report(self, p: _Pending, key: tuple[str, str] | None) -> None:
        """Queue a checked report; its reply goes out once it is committed (guarantee 2)."""
        self.reports.submit(p, p.msg, self._checked_report(p.msg))
        if key is not None:
            self._remember(key, p)  # a resend meanwhile is answered with this reply

    def _serve(self, pending: list[_Pending]) -> None:
        if not self._ready.is_set():
            for p in pending:
                self._reply(p, self._error(protocol.NOT_READY, "warming up"))
            return
        groups: dict[tuple[str, ...], list[_Pending]] = {}
        for p in pending:
            groups.setdefault(tuple(sorted(p.msg["observation"])), []).append(p)
        for keys in groups:
            if keys not in self._warmed_sorted and keys not in self._warned_sets:
                self._warned_sets.add(keys)
                log.warning(
                    "compiling on the serving path for an unwarmed key set; add it to "
                    "serve.warm_key_sets",
                    keys=list(keys),
                )
        snapshot = self.snapshot  # one reference for the whole batch: a swap lands between batches
        for group in groups.values():
            t0 = time.perf_counter()
            self._counter += 1
            try:
                tids = self._transition_ids(len(group))
            except (ReplayFull, ReplayClosed) as e:  # not served, so nothing is lost: resend
                for p in group:
                    self._reply(p, self._error(protocol.OVERLOADED, f"replay: {e}"))
                continue
            try:
                out = snapshot.sample(self._counter, [p.msg["observation"] for p in group])
            except Exception:
                log.exception("inference failed")
                for p in group:
                    self._reply(p, self._error(protocol.INTERNAL, "inference failed"))
                continue
            infer_ms = (time.perf_counter() - t0) * 1e3
            # The replies first (the critical path), then the bookkeeping: the queue has room
            # for these transitions (checked above; this thread is its only producer).
            for i, p in enumerate(group):
                robot_actions = self.inputs.actions(
                    str(p.msg["robot_id"]), out.actions[i], p.msg["observation"].get("state")
                )
                reply = {
                    "actions": np.ascontiguousarray(robot_actions, np.float32),
                    "policy_version": snapshot.version,
                    "transition_id": tids[i],
                    "server_timing": {"queue_ms": (t0 - p.t_recv) * 1e3, "infer_ms": infer_ms},
                }
                self._reply(p, reply, remember=True)
            t_replied = time.perf_counter()
            batch = frozenset(str(p.msg["robot_id"]) for p in group)
            for i, p in enumerate(group):
                robot = str(p.msg["robot_id"])
                self._log_transition(p, out, i, snapshot.version, tids[i])
                self.returns.served(robot, str(p.msg["episode_id"]), snapshot.version)
                self._arrivals.replied(robot, t_replied, batch)
            self.served += len(group)
            self._call_s += 0.2 * (infer_ms / 1e3 - self._call_s)
            self.metrics.batch_size.observe(len(group))
            if self.replay is not None:
                self.metrics.replay_queue_depth.set(self.replay.queue_depth())


__all__ = ["PolicyServer", "ServeOptions", "SwapStage"]
