"""The server's reply plumbing: sending a reply on the ROUTER socket (with its request counter
and latency), error replies, and the dedupe window that answers a resent request (same robot
and request_id, lazy pirate) from the reply already sent instead of serving it twice. A mixin
of `PolicyServer` (server.py), run only on its serving thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Any

import structlog
import zmq

from openpi_rl.policy_server.batching import ArrivalForecast
from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl_client import protocol, wire

log = structlog.get_logger("openpi_rl.policy_server")


@dataclasses.dataclass
class _Pending:
    identity: bytes
    msg: dict
    t_recv: float
    resent_from: list[bytes] = dataclasses.field(default_factory=list)  # sockets of resends


class Replies:
    """Replies and the dedupe window; the attributes below are `PolicyServer`'s."""

    socket: zmq.Socket
    metrics: ServerMetrics
    _recent: OrderedDict[tuple[str, str], bytes | _Pending]
    _arrivals: ArrivalForecast
    _request_metrics: dict[str, tuple[Any, Any]]
    options: Any  # ServeOptions: dedupe_window

    def remembers(self, robot_id: str, request_id: str) -> bool:
        """Whether the dedupe window holds this request (queued or answered): a resend of it
        would be answered, not served again."""
        return (str(robot_id), str(request_id)) in self._recent

    def _resent(self, key: tuple[str, str], identity: bytes, kind: str, t_recv: float) -> bool:
        """Answer a request seen before (same robot and request_id); False if it is new."""
        seen = self._recent.get(key)
        if seen is None:
            return False
        self.metrics.duplicates.labels(type=kind).inc()
        if isinstance(seen, _Pending):
            seen.resent_from.append(identity)  # still queued: its reply goes to every socket
        else:
            self._send_bytes(identity, seen, kind, t_recv)
        return True

    def _remember(self, key: tuple[str, str], entry: bytes | _Pending) -> None:
        self._recent[key] = entry
        self._recent.move_to_end(key)
        while len(self._recent) > self.options.dedupe_window:
            self._recent.popitem(last=False)

    def _reply(self, p: _Pending, reply: dict, remember: bool = False, kind: str = "infer") -> None:
        rid = p.msg.get("request_id")
        if rid is not None:
            reply["request_id"] = rid
        packed = self._send(p.identity, reply, kind, p.t_recv)
        if kind == "infer" and "error" in reply:
            self._arrivals.dropped(str(p.msg["robot_id"]))
        for identity in p.resent_from:  # a gone socket's reply is dropped by the ROUTER
            self._send_bytes(identity, packed, kind, p.t_recv)
        key = (str(p.msg.get("robot_id")), str(rid))
        if rid is not None and key in self._recent:
            if remember:
                self._remember(key, packed)
            else:  # an error reply: a resend is served afresh
                del self._recent[key]

    def _error(self, code: str, message: str) -> dict:
        self.metrics.errors.labels(code=code).inc()
        return protocol.error_reply(code, message)

    def _send(self, identity: bytes, reply: dict, kind: str, t_recv: float) -> bytes:
        packed = wire.packb(reply)
        self._send_bytes(identity, packed, kind, t_recv)
        return packed

    def _send_bytes(self, identity: bytes, packed: bytes, kind: str, t_recv: float) -> None:
        try:
            self.socket.send_multipart([identity, b"", packed], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the robot went away (EHOSTUNREACH) or its queue is full
            log.warning("reply dropped", error=str(e))
        children = self._request_metrics.get(kind)
        if children is None:  # labels() costs a lock and a lookup: once per kind
            children = self._request_metrics[kind] = (
                self.metrics.requests.labels(type=kind),
                self.metrics.request_seconds.labels(type=kind),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - t_recv)
