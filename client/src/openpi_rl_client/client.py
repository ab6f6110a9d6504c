"""``PolicyClient``: the robot's connection to the policy server over ZMQ.

A DEALER socket speaking the framing of :mod:`openpi_rl_client.protocol` with the
lazy-pirate pattern (ZMQ guide, ch. 4): wait ``timeout_s`` for a reply; on timeout close the
socket (linger 0), open a fresh one and resend, up to ``retries`` times; then raise
:class:`PolicyTimeout`. A fresh socket has a fresh identity, so the server's late reply to the
old one is dropped by its ROUTER; request ids catch whatever still arrives out of turn.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
import uuid
from typing import Any

import numpy as np
import zmq

from openpi_rl_client import protocol, wire

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


class PolicyTimeout(TimeoutError):
    """No reply after the first attempt and all retries."""


class ServerError(protocol.ProtocolError):
    """The server answered with an error reply ``{"error": {"code", "message"}}``."""


@dataclasses.dataclass(frozen=True)
class InferResult:
    """One served action chunk. ``actions``: [H, D] float32 (read-only)."""

    actions: np.ndarray
    policy_version: int
    transition_id: int
    server_timing: dict[str, float]


class PolicyClient:
    """Request/reply client for ``infer``, ``report``, ``metadata`` and ``health``.

    Thread-safe: calls from several threads are serialised on one socket. ``curve_server_key``
    (the server's Z85 public key) turns on CURVE encryption; ``curve_client_keys``
    ``(public, secret)`` is this robot's key pair (an ephemeral one is made if omitted).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        robot_id: str = "robot",
        timeout_s: float = 1.0,
        retries: int = 3,
        curve_server_key: bytes | str | None = None,
        curve_client_keys: tuple[bytes | str, bytes | str] | None = None,
        max_bytes: int = wire.DEFAULT_MAX_BYTES,
        context: zmq.Context | None = None,
    ):
        if not robot_id:
            raise ValueError("robot_id: expected a non-empty str")
        if timeout_s <= 0 or retries < 0:
            raise ValueError(f"expected timeout_s > 0 and retries >= 0, got {timeout_s}, {retries}")
        if curve_client_keys is not None and curve_server_key is None:
            raise ValueError("curve_client_keys needs curve_server_key")
        self.endpoint = endpoint
        self.robot_id = robot_id
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.max_bytes = max_bytes
        self._curve = None
        if curve_server_key is not None:
            if not zmq.has("curve"):
                raise RuntimeError("this libzmq was built without CURVE support")
            public, secret = curve_client_keys or zmq.curve_keypair()
            self._curve = tuple(
                k.encode() if isinstance(k, str) else k for k in (curve_server_key, public, secret)
            )
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._lock = threading.Lock()
        self._session = uuid.uuid4().hex[:12]
        self._counter = itertools.count()
        self._socket: zmq.Socket | None = None
        self._closed = False
        self.episode_id = uuid.uuid4().hex
        self.reconnects = 0  # sockets replaced after a timeout, for monitoring

    # -- public API -----------------------------------------------------------------------

    def infer(
        self,
        observation: dict[str, np.ndarray],
        episode_id: str | None = None,
        prompt: str | None = None,
    ) -> InferResult:
        """Send an observation, get an action chunk [H, D]."""
        msg: dict[str, Any] = {
            "type": protocol.INFER,
            "episode_id": episode_id or self.episode_id,
            "observation": observation,
        }
        if prompt is not None:
            msg["prompt"] = prompt
        reply = self._request(msg)
        try:
            actions = reply["actions"]
            if not isinstance(actions, np.ndarray) or actions.ndim != 2:
                raise TypeError(f"'actions': expected an [H, D] array, got {actions!r:.60}")
            return InferResult(
                actions=actions,
                policy_version=int(reply["policy_version"]),
                transition_id=int(reply["transition_id"]),
                server_timing=dict(reply.get("server_timing", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise protocol.ProtocolError(protocol.BAD_MESSAGE, f"infer reply: {e}") from e

    def report(
        self,
        transition_id: int,
        reward: float = 0.0,
        done: bool = False,
        truncated: bool = False,
        executed_actions: np.ndarray | None = None,
        intervened: bool = False,
    ) -> dict:
        """Report the environment's reward (and end of episode) for a served transition."""
        msg: dict[str, Any] = {
            "type": protocol.REPORT,
            "transition_id": int(transition_id),
            "reward": float(reward),
            "done": bool(done),
            "truncated": bool(truncated),
            "intervened": bool(intervened),
        }
        if executed_actions is not None:
            msg["executed_actions"] = np.asarray(executed_actions)
        return self._request(msg)

    def metadata(self) -> dict:
        """The server's ``obs_spec``, ``action_horizon``, ``action_dim`` and ``policy_version``."""
        return self._request({"type": protocol.METADATA})

    def health(self) -> dict:
        """``{"status": "ready" | "warming" | ..., "policy_version": int}``."""
        return self._request({"type": protocol.HEALTH})

    def reset(self) -> str:
        """Start a new episode: a fresh ``episode_id`` (uuid4 hex), returned."""
        self.episode_id = uuid.uuid4().hex
        return self.episode_id

    def close(self) -> None:
        """Close the socket (and the context if this client made it). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drop_socket()
            if self._own_context:
                self._context.term()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lazy pirate ----------------------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        sock.connect(self.endpoint)
        return sock

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _request(self, msg: dict[str, Any]) -> dict:
        request_id = f"{self._session}-{next(self._counter)}"
        msg = {
            **msg,
            "protocol_version": protocol.PROTOCOL_VERSION,
            "robot_id": self.robot_id,
            "request_id": request_id,
        }
        payload = wire.packb(msg)
        with self._lock:
            if self._closed:
                raise RuntimeError("PolicyClient is closed")
            for _ in range(self.retries + 1):
                if self._socket is None:
                    self._socket = self._connect()
                self._socket.send_multipart([b"", payload], copy=False)
                reply = self._await_reply(request_id, time.monotonic() + self.timeout_s)
                if reply is not None:
                    break
                # Lazy pirate: the socket may hold a half-sent request or a dead peer; replace it.
                self._drop_socket()
                self.reconnects += 1
            else:
                raise PolicyTimeout(
                    f"{msg['type']}: no reply from {self.endpoint} after {self.retries + 1} attempts "
                    f"of {self.timeout_s:g} s"
                )
        if "error" in reply:
            error = reply["error"]
            code = error.get("code") if isinstance(error, dict) else None
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            if code not in protocol.ERROR_CODES:
                message, code = f"(code {code!r}) {message}", protocol.INTERNAL
            raise ServerError(code, message)
        return reply

    def _await_reply(self, request_id: str, deadline: float) -> dict | None:
        """The reply to ``request_id``, or None at the deadline. Discards anything else."""
        sock = self._socket
        while (remaining := deadline - time.monotonic()) > 0:
            if not sock.poll(math.ceil(remaining * 1000), zmq.POLLIN):
                continue  # the loop condition ends it at the deadline
            frames = sock.recv_multipart()
            if len(frames) != 2 or frames[0] != b"":
                continue  # not our framing: drop it
            try:
                reply = wire.unpackb(frames[1], max_bytes=self.max_bytes)
            except wire.WireError:
                continue
            if not isinstance(reply, dict):
                continue
            rid = reply.get("request_id")
            if rid == request_id or (rid is None and "error" in reply):
                return reply
            # A late reply to an abandoned request: never hand it to this call.
        return None
