"""`RewardBridge`: pendants and scripts send feedback, the bridge assigns credit and commits it
to the replay, and acknowledges only after the commit (DESIGN guarantee 2).

Ports (all bind `host`, loopback by default):
- `ws_port`: the pendant page (`GET /`), `GET /healthz`, WebSocket `/pendant` (operators) and
  WebSocket `/query` (the seed's `HumanRewardWebSocket`).
- `http_port`: `POST /feedback` (one event, `Authorization: Bearer TOKEN`), `POST /query`
  (`HumanRewardHTTP`), `GET /healthz`, and the page again.

Pendant protocol (JSON text frames): first `{"type": "hello", "token"}` (a wrong or missing
token closes with 4401); then events (see `events.py`), `{"type": "subscribe", "robot_id"}`,
`{"type": "answer", "query_id", "reward"}`. The bridge pushes `status` (per robot: latest
transition's episode, step, policy version; recent rewards), `query` and `query_done`.

Limits (guarantee 6): `max_connections` per port, of which one peer address holds at most 3/4;
past it a newcomer sheds the oldest connection that has made no progress (an HTTP request not
fully arrived, a pendant without its hello), and only when none can be shed gets 503 (see
`httpd.ConnectionSlots`); `handshake_timeout_s` for a
WebSocket handshake or a whole HTTP request, websockets' `max_size` / `max_queue` and pings for
frames and dead peers, and a token bucket of `rate_limit_per_s` frames per WebSocket
connection (a frame over it gets a `rate_limited` error reply).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from openpi_rl.replay import ReplayClosed, ReplayConfig, ReplayFull, schema
from openpi_rl.reward_bridge.config import BridgeConfig
from openpi_rl.reward_bridge.credit import (
    ATTACHED,
    VERDICTS,
    CreditRule,
    Feedback,
    default_rules,
    resolver,
)
from openpi_rl.reward_bridge.events import BadRequest, error_reply, parse_feedback, parse_json
from openpi_rl.reward_bridge.httpd import (
    ConnectionSlots,
    HttpRequest,
    HttpResponse,
    RateLimiter,
    Slot,
    json_response,
    peer_host,
)
from openpi_rl.reward_bridge.httpd import start_http_server as start_http
from openpi_rl.reward_bridge.metrics import BridgeMetrics
from openpi_rl.reward_bridge.query import QueryBroker

log = structlog.get_logger("openpi_rl.reward_bridge")
UNAUTHORIZED = 4401  # WebSocket close code: wrong or missing token
TRY_AGAIN_LATER = 1013  # RFC 6455 registry: the server is full


class RewardBridge:
    """One bridge process: `start()` (background thread) or `run()` (blocking); `close()`
    stops accepting, lets commits finish and closes the replay writer. Idempotent."""

    def __init__(
        self,
        config: BridgeConfig,
        rules: Mapping[str, CreditRule] | None = None,
        metrics: BridgeMetrics | None = None,
    ):
        self.config = config
        self.rules = dict(rules or default_rules(config.press_latency_s))
        self.metrics = metrics or BridgeMetrics()
        self.writer = ReplayConfig(path=Path(config.replay_dir), events_only=True).create()
        self._tokens = [(tok.encode(), name) for name, tok in config.operators.items()]
        if not self._tokens:
            log.warning("bridge.no_operators", hint="no token will be accepted; set [operators]")
        self.ws_port, self.http_port = config.ws_port, config.http_port
        self.queries = QueryBroker(
            self._broadcast,
            self.metrics,
            config.query_timeout_s,
            config.query_default_reward,
            config.max_abs_value,
        )
        self._pendants: dict[ServerConnection, str | None] = {}  # connection -> robot shown
        self._status: dict[str, dict[str, Any]] = {}
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bridge-status")
        self._reader = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self._ws_slots = ConnectionSlots(config.max_connections)  # past the handshake
        self._http_slots = ConnectionSlots(config.max_connections)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> RewardBridge:
        self._thread = threading.Thread(target=self.run, name="reward-bridge", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"reward bridge not listening after {timeout_s} s")
        return self

    def run(self) -> None:
        asyncio.run(self._main())

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler or another thread)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
        self.writer.close()
        if self._reader is not None:
            self._db.submit(self._reader.close)  # the connection belongs to that thread
        self._db.shutdown(wait=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        c = self.config
        quiet = logging.getLogger("openpi_rl.reward_bridge.websockets")
        quiet.setLevel(logging.WARNING)  # websockets would log request lines (query tokens)
        async with serve(
            self._on_ws,
            c.host,
            c.ws_port,
            process_request=self._on_ws_http,
            max_size=c.max_query_bytes,
            max_queue=4,
            open_timeout=c.handshake_timeout_s,
            compression=None,
            logger=quiet,
        ) as ws_server:
            self.ws_port = ws_server.sockets[0].getsockname()[1]
            http_server = None
            if c.http_port is not None:
                http_server = await start_http(
                    self._on_http,
                    c.host,
                    c.http_port,
                    c.max_query_bytes,
                    header_timeout_s=c.handshake_timeout_s,
                    slots=self._http_slots,
                    on_refused=self.metrics.refused_connections.labels("http").inc,
                    on_shed=self.metrics.refused_connections.labels("http").inc,
                )
                self.http_port = http_server.sockets[0].getsockname()[1]
            poller = asyncio.create_task(self._poll_status())
            log.info(
                "bridge.listening", host=c.host, ws_port=self.ws_port, http_port=self.http_port
            )
            self._ready.set()
            await self._stop.wait()
            poller.cancel()
            if http_server is not None:
                http_server.close()
            if self._tasks:  # events being committed still get their ack
                await asyncio.wait(self._tasks, timeout=c.ack_timeout_s)

    # ---- auth --------------------------------------------------------------------------------

    def operator_for(self, token: Any) -> str | None:
        """The operator a token names. Compares against every token, in constant time each."""
        given = token.encode() if isinstance(token, str) else b""
        found = None
        for tok, name in self._tokens:
            if hmac.compare_digest(given, tok):
                found = name
        return found

    def _query_allowed(self, token: str | None) -> bool:
        want = self.config.query_token
        return want is None or hmac.compare_digest((token or "").encode(), want.encode())

    # ---- feedback (shared by WebSocket and HTTP) -----------------------------------------------

    async def feedback(self, msg: dict[str, Any], operator: str) -> dict[str, Any]:
        """Validate, assign credit, commit, and return the acknowledgement."""
        t0 = time.monotonic()
        c = self.config
        ev = parse_feedback(
            msg, operator, time.time(), c.max_abs_value, c.success_value, c.failure_value
        )
        if ev.kind in VERDICTS and c.verdict_settle_s > 0:
            # Let the server's last commit interval reach the database, so "the episode's
            # last transition" includes the chunk that was playing at the press.
            await asyncio.sleep(c.verdict_settle_s)
        try:
            fut = self.writer.submit_reward_event(
                ev.robot_id,
                ev.kind,
                ev.value,
                operator,
                ev.t,
                ev.idempotency_key,
                episode_id=ev.episode_id,
                client_time=ev.client_time,
                resolve=resolver(self.rules, ev),
            )
            self.metrics.replay_queue_depth.set(self.writer.queue_depth())
            result = await asyncio.wait_for(asyncio.wrap_future(fut), c.ack_timeout_s)
        except (ReplayFull, ReplayClosed, TimeoutError) as e:
            log.error("bridge.not_stored", robot_id=ev.robot_id, kind=ev.kind, error=repr(e))
            raise BadRequest(
                "not_stored", f"not committed ({type(e).__name__}); resend with the same key"
            ) from e
        if result.duplicate:
            self.metrics.duplicates.inc()
        else:
            status = result.status or ATTACHED
            self.metrics.events.labels(ev.kind, status).inc()
            if result.transition_id is None:
                self.metrics.unattached.labels(status).inc()
                log.warning("bridge.event_unattached", robot_id=ev.robot_id, status=status)
        self.metrics.ack_seconds.observe(time.monotonic() - t0)
        return _ack(ev, result)

    # ---- WebSocket port ------------------------------------------------------------------------

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

    # ---- HTTP port -----------------------------------------------------------------------------

    async def _on_http(self, req: HttpRequest) -> HttpResponse:
        if req.method == "POST" and req.path == "/feedback":
            auth = req.headers.get("authorization", "")
            operator = self.operator_for(auth.removeprefix("Bearer ").strip())
            if operator is None:
                self.metrics.auth_failures.labels("http").inc()
                return json_response(401, error_reply("unauthorized", "wrong or missing token"))
            try:
                return json_response(
                    200,
                    await self.feedback(
                        parse_json(req.body, self.config.max_message_bytes), operator
                    ),
                )
            except BadRequest as e:
                self.metrics.errors.labels(e.code).inc()
                status = {"not_stored": 503, "too_large": 413}.get(e.code, 400)
                return json_response(status, error_reply(e.code, e.message))
        if req.method == "POST" and req.path == "/query":
            if not self._query_allowed(req.query.get("token")):
                self.metrics.auth_failures.labels("query").inc()
                return json_response(401, {"error": {"code": "unauthorized", "message": "token"}})
            try:
                request = parse_json(req.body, self.config.max_query_bytes)
                robot = req.query.get("robot_id", "query")
                return json_response(200, {"reward": await self.queries.ask(request, robot)})
            except BadRequest as e:
                self.metrics.errors.labels(e.code).inc()
                return json_response(400, {"error": {"code": e.code, "message": e.message}})
        if req.method == "GET":
            return self._static(req.path)
        return json_response(
            405, error_reply("bad_request", f"{req.method} {req.path}: no such endpoint")
        )

    def _static(self, path: str) -> HttpResponse:
        if path == "/healthz":
            return json_response(
                200,
                {"status": "ok", "pendants": len(self._pendants), "robots": sorted(self._status)},
            )
        if path in ("/", "/pendant", "/index.html"):
            page = _page().replace("{{WS_PORT}}", str(self.ws_port))
            return HttpResponse(200, page.encode(), "text/html; charset=utf-8")
        return HttpResponse(404, b"not found\n", "text/plain")

    # ---- live status ---------------------------------------------------------------------------

    def _welcome(self, operator: str) -> dict[str, Any]:
        return {
            "type": "welcome",
            "operator": operator,
            "kinds": list(self.rules),
            "status": self._status,
            "queries": self.queries.pending(),
        }

    def _status_message(self) -> dict[str, Any]:
        return {"type": "status", "robots": self._status, "t": time.time()}

    async def _poll_status(self) -> None:
        """Every `status_interval_s`, read each robot's latest transition and recent rewards
        from the replay (the server is another process: the database is the shared truth)."""
        loop = asyncio.get_running_loop()
        last_sent, sent_at = None, 0.0
        while True:
            try:
                status = await loop.run_in_executor(self._db, self._read_status)
            except Exception:  # a locked or missing database must not stop the bridge
                log.exception("bridge.status_failed")
                status = self._status
            self._status = status
            now = time.monotonic()
            if status != last_sent or now - sent_at > 5.0:
                self._broadcast(self._status_message())
                last_sent, sent_at = status, now
            self.metrics.replay_queue_depth.set(self.writer.queue_depth())
            await asyncio.sleep(self.config.status_interval_s)

    def _read_status(self) -> dict[str, dict[str, Any]]:
        if self._reader is None:
            self._reader = schema.connect_reader(Path(self.config.replay_dir))
        q = self._reader.execute
        robots = {r for (r,) in q("SELECT DISTINCT robot_id FROM episodes")}
        out = {}
        for robot in sorted(robots | set(self.config.robots)):
            row = q(
                "SELECT t.id, t.episode_id, t.step, t.policy_version, t.t_wall, e.ended"
                " FROM transitions t LEFT JOIN episodes e"
                " ON e.robot_id = t.robot_id AND e.episode_id = t.episode_id"
                " WHERE t.robot_id = ? ORDER BY t.t_wall DESC LIMIT 1",
                (robot,),
            ).fetchone()
            recent = q(
                "SELECT kind, value, operator, status, t, transition_id FROM reward_events"
                " WHERE robot_id = ? ORDER BY t DESC LIMIT 5",
                (robot,),
            ).fetchall()
            keys = ("kind", "value", "operator", "status", "t", "transition_id")
            out[robot] = {
                "transition_id": row and row[0],
                "episode_id": row and row[1],
                "step": row and row[2],
                "policy_version": row and row[3],
                "t_wall": row and row[4],
                "episode_ended": bool(row and row[5]),
                "recent": [dict(zip(keys, r, strict=True)) for r in recent],
            }
        return out

    # ---- plumbing ------------------------------------------------------------------------------

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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _ack(ev: Feedback, result: Any) -> dict[str, Any]:
    return {
        "type": "ack",
        "idempotency_key": ev.idempotency_key,
        "robot_id": ev.robot_id,
        "kind": ev.kind,
        "value": ev.value,
        "event_id": result.id,
        "transition_id": result.transition_id,
        "episode_id": result.episode_id,
        "status": result.status,
        "duplicate": result.duplicate,
    }


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


_PAGE: str | None = None


def _page() -> str:
    global _PAGE
    if _PAGE is None:
        _PAGE = (
            resources.files("openpi_rl.reward_bridge").joinpath("static/pendant.html").read_text()
        )
    return _PAGE
