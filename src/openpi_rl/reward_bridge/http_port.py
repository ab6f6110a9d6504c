"""The HTTP port's handlers: `POST /feedback` (one event, bearer token), `POST /query` (the
seed's `HumanRewardHTTP`), and the read-only pages both ports serve (`GET /`, `/healthz`).

`HttpPort` is mixed into `RewardBridge` (`server.py`), which owns the listener (`httpd.py`)
and the feedback path these handlers call.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from openpi_rl.reward_bridge.events import BadRequest, error_reply, parse_json
from openpi_rl.reward_bridge.httpd import HttpRequest, HttpResponse, json_response

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


_PAGE: str | None = None


def _page() -> str:
    global _PAGE
    if _PAGE is None:
        _PAGE = (
            resources.files("openpi_rl.reward_bridge").joinpath("static/pendant.html").read_text()
        )
    return _PAGE
