"""Listener guards every role's front end uses: token-bucket rate limits per connection,
connection slots shared fairly between peers (shedding the oldest connection that has not
made progress), peer addresses, and clients behind a trusted reverse proxy."""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# ---- limits ------------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by key (a connection): `allow(key)` takes one token if there is one.
    At most `max_keys` buckets (least recently used dropped), so new identities cost no memory
    beyond that. `rate_per_s <= 0` allows everything."""

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

    def __iter__(self) -> Iterator[Slot]:
        """The held slots, oldest first (a copy: connections may come and go meanwhile)."""
        return iter(list(self._slots))

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
