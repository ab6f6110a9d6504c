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
import ipaddress
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import h11
import structlog

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


# ---- limits ------------------------------------------------------------------------------------


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
    shared: bool = True
    """Counts against its peer's share (False: a trusted proxy's, until its client is known)."""


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

    def _pool(self, peer: str, shared: bool = True) -> tuple[bool, Slot | None]:
        """(full, the oldest sheddable slot of the pool a newcomer from `peer` competes in)."""
        if shared and self._by_peer[peer] >= self.per_peer:
            pool = [s for s in self._slots if s.peer == peer and s.shared]
        elif len(self._slots) >= self.capacity:
            pool = list(self._slots)
        else:
            return False, None
        return True, next((s for s in pool if s.sheddable), None)

    def can_admit(self, peer: str) -> bool:
        full, victim = self._pool(peer)
        return not full or victim is not None

    def admit(self, peer: str, shed: Callable[[], None], shared: bool = True) -> Slot | None:
        """A slot for a new connection from `peer` (shedding one if full), or None: refuse it.
        `shared=False` (a trusted proxy's connection): only the listener's cap applies until
        `assign` names the client."""
        full, victim = self._pool(peer, shared)
        if full and victim is None:
            return None
        if victim is not None:
            self._shed(victim)
        slot = Slot(peer, shed, shared=shared)
        self._slots[slot] = None
        if shared:
            self._by_peer[peer] += 1
        return slot

    def assign(self, slot: Slot, client: str) -> bool:
        """Count `slot` against `client`'s share from now on (the address a trusted proxy
        forwarded), shedding the client's oldest sheddable other connection if it is at its
        share. False: it is at its share with none to shed (refuse the request)."""
        if slot not in self._slots or (slot.shared and slot.peer == client):
            return slot in self._slots
        self._unshare(slot)
        if self._by_peer[client] >= self.per_peer:
            mine = (s for s in self._slots if s.shared and s.peer == client and s.sheddable)
            victim = next(mine, None)
            if victim is None:
                return False
            self._shed(victim)
        slot.peer, slot.shared = client, True
        self._by_peer[client] += 1
        return True

    def release(self, slot: Slot) -> None:
        """Idempotent: a shed slot is released again when its connection ends."""
        if slot in self._slots:
            del self._slots[slot]
            self._unshare(slot)

    def _shed(self, victim: Slot) -> None:
        self.release(victim)
        self.shed_count += 1
        victim.shed()

    def _unshare(self, slot: Slot) -> None:
        if slot.shared:
            slot.shared = False
            self._by_peer[slot.peer] -= 1
            if self._by_peer[slot.peer] <= 0:
                del self._by_peer[slot.peer]


def peer_host(peername: Any) -> str:
    """The address part of a socket's peername ((host, port[, ...]) or a Unix path)."""
    return str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)


# ---- clients behind a reverse proxy ------------------------------------------------------------

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def parse_networks(specs: Iterable[str]) -> Networks:
    """`["127.0.0.1", "10.0.0.0/8"]` -> networks; a bad entry raises ValueError naming it."""
    out = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"trusted_proxies: {spec!r} is not an address or network") from e
    return tuple(out)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped or addr


def _trusted(addr: Any, proxies: Networks) -> bool:
    return addr is not None and any(addr in net for net in proxies)


def client_address(peer: str, header: Callable[[str], str | None], proxies: Networks) -> str:
    """The client's address: the peer's, or when the peer is one of the trusted `proxies`, the
    one it forwarded: the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy
    (entries left of it are the client's word, not the proxy's), else `X-Real-IP`. Anything
    that is not an IP address is ignored, so a key is always a short address."""
    if not proxies or not _trusted(_address(peer), proxies):
        return peer
    for entry in reversed((header("x-forwarded-for") or "").split(",")):
        addr = _address(entry)
        if addr is None:
            break  # a garbled chain: trust nothing left of it
        if not _trusted(addr, proxies):
            return str(addr)
    real = _address(header("x-real-ip") or "")
    return str(real) if real is not None else peer


def is_trusted_peer(peer: str, proxies: Networks) -> bool:
    return bool(proxies) and _trusted(_address(peer), proxies)


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
