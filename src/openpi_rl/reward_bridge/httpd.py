"""A very small HTTP/1.1 server on asyncio streams (stdlib only) for the bridge's POST
endpoints, which websockets' `process_request` cannot serve (it never reads a request body).
One request per connection (`Connection: close`); bodies are capped before they are read, and
the whole request must arrive within `header_timeout_s` (slow-loris). At most `max_connections`
are open at once (`ConnectionSlots`): a newcomer past the cap sheds the oldest connection whose
request has not fully arrived, so slow-loris and idle connections cannot lock a good client
out; only when every open connection has sent its whole request does the newcomer get 503."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter, OrderedDict
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


@dataclasses.dataclass(eq=False)
class Slot:
    """One connection's hold on a listener's capacity."""

    peer: str
    shed: Callable[[], None]
    """Drops the connection (answering it first where the protocol allows)."""
    sheddable: bool = True
    """No progress yet (request still arriving, not authenticated): may make way for another."""


class ConnectionSlots:
    """Who holds a listener's `capacity` connections, by peer address.

    A newcomer past the cap, or past its peer's share `per_peer` (so one remote host cannot
    take every slot), takes the slot of the oldest sheddable connection in that pool, which is
    shed: slow-loris, idle and flood connections make way for a client that sends its request
    at once (the good client and the attacker may share an address, e.g. loopback, so age and
    progress decide, not the address alone). Only when no connection in the pool can be shed,
    i.e. every one is making progress, is the newcomer refused (`admit` returns None: 503).
    """

    def __init__(self, capacity: int, per_peer: int | None = None):
        self.capacity = max(1, capacity)
        self.per_peer = max(1, per_peer if per_peer is not None else self.capacity * 3 // 4)
        self._slots: dict[Slot, None] = {}  # insertion order = age, oldest first
        self._by_peer: Counter[str] = Counter()
        self.shed_count = 0

    def __len__(self) -> int:
        return len(self._slots)

    def _pool(self, peer: str) -> tuple[bool, Slot | None]:
        """(full, the oldest sheddable slot of the pool a newcomer from `peer` competes in)."""
        if self._by_peer[peer] >= self.per_peer:
            pool = [s for s in self._slots if s.peer == peer]
        elif len(self._slots) >= self.capacity:
            pool = list(self._slots)
        else:
            return False, None
        return True, next((s for s in pool if s.sheddable), None)

    def can_admit(self, peer: str) -> bool:
        full, victim = self._pool(peer)
        return not full or victim is not None

    def admit(self, peer: str, shed: Callable[[], None]) -> Slot | None:
        """A slot for a new connection from `peer` (shedding one if full), or None: refuse it."""
        full, victim = self._pool(peer)
        if full and victim is None:
            return None
        if victim is not None:
            self.release(victim)
            self.shed_count += 1
            victim.shed()
        slot = Slot(peer, shed)
        self._slots[slot] = None
        self._by_peer[peer] += 1
        return slot

    def release(self, slot: Slot) -> None:
        """Idempotent: a shed slot is released again when its connection ends."""
        if slot in self._slots:
            del self._slots[slot]
            self._by_peer[slot.peer] -= 1
            if self._by_peer[slot.peer] <= 0:
                del self._by_peer[slot.peer]


def peer_host(peername: Any) -> str:
    """The address part of a socket's peername ((host, port[, ...]) or a Unix path)."""
    return str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)


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
) -> asyncio.Server:
    """Serve `handler` on host:port. Capacity: `slots` (default: `max_connections`, 3/4 of it
    per peer address); `on_refused` / `on_shed` count 503s and shed connections."""
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

        slot = slots.admit(peer_host(writer.get_extra_info("peername")), shed)
        if slot is None:
            if on_refused is not None:
                on_refused()
            await _write(writer, _bad(503, "overloaded", "too many connections"))
            return
        try:
            await _serve_one(reader, writer, slot)
        except asyncio.CancelledError:
            # Shed, or the loop shutting down: the connection just ends. (Not re-raised: no one
            # awaits this task, and Python 3.11's streams log a cancelled one as an error.)
            writer.close()
        finally:
            slots.release(slot)

    async def _serve_one(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slot: Slot
    ) -> None:
        try:
            request = await asyncio.wait_for(_read_request(reader, max_body), header_timeout_s)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except ValueError:  # a line past the reader's 64 KiB limit (LimitOverrunError)
            request = _bad(431, "bad_request", "header line too long")
        slot.sheddable = False  # the whole request is here: it is served, never shed
        try:
            response = request if isinstance(request, HttpResponse) else await handler(request)
        except Exception as e:  # a handler bug must not kill the server: answer 500
            log.exception("http.handler_failed")
            response = json_response(500, {"error": {"code": "internal", "message": repr(e)}})
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


async def _write(writer: asyncio.StreamWriter, response: HttpResponse) -> None:
    try:
        writer.write(_encode(response))
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
