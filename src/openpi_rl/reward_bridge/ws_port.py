"""The WebSocket port's handlers: pendant sessions (hello and token, presses and their acks,
subscriptions, answers to queries) and the `/query` WebSocket of the seed's
`HumanRewardWebSocket`; also the port's plain HTTP requests (the page, `/healthz`).

Pendant protocol (JSON text frames): first `{"type": "hello", "token"}` (a wrong or missing
token closes with 4401); then events (see `events.py`), `{"type": "subscribe", "robot_id"}`,
`{"type": "answer", "query_id", "reward"}`. The bridge pushes `status` (per robot: latest
transition's episode, step, policy version; recent rewards), `query` and `query_done`.

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

from openpi_rl.reward_bridge.events import BadRequest, error_reply, parse_json
from openpi_rl.reward_bridge.httpd import ConnectionSlots, RateLimiter, Slot, peer_host

if TYPE_CHECKING:
    from openpi_rl.reward_bridge.config import BridgeConfig
    from openpi_rl.reward_bridge.metrics import BridgeMetrics
    from openpi_rl.reward_bridge.query import QueryBroker

log = structlog.get_logger("openpi_rl.reward_bridge")
UNAUTHORIZED = 4401  # WebSocket close code: wrong or missing token
TRY_AGAIN_LATER = 1013  # RFC 6455 registry: the server is full


class WebSocketPort:
    """Handlers of the WebSocket port. From the bridge they use the fields below and
    `operator_for`, `_query_allowed`, `feedback`, `_spawn`, `_static`, `_welcome` and
    `_status_message`."""

    config: BridgeConfig
    metrics: BridgeMetrics
    queries: QueryBroker
    _pendants: dict[ServerConnection, str | None]  # connection -> robot shown
    _ws_slots: ConnectionSlots  # past the handshake

    def _on_ws_http(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if not self._ws_slots.can_admit(peer_host(connection.remote_address)):
                self.metrics.refused_connections.labels("ws").inc()
                return _response(503, b"too many connections\n", "text/plain")
            if url.path == "/pendant":
                return None
            if url.path == "/query":
                if self._query_allowed(dict(parse_qsl(url.query)).get("token")):
                    return None
                self.metrics.auth_failures.labels("query").inc()
                return _response(401, b"missing or wrong token\n", "text/plain")
            return _response(404, b"WebSocket paths: /pendant, /query\n", "text/plain")
        resp = self._static(url.path)
        return _response(resp.status, resp.body, resp.content_type)

    async def _on_ws(self, ws: ServerConnection) -> None:
        url = urlsplit(ws.request.path if ws.request else "/")

        def shed() -> None:  # a pendant still without its hello makes way for a newcomer
            self.metrics.refused_connections.labels("ws").inc()
            self._spawn(ws.close(TRY_AGAIN_LATER, "server full: no hello yet"))

        slot = self._ws_slots.admit(peer_host(ws.remote_address), shed)
        if slot is None:  # filled up while this handshake ran
            self.metrics.refused_connections.labels("ws").inc()
            await ws.close(TRY_AGAIN_LATER, "too many connections")
            return
        try:
            if url.path == "/query":
                slot.sheddable = False  # its token was checked in the handshake
                await self._query_ws(ws, dict(parse_qsl(url.query)).get("robot_id", "query"))
            else:
                await self._pendant(ws, slot)
        except ConnectionClosed:
            pass
        finally:
            self._ws_slots.release(slot)

    async def _pendant(self, ws: ServerConnection, slot: Slot) -> None:
        operator = await self._hello(ws)
        if operator is None:
            return
        slot.sheddable = False
        self._pendants[ws] = None
        self.metrics.connections.inc()
        try:
            await self._send(ws, self._welcome(operator))
            limiter = self._limiter()
            async for frame in ws:
                if not limiter.allow(0):
                    self.metrics.rate_limited.labels("pendant").inc()
                    await self._send(ws, error_reply("rate_limited", "too many messages"))
                    continue
                await self._pendant_message(ws, frame, operator)
        finally:
            self._pendants.pop(ws, None)
            self.metrics.connections.dec()

    async def _hello(self, ws: ServerConnection) -> str | None:
        try:
            frame = await asyncio.wait_for(ws.recv(), self.config.auth_timeout_s)
            msg = parse_json(frame, self.config.max_message_bytes)
        except (TimeoutError, BadRequest):
            msg = {}
        operator = self.operator_for(msg.get("token")) if msg.get("type") == "hello" else None
        if operator is None:
            self.metrics.auth_failures.labels("pendant").inc()
            log.warning("bridge.unauthorized", peer=str(ws.remote_address))  # never the token
            await ws.close(UNAUTHORIZED, "unauthorized: wrong or missing token")
        return operator

    async def _pendant_message(self, ws: ServerConnection, frame: Any, operator: str) -> None:
        try:
            msg = parse_json(frame, self.config.max_message_bytes)
            kind = msg.get("type", "feedback" if "kind" in msg else None)
            if kind == "feedback":
                self._spawn(self._pendant_feedback(ws, msg, operator))
            elif kind == "subscribe":
                robot = msg.get("robot_id")
                self._pendants[ws] = robot if isinstance(robot, str) else None
                await self._send(ws, self._status_message())
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
        except Exception as e:  # a bug: answer `internal` and keep the pendant (guarantee 6)
            log.exception("bridge.pendant_message_failed")
            self.metrics.errors.labels("internal").inc()
            await self._send(ws, error_reply("internal", f"{e!r:.200}"))

    async def _pendant_feedback(self, ws: ServerConnection, msg: dict, operator: str) -> None:
        try:
            reply = await self.feedback(msg, operator)
        except BadRequest as e:
            self.metrics.errors.labels(e.code).inc()
            reply = error_reply(e.code, e.message, idempotency_key=msg.get("idempotency_key"))
        except Exception as e:  # a bug must not leave the pendant waiting without an answer
            log.exception("bridge.feedback_failed")
            self.metrics.errors.labels("internal").inc()
            key = msg.get("idempotency_key")
            reply = error_reply("internal", f"{e!r:.200}", idempotency_key=key)
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
                reply: dict[str, Any] = {"reward": await self.queries.ask(request, robot_id)}
            except BadRequest as e:
                self.metrics.errors.labels(e.code).inc()
                reply = {"error": {"code": e.code, "message": e.message}}
            except Exception as e:  # a bug: answer `internal`, the connection stays
                log.exception("bridge.query_failed")
                self.metrics.errors.labels("internal").inc()
                reply = {"error": {"code": "internal", "message": f"{e!r:.200}"}}
            await ws.send(json.dumps(reply))

    def _broadcast(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        for ws in list(self._pendants):
            self._spawn(self._send_text(ws, text))

    async def _send(self, ws: ServerConnection, message: dict[str, Any]) -> None:
        await self._send_text(ws, json.dumps(message))

    @staticmethod
    async def _send_text(ws: ServerConnection, text: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)

    def _limiter(self) -> RateLimiter:
        return RateLimiter(self.config.rate_limit_per_s, self.config.rate_limit_burst, 1)


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
