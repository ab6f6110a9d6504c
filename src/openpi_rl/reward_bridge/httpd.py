"""The bridge's HTTP/1.1 listener for its POST endpoints, which websockets' `process_request`
cannot serve (it never reads a request body): asyncio streams, parsed by h11 (the sans-IO
HTTP/1.1 parser; it refuses what request smuggling needs: conflicting `Content-Length`s,
`Content-Length` with `Transfer-Encoding`, bad chunk framing, malformed header lines).

One request per connection (`Connection: close`). Once the head has arrived, `check_head`
answers at once (a wrong token: 401) or names the body cap for that endpoint, so no body is
read before the token is checked, and none past its cap (413); the whole request must arrive
within `header_timeout_s` (slow-loris). At most `max_connections` are open at once
(`ConnectionSlots`): a newcomer past the cap sheds the oldest connection whose request has not
fully arrived, so slow-loris and idle connections cannot lock a good client out; only when
every open connection has sent its whole request does the newcomer get 503. Behind a trusted
reverse proxy (`client_address`) a connection counts against the forwarded client's share."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import h11
import structlog

from openpi_rl.guards import (
    ConnectionSlots,
    Networks,
    Slot,
    client_address,
    is_trusted_peer,
    peer_host,
)

log = structlog.get_logger("openpi_rl.reward_bridge.httpd")

MAX_HEAD_BYTES = 32 * 1024  # request line and headers together (h11: 431 past it)


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    client: str = ""
    """The client's address: the peer's, or the one a trusted proxy forwarded."""
    target: str = ""
    """The request target as sent (log it through `mask_url`)."""


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "application/json"


def json_response(status: int, obj: Any) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj).encode() + b"\n")


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
HeadCheck = Callable[[HttpRequest], "HttpResponse | int"]
"""Called with the request head (body b""): a response to send without reading the body, or
the most body bytes this request may send."""

# ---- secrets in URLs ---------------------------------------------------------------------------

CREDENTIAL_PARAMS = ("token", "key", "secret", "password", "auth")  # as openpi_rl.secret


def mask_url(target: str) -> str:
    """A request target (`/query?robot_id=a&token=x`) with the values of credential-looking
    query parameters replaced by `***`, for logs. (`openpi_rl.secret.mask_url` does the same
    for absolute URLs; a request line has no scheme or host.)"""
    if "?" not in target:
        return target
    head, _, query = target.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    masked = [(k, "***" if any(c in k.lower() for c in CREDENTIAL_PARAMS) else v) for k, v in pairs]
    return f"{head}?{urlencode(masked, safe='*')}"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; None without the header, "" for
    another scheme (a token that matches nothing)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# ---- the server --------------------------------------------------------------------------------


async def start_http_server(
    handler: Handler,
    host: str,
    port: int,
    max_body: int,
    header_timeout_s: float = 10.0,
    max_connections: int = 128,
    on_refused: Callable[[], None] | None = None,
    on_shed: Callable[[], None] | None = None,
    slots: ConnectionSlots | None = None,
    check_head: HeadCheck | None = None,
    trusted_proxies: Networks = (),
) -> asyncio.Server:
    """Serve `handler` on host:port. Capacity: `slots` (default: `max_connections`, 3/4 of it
    per client address); `on_refused` / `on_shed` count 503s and shed connections. Bodies:
    `check_head`'s cap per request, never past `max_body`."""
    slots = ConnectionSlots(max_connections) if slots is None else slots

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None

        def shed() -> None:  # its request has not arrived: answer 503 and stop reading it
            if on_shed is not None:
                on_shed()
            with contextlib.suppress(Exception):
                writer.write(_encode(_bad(503, "overloaded", _SHED_MESSAGE)))
                writer.close()
            task.cancel()

        peer = peer_host(writer.get_extra_info("peername"))
        # A trusted proxy's connections count against their clients' shares once the head
        # names them; until then only the listener's cap applies.
        slot = slots.admit(peer, shed, shared=not is_trusted_peer(peer, trusted_proxies))
        if slot is None:
            if on_refused is not None:
                on_refused()
            await _write(writer, _bad(503, "overloaded", "too many connections"))
            return
        try:
            await _serve_one(reader, writer, slot, peer)
        except asyncio.CancelledError:
            # Shed, or the loop shutting down: the connection just ends. (Not re-raised: no one
            # awaits this task, and Python 3.11's streams log a cancelled one as an error.)
            writer.close()
        finally:
            slots.release(slot)

    def on_head(request: HttpRequest, slot: Slot) -> HttpResponse | int:
        if not slots.assign(slot, request.client):
            if on_refused is not None:
                on_refused()
            return _bad(503, "overloaded", "too many connections from this client")
        cap = max_body if check_head is None else check_head(request)
        return cap if isinstance(cap, HttpResponse) else min(cap, max_body)

    async def _serve_one(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slot: Slot, peer: str
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        reading = _read_request(
            reader, writer, conn, peer, trusted_proxies, lambda r: on_head(r, slot)
        )
        try:
            request = await asyncio.wait_for(reading, header_timeout_s)
        except (TimeoutError, ConnectionError):
            writer.close()
            return
        slot.sheddable = False  # the whole request is here: it is served, never shed
        if isinstance(request, HttpResponse):  # refused before its body was read
            await _write(writer, request, linger=reader)
            return
        try:
            response = await handler(request)
        except Exception:  # a handler bug must not kill the server: answer 500, say no more
            log.exception("http.handler_failed", method=request.method, path=request.path)
            response = _bad(500, "internal", "internal error (logged by the bridge)")
        await _write(writer, response)

    return await asyncio.start_server(on_connection, host, port)


_SHED_MESSAGE = "server full: the request did not arrive in time; retry"


def _encode(response: HttpResponse) -> bytes:
    phrase = HTTPStatus(response.status).phrase
    head = (
        f"HTTP/1.1 {response.status} {phrase}\r\nContent-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\nCache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + response.body


async def _write(
    writer: asyncio.StreamWriter,
    response: HttpResponse,
    linger: asyncio.StreamReader | None = None,
) -> None:
    """Send and close. `linger`: the request's bytes may still be arriving on this reader;
    half-close and let them drain a moment first, or closing with unread input would reset the
    connection and the client might lose the reply (what nginx's lingering_close is for)."""
    try:
        writer.write(_encode(response))
        await writer.drain()
        if linger is not None and writer.can_write_eof():
            writer.write_eof()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(_discard(linger, 1 << 20), 1.0)
    except OSError:  # the client went away (reset, or ENOTCONN from write_eof): nothing to send
        pass
    finally:
        writer.close()


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    while limit > 0 and (chunk := await reader.read(min(limit, 65536))):
        limit -= len(chunk)


async def _read_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn: h11.Connection,
    peer: str,
    proxies: Networks,
    on_head: Callable[[HttpRequest], HttpResponse | int],
) -> HttpRequest | HttpResponse:
    """The request, or the response that refuses it (framing, head, body cap)."""
    head: HttpRequest | None = None
    cap, body, continued = 0, bytearray(), False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue and head and not continued:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the head passed
                    continued = True
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                head = _head(event, peer, proxies)
                verdict = on_head(head)
                if isinstance(verdict, HttpResponse):
                    return verdict
                cap = verdict
                length = head.headers.get("content-length")
                if length is not None and int(length) > cap:
                    return _bad(413, "too_large", f"body of {length} bytes; at most {cap}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > cap:
                    return _bad(413, "too_large", f"body past {cap} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return dataclasses.replace(head, body=bytes(body))
            else:  # ConnectionClosed before the request was complete
                raise ConnectionError("closed before the request was complete")
    except h11.RemoteProtocolError as e:
        status = e.error_status_hint if e.error_status_hint in (400, 413, 414, 431) else 400
        return _bad(status, "bad_request", f"malformed HTTP/1.1 request: {e}")


def _head(event: h11.Request, peer: str, proxies: Networks) -> HttpRequest:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    url = urlsplit(target)
    return HttpRequest(
        event.method.decode("latin-1").upper(),
        url.path,
        dict(parse_qsl(url.query)),
        headers,
        b"",
        client=client_address(peer, headers.get, proxies),
        target=target,
    )


def _bad(status: int, code: str, message: str) -> HttpResponse:
    return json_response(status, {"type": "error", "error": {"code": code, "message": message}})
