"""openpi's WebSocket protocol in front of the policy server, so robots that already use
`openpi_client.WebsocketClientPolicy` switch with no code change.

What that client expects (openpi-client 0.1.2): on connect, one binary msgpack frame with the
server's metadata; then per call a msgpack observation in and a msgpack dict with "actions"
out; a text frame is an error (the client raises it). Unlike openpi's own server, an error
here leaves the connection open, and listeners bind loopback unless configured.

Each connection forwards its requests over an in-process ZMQ socket to the server's ROUTER, so
they are validated, micro-batched with ZMQ robots and logged to the replay by the same code.

Limits: frames over `max_message_bytes` close the connection (1009, websockets' `max_size`);
a handshake not done in `open_timeout_s` is dropped (slow-loris); a connection that stops
answering pings is closed; past `max_connections`, or past `max_connections_per_peer` from one
address (3/4 of the cap by default, so one remote host cannot take every slot), a new one gets
503. An open connection is never shed to make room: openpi's client does not reconnect, and a
robot may connect long before its first request. Each connection has a
token bucket of `rate_limit_per_s` frames, and a frame over it gets an `overloaded` text frame.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import threading
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import structlog
import zmq
import zmq.asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from openpi_rl.guards import ConnectionSlots, RateLimiter, peer_host
from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl_client import PROTOCOL_VERSION, wire

log = structlog.get_logger("openpi_rl.policy_server.openpi_ws")
_QUIET = logging.getLogger("openpi_rl.policy_server.openpi_ws.websockets")
_QUIET.setLevel(logging.WARNING)


class OpenPIWebSocketEndpoint:
    """Serve openpi's protocol on ws://host:port, forwarding to `server_endpoint` (inproc)."""

    def __init__(
        self,
        server_endpoint: str,
        metadata: Mapping[str, Any],
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        key_map: Mapping[str, str] | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        max_connections: int = 64,
        rate_limit_per_s: float = 500.0,
        rate_limit_burst: int = 500,
        open_timeout_s: float = 5.0,
        metrics: ServerMetrics | None = None,
        max_connections_per_peer: int | None = None,
    ):
        self.server_endpoint = server_endpoint
        self.metadata = dict(metadata)
        self.host, self.port = host, port
        self.api_key = api_key
        self.key_map = dict(key_map or {})  # robot's key -> our obs_spec key
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.rate_limit = (rate_limit_per_s, rate_limit_burst)
        self.open_timeout_s = open_timeout_s
        self.metrics = metrics or ServerMetrics()
        self._slots = ConnectionSlots(max_connections, max_connections_per_peer)
        self._ctx = zmq.asyncio.Context.shadow(zmq.Context.instance().underlying)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openpi-ws", daemon=True)

    def start(self) -> OpenPIWebSocketEndpoint:
        self._thread.start()
        self._started.wait(30)
        return self

    def alive(self) -> bool:
        """False once the event loop's thread has ended (after close(), or by a failure)."""
        return self._thread.is_alive()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- the event loop thread

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._authorize,
            max_size=self.max_message_bytes,
            max_queue=4,  # frames read ahead per connection; TCP pushes back past that
            open_timeout=self.open_timeout_s,
            compression=None,
            # websockets logs request headers at DEBUG (the Api-Key); never below WARNING here.
            logger=_QUIET,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]  # the bound port when 0 was asked
            self._started.set()
            await self._stop.wait()

    def _authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        if not self._slots.can_admit(peer_host(connection.remote_address)):
            self.metrics.refused_connections.labels(listener="openpi_ws", reason="full").inc()
            return Response(
                HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable", Headers(), b"too many\n"
            )
        if self.api_key is None:
            return None
        given = request.headers.get("Authorization", "")
        expected = f"Api-Key {self.api_key}"
        if hmac.compare_digest(given.encode(), expected.encode()):
            return None
        log.warning("unauthorized", peer=str(connection.remote_address))  # never log the key
        self.metrics.refused_connections.labels(listener="openpi_ws", reason="unauthorized").inc()
        return Response(
            HTTPStatus.UNAUTHORIZED, "Unauthorized", Headers(), b"missing or wrong Api-Key\n"
        )

    async def _handle(self, ws: ServerConnection) -> None:
        conn = next(self._ids)
        robot_id, episode_id = f"ws-{conn}", uuid.uuid4().hex
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.server_endpoint)
        limiter = RateLimiter(*self.rate_limit, max_keys=1)
        slot = self._slots.admit(peer_host(ws.remote_address), shed=lambda: None)
        if slot is None:  # filled up while this handshake ran
            sock.close(0)
            self.metrics.refused_connections.labels(listener="openpi_ws", reason="full").inc()
            await ws.close(1013, "too many connections")  # 1013: try again later
            return
        slot.sheddable = False
        try:
            await ws.send(wire.packb(self.metadata))
            async for frame in ws:
                if not limiter.allow(0):
                    self.metrics.rate_limited.labels(listener="openpi_ws").inc()
                    await ws.send("overloaded: rate limited: too many requests")
                    continue
                reply = await self._infer(sock, frame, robot_id, episode_id)
                if "error" in reply:
                    await ws.send(f"{reply['error']['code']}: {reply['error']['message']}")
                else:
                    reply.pop("request_id", None)
                    await ws.send(wire.packb(reply))
        except Exception as e:  # the connection ended or broke: nothing to reply to
            log.info("connection closed", robot_id=robot_id, reason=repr(e))
        finally:
            self._slots.release(slot)
            sock.close(0)

    async def _infer(
        self, sock: zmq.asyncio.Socket, frame: Any, robot_id: str, episode_id: str
    ) -> dict:
        if isinstance(frame, str):
            return {"error": {"code": "bad_message", "message": "expected a binary msgpack frame"}}
        try:
            obs = wire.unpackb(frame, max_bytes=self.max_message_bytes)
        except wire.WireError as e:
            return {"error": {"code": e.code, "message": e.message}}
        if not isinstance(obs, dict):
            return {
                "error": {"code": "invalid_observation", "message": "expected a dict observation"}
            }
        prompt = obs.pop("prompt", None)
        request = {
            "type": "infer",
            "protocol_version": PROTOCOL_VERSION,
            "request_id": uuid.uuid4().hex,
            "robot_id": robot_id,
            "episode_id": episode_id,
            "observation": {self.key_map.get(k, k): v for k, v in obs.items()},
        }
        if isinstance(prompt, str):
            request["prompt"] = prompt
        await sock.send_multipart([b"", wire.packb(request)])
        return wire.unpackb((await sock.recv_multipart())[-1])
