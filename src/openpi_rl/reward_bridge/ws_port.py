"""The WebSocket port's handlers: pendant sessions (hello and token, presses and their acks,
subscriptions, answers to queries) and the `/query` WebSocket of the seed's
`HumanRewardWebSocket`; also the port's plain HTTP requests (the page, `/healthz`).

Pendant protocol (JSON text frames): first `{"type": "hello", "token"}` (a wrong or missing
token closes with 4401; a frame past `max_message_bytes` before it closes with 1009); then
events (see `events.py`), `{"type": "subscribe", "robot_id"}`,
`{"type": "answer", "query_id", "reward"}`. The bridge pushes `status` (per robot: latest
transition's episode, step, policy version; recent rewards), `returns` (mean return per policy
version, also in the welcome), `frame` (the subscribed robot's camera images, JPEG data URLs;
`status.py`), `query` and `query_done`; a
pendant that stops reading them is closed (1008) once `MAX_PENDING_SENDS` wait for it.

`/query`: the token (when one is needed) in the handshake's `Authorization: Bearer TOKEN`, or
in a first frame `{"type": "hello", "token"}` (no reply; a wrong one closes with 4401), never
in the URL. Until it has passed, frames are capped at `max_message_bytes`; then at
`max_query_bytes`.

`WebSocketPort` is mixed into `RewardBridge` (`server.py`), which owns the listener, the
connections' state and the feedback path these handlers call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from openpi_rl.guards import ConnectionSlots, Networks, RateLimiter, Slot, client_address, peer_host
from openpi_rl.reward_bridge.events import (
    BadRequest,
    check_id,
    error_reply,
    parse_json,
    printable_id,
)
from openpi_rl.reward_bridge.httpd import bearer_token, mask_url

if TYPE_CHECKING:
    from openpi_rl.reward_bridge.config import BridgeConfig
    from openpi_rl.reward_bridge.metrics import BridgeMetrics
    from openpi_rl.reward_bridge.query import QueryBroker

log = structlog.get_logger("openpi_rl.reward_bridge")
UNAUTHORIZED = 4401  # WebSocket close code: wrong or missing token
TRY_AGAIN_LATER = 1013  # RFC 6455 registry: the server is full
POLICY_VIOLATION = 1008  # a pendant that does not read what it is sent
MAX_PENDING_SENDS = 64  # messages waiting for one pendant's socket before it is closed
MAX_WAITING_FRAMES = 2  # a pendant with this many messages waiting skips a camera frame
INTERNAL_MESSAGE = "internal error (logged by the bridge)"  # never the exception's text


class WebSocketPort:
    """Handlers of the WebSocket port. From the bridge they use the fields below and
    `operator_for`, `_query_allowed`, `_query_token_needed`, `feedback`, `_spawn`, `_static`,
    `_welcome` and `_status_message`."""

    config: BridgeConfig
    metrics: BridgeMetrics
    queries: QueryBroker
    _pendants: dict[ServerConnection, str | None]  # connection -> robot shown
    _ws_slots: ConnectionSlots  # past the handshake
    _proxies: Networks
    _outbox: dict[ServerConnection, int]  # connection -> messages waiting for its socket
    _frames: dict[str, dict[str, Any]]  # robot -> its newest camera frame (status.py)

    def _ws_client(self, connection: ServerConnection, headers: Headers) -> str:
        """The client's address (a trusted proxy's forwarded one): its per-address share."""

        def header(name: str) -> str | None:
            return ", ".join(headers.get_all(name)) or None

        return client_address(peer_host(connection.remote_address), header, self._proxies)

    def _on_ws_http(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if "token" in dict(parse_qsl(url.query)):
            log.warning(
                "bridge.url_token_ignored",
                path=mask_url(request.path),
                hint="send it in the Authorization header or the hello frame",
            )
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if not self._ws_slots.can_admit(self._ws_client(connection, request.headers)):
                self.metrics.refused_connections.labels("ws").inc()
                return _response(503, b"too many connections\n", "text/plain")
            if url.path == "/pendant":
                return None
            if url.path == "/query":
                token = bearer_token(request.headers.get("Authorization"))
                if token is None and self._query_token_needed():
                    return None  # the token comes in the hello frame
                if self._query_allowed(token):
                    return None
                self.metrics.auth_failures.labels("query").inc()
                log.warning("bridge.unauthorized", endpoint="query", path=mask_url(request.path))
                return _response(401, b"missing or wrong token\n", "text/plain")
            return _response(404, b"WebSocket paths: /pendant, /query\n", "text/plain")
        resp = self._static(url.path)
        return _response(resp.status, resp.body, resp.content_type)

    async def _on_ws(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        url = urlsplit(ws.request.path)

        def shed() -> None:  # a pendant still without its hello makes way for a newcomer
            self.metrics.refused_connections.labels("ws").inc()
            self._spawn(ws.close(TRY_AGAIN_LATER, "server full: no hello yet"))

        slot = self._ws_slots.admit(self._ws_client(ws, ws.request.headers), shed)
        if slot is None:  # filled up while this handshake ran
            self.metrics.refused_connections.labels("ws").inc()
            await ws.close(TRY_AGAIN_LATER, "too many connections")
            return
        try:
            if url.path == "/query":
                await self._query(ws, slot, dict(parse_qsl(url.query)).get("robot_id"))
            else:
                await self._pendant(ws, slot)
        except ConnectionClosed:
            pass
        finally:
            self._ws_slots.release(slot)
            self._outbox.pop(ws, None)

    async def _pendant(self, ws: ServerConnection, slot: Slot) -> None:
        operator = await self._hello(ws)
        if operator is None:
            return
        slot.sheddable = False
        # Past the hello a frame somewhat over max_message_bytes gets `too_large` and the
        # connection stays; one far over it closes the connection (1009).
        _set_max_size(ws, 4 * self.config.max_message_bytes)
        self._pendants[ws] = None
        self.metrics.connections.inc()
        pending = [0]  # this pendant's events waiting for their commit
        try:
            await self._send(ws, self._welcome(operator))
            limiter = self._limiter()
            async for frame in ws:
                if not limiter.allow(0):
                    self.metrics.rate_limited.labels("pendant").inc()
                    await self._send(ws, error_reply("rate_limited", "too many messages"))
                    continue
                await self._pendant_message(ws, frame, operator, pending)
        finally:
            self._pendants.pop(ws, None)
            self.metrics.connections.dec()

    async def _first_frame(self, ws: ServerConnection) -> dict[str, Any]:
        """The hello, or {} (the listener caps it at max_message_bytes: 1009 past it)."""
        try:
            frame = await asyncio.wait_for(ws.recv(), self.config.auth_timeout_s)
            return parse_json(frame, self.config.max_message_bytes)
        except (TimeoutError, BadRequest):
            return {}

    async def _hello(self, ws: ServerConnection) -> str | None:
        msg = await self._first_frame(ws)
        operator = self.operator_for(msg.get("token")) if msg.get("type") == "hello" else None
        if operator is None:
            self.metrics.auth_failures.labels("pendant").inc()
            log.warning("bridge.unauthorized", peer=str(ws.remote_address))  # never the token
            await ws.close(UNAUTHORIZED, "unauthorized: wrong or missing token")
        return operator

    async def _query(self, ws: ServerConnection, slot: Slot, robot: str | None) -> None:
        assert ws.request is not None
        in_handshake = bearer_token(ws.request.headers.get("Authorization")) is not None
        if not in_handshake and self._query_token_needed():
            msg = await self._first_frame(ws)
            token = msg.get("token") if msg.get("type") == "hello" else None
            if not (isinstance(token, str) and self._query_allowed(token)):
                self.metrics.auth_failures.labels("query").inc()
                log.warning("bridge.unauthorized", endpoint="query", peer=str(ws.remote_address))
                await ws.close(UNAUTHORIZED, "unauthorized: send the query token first")
                return
        slot.sheddable = False
        _set_max_size(ws, self.config.max_query_bytes)
        await self._query_ws(ws, printable_id(robot) or "query")

    async def _pendant_message(
        self, ws: ServerConnection, frame: Any, operator: str, pending: list[int]
    ) -> None:
        try:
            msg = parse_json(frame, self.config.max_message_bytes)
            kind = msg.get("type", "feedback" if "kind" in msg else None)
            if kind == "feedback":
                if pending[0] >= self.config.max_pending_acks:
                    self.metrics.rate_limited.labels("pendant").inc()
                    message = f"{pending[0]} events wait for their commit; resend later"
                    key = printable_id(msg.get("idempotency_key"))
                    await self._send(ws, error_reply("rate_limited", message, idempotency_key=key))
                    return
                pending[0] += 1
                self._spawn(self._pendant_feedback(ws, msg, operator, pending))
            elif kind == "subscribe":
                robot = msg.get("robot_id")
                self._pendants[ws] = None if robot is None else check_id(robot, "robot_id")
                await self._send(ws, self._status_message())
                frame = self._frames.get(robot) if isinstance(robot, str) else None
                if frame is not None:  # else the status poller makes one on its next tick
                    await self._send(ws, frame)
            elif kind == "answer":
                self.queries.answer(msg, operator)
            elif kind == "ping":
                await self._send(ws, {"type": "pong", "t": time.time()})
            else:
                raise BadRequest(
                    "unknown_type",
                    f"type: expected feedback, subscribe, answer or ping, got {kind!r:.60}",
                )
        except BadRequest as e:
            self.metrics.errors.labels(e.code).inc()
            await self._send(ws, error_reply(e.code, e.message))
        except Exception:  # a bug: answer `internal` and keep the pendant (guarantee 6)
            log.exception("bridge.pendant_message_failed")
            self.metrics.errors.labels("internal").inc()
            await self._send(ws, error_reply("internal", INTERNAL_MESSAGE))

    async def _pendant_feedback(
        self, ws: ServerConnection, msg: dict, operator: str, pending: list[int]
    ) -> None:
        key = printable_id(msg.get("idempotency_key"))
        try:
            reply = await self.feedback(msg, operator)
        except BadRequest as e:
            self.metrics.errors.labels(e.code).inc()
            reply = error_reply(e.code, e.message, idempotency_key=key)
        except Exception:  # a bug must not leave the pendant waiting without an answer
            log.exception("bridge.feedback_failed")
            self.metrics.errors.labels("internal").inc()
            reply = error_reply("internal", INTERNAL_MESSAGE, idempotency_key=key)
        finally:
            pending[0] -= 1
        await self._send(ws, reply)

    async def _query_ws(self, ws: ServerConnection, robot_id: str) -> None:
        limiter = self._limiter()
        async for frame in ws:
            if not limiter.allow(0):
                self.metrics.rate_limited.labels("query").inc()
                msg = {"code": "rate_limited", "message": "too many messages"}
                await ws.send(json.dumps({"error": msg}))
                continue
            try:
                request = parse_json(frame, self.config.max_query_bytes)
                if request.get("type") == "hello":  # a client that always says hello: no reply
                    continue
                reply: dict[str, Any] = {"reward": await self.queries.ask(request, robot_id)}
            except BadRequest as e:
                self.metrics.errors.labels(e.code).inc()
                reply = {"error": {"code": e.code, "message": e.message}}
            except Exception:  # a bug: answer `internal`, the connection stays
                log.exception("bridge.query_failed")
                self.metrics.errors.labels("internal").inc()
                reply = {"error": {"code": "internal", "message": INTERNAL_MESSAGE}}
            await ws.send(json.dumps(reply))

    def _broadcast(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        for ws in list(self._pendants):
            self._spawn(self._send_text(ws, text))

    def _send_watching(self, robot: str, message: dict[str, Any]) -> None:
        """Send to the pendants showing `robot`, except one with `MAX_WAITING_FRAMES` messages
        still waiting: a frame is dropped, not queued (the next one replaces it), so a pendant
        on a slow network sees fewer frames instead of old ones."""
        text = None
        for ws, shown in list(self._pendants.items()):
            if shown != robot:
                continue
            if self._outbox.get(ws, 0) >= MAX_WAITING_FRAMES:
                self.metrics.frames_dropped.inc()
                continue
            text = text or json.dumps(message)
            self._spawn(self._send_text(ws, text))

    async def _send(self, ws: ServerConnection, message: dict[str, Any]) -> None:
        await self._send_text(ws, json.dumps(message))

    async def _send_text(self, ws: ServerConnection, text: str) -> None:
        """Send; but a pendant with `MAX_PENDING_SENDS` messages waiting already is closed
        instead: one that stops reading must not hold the bridge's memory (the page
        reconnects and its welcome carries the current status)."""
        waiting = self._outbox.get(ws, 0)
        if waiting >= MAX_PENDING_SENDS:
            if waiting == MAX_PENDING_SENDS:
                self._outbox[ws] = waiting + 1  # close once
                log.warning("bridge.pendant_not_reading", peer=str(ws.remote_address))
                self._spawn(ws.close(POLICY_VIOLATION, "not reading its messages"))
            return
        self._outbox[ws] = waiting + 1
        try:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(text)
        finally:
            if ws in self._outbox:
                self._outbox[ws] -= 1

    def _limiter(self) -> RateLimiter:
        return RateLimiter(self.config.rate_limit_per_s, self.config.rate_limit_burst, 1)


def _set_max_size(ws: ServerConnection, max_bytes: int) -> None:
    """Change the connection's frame cap (websockets reads it at each frame's start)."""
    protocol: Any = ws.protocol
    if hasattr(protocol, "max_message_size"):  # websockets >= 15
        protocol.max_message_size = max_bytes
    else:
        protocol.max_size = max_bytes


def _response(status: int, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)
