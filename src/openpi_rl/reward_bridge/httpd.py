"""A very small HTTP/1.1 server on asyncio streams (stdlib only) for the bridge's POST
endpoints, which websockets' `process_request` cannot serve (it never reads a request body).
One request per connection (`Connection: close`); bodies are capped before they are read, the
whole request must arrive within `header_timeout_s` (slow-loris), and past `max_connections`
open at once a new connection gets 503."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog

log = structlog.get_logger("openpi_rl.reward_bridge.httpd")


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "application/json"


def json_response(status: int, obj: Any) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj).encode() + b"\n")


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class RateLimiter:
    """Token buckets by key (a connection): `allow(key)` takes one token if there is one.
    At most `max_keys` buckets (least recently used dropped), so new identities cost no memory
    beyond that. `rate_per_s <= 0` allows everything. (The policy server uses it too.)"""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 4096):
        self.rate, self.burst, self.max_keys = float(rate_per_s), float(max(burst, 1)), max_keys
        self._buckets: OrderedDict[Any, list[float]] = OrderedDict()

    def allow(self, key: Any, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [self.burst, now]
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        return False


async def start_http_server(
    handler: Handler,
    host: str,
    port: int,
    max_body: int,
    header_timeout_s: float = 10.0,
    max_connections: int = 128,
    on_refused: Callable[[], None] | None = None,
) -> asyncio.Server:
    active = 0

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= max_connections:
            if on_refused is not None:
                on_refused()
            await _write(writer, _bad(503, "overloaded", "too many connections"))
            return
        active += 1
        try:
            await _serve_one(reader, writer)
        finally:
            active -= 1

    async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(_read_request(reader, max_body), header_timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except ValueError:  # a line past the reader's 64 KiB limit (LimitOverrunError)
            request = _bad(431, "bad_request", "header line too long")
        try:
            response = request if isinstance(request, HttpResponse) else await handler(request)
        except Exception as e:  # a handler bug must not kill the server: answer 500
            log.exception("http.handler_failed")
            response = json_response(500, {"error": {"code": "internal", "message": repr(e)}})
        await _write(writer, response)

    return await asyncio.start_server(on_connection, host, port)


async def _write(writer: asyncio.StreamWriter, response: HttpResponse) -> None:
    try:
        phrase = HTTPStatus(response.status).phrase
        head = (
            f"HTTP/1.1 {response.status} {phrase}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + response.body)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _read_request(reader: asyncio.StreamReader, max_body: int) -> HttpRequest | HttpResponse:
    line = await reader.readline()
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _bad(400, "bad_request", "not an HTTP/1.x request line")
    headers: dict[str, str] = {}
    for _ in range(100):
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        return _bad(431, "bad_request", "too many headers")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return _bad(400, "bad_request", "Content-Length: expected an integer")
    if length > max_body:
        return _bad(413, "too_large", f"body of {length} bytes; at most {max_body}")
    if "chunked" in headers.get("transfer-encoding", ""):
        return _bad(411, "bad_request", "send a Content-Length (chunked bodies not accepted)")
    body = await reader.readexactly(length) if length > 0 else b""
    url = urlsplit(parts[1])
    return HttpRequest(parts[0].upper(), url.path, dict(parse_qsl(url.query)), headers, body)


def _bad(status: int, code: str, message: str) -> HttpResponse:
    return json_response(status, {"type": "error", "error": {"code": code, "message": message}})
