"""The HTTP port's handlers: `POST /feedback` (one event, bearer token), `POST /query` (the
seed's `HumanRewardHTTP`), and the read-only pages both ports serve (`GET /`, `/healthz`).

Tokens are checked on the request's head, before its body is read (`_check_http_head`):
`Authorization: Bearer TOKEN`, never the URL (a `?token=` is ignored and masked in the log).

`HttpPort` is mixed into `RewardBridge` (`server.py`), which owns the listener (`httpd.py`)
and the feedback path these handlers call.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog

from openpi_rl.reward_bridge.events import BadRequest, error_reply, parse_json, printable_id
from openpi_rl.reward_bridge.httpd import (
    HttpRequest,
    HttpResponse,
    bearer_token,
    json_response,
    mask_url,
)

if TYPE_CHECKING:
    from openpi_rl.reward_bridge.config import BridgeConfig
    from openpi_rl.reward_bridge.metrics import BridgeMetrics
    from openpi_rl.reward_bridge.query import QueryBroker


class HttpPort:
    """Handlers of the HTTP port. From the bridge they use the fields below and
    `operator_for`, `_query_allowed` and `feedback`."""

    config: BridgeConfig
    metrics: BridgeMetrics
    queries: QueryBroker
    ws_port: int
    _pendants: dict[Any, str | None]
    _status: dict[str, dict[str, Any]]
    _failed: dict[str, str]

    def _check_http_head(self, req: HttpRequest) -> HttpResponse | int:
        """On the head alone: refuse a wrong token (401), else the body cap of the endpoint."""
        if "token" in req.query:
            log.warning(
                "bridge.url_token_ignored",
                path=mask_url(req.target),
                hint="send it in the Authorization header",
            )
        token = bearer_token(req.headers.get("authorization"))
        if req.method == "POST" and req.path == "/feedback":
            if self.operator_for(token) is None:
                return self._unauthorized("http", req)
        elif req.method == "POST" and req.path == "/query":
            if not self._query_allowed(token):
                return self._unauthorized("query", req)
            return self.config.max_query_bytes
        return self.config.max_message_bytes

    def _unauthorized(self, endpoint: str, req: HttpRequest) -> HttpResponse:
        self.metrics.auth_failures.labels(endpoint).inc()
        log.warning("bridge.unauthorized", endpoint=endpoint, path=mask_url(req.target))
        return json_response(401, error_reply("unauthorized", "wrong or missing token"))

    async def _on_http(self, req: HttpRequest) -> HttpResponse:
        if req.method == "POST" and req.path == "/feedback":
            operator = self.operator_for(bearer_token(req.headers.get("authorization")))
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
            if not self._query_allowed(bearer_token(req.headers.get("authorization"))):
                return self._unauthorized("query", req)
            try:
                request = parse_json(req.body, self.config.max_query_bytes)
                robot = printable_id(req.query.get("robot_id")) or "query"
                return json_response(200, {"reward": await self.queries.ask(request, robot)})
            except BadRequest as e:
                self.metrics.errors.labels(e.code).inc()
                return json_response(400, {"error": {"code": e.code, "message": e.message}})
        if req.method == "GET":
            if req.path in ("/", "/pendant", "/index.html"):
                return self._page_response(str(self.ws_port))
            return self._static(req.path)
        return json_response(
            405, error_reply("bad_request", f"{req.method} {req.path}: no such endpoint")
        )

    def _static(self, path: str) -> HttpResponse:
        if path == "/healthz":  # 503 once a stage has died (the process is about to exit)
            return json_response(
                503 if self._failed else 200,
                {
                    "status": "failed" if self._failed else "ok",
                    "failed": self._failed,
                    "pendants": len(self._pendants),
                    "robots": sorted(self._status),
                },
            )
        if path in ("/", "/pendant", "/index.html"):
            return self._page_response("")
        return HttpResponse(404, b"not found\n", "text/plain")

    def _page_response(self, ws_port: str) -> HttpResponse:
        """The pendant page. `ws_port` "": its WebSocket is on the page's own origin (the
        WebSocket port, or the TLS proxy in front of it); else on that port of the page's host
        (the page as the HTTP port serves it)."""
        page = _page().replace("{{WS_PORT}}", ws_port)
        return HttpResponse(200, page.encode(), "text/html; charset=utf-8")


log = structlog.get_logger("openpi_rl.reward_bridge")
_PAGE: str | None = None


def _page() -> str:
    global _PAGE
    if _PAGE is None:
        _PAGE = (
            resources.files("openpi_rl.reward_bridge").joinpath("static/pendant.html").read_text()
        )
    return _PAGE
