"""How hostile inputs reach a listener: over ZMQ DEALER sockets, WebSocket connections or
raw TCP, plus slow-loris connections and a connection flood. Each sender reads whatever the
listener answers so its queue to us never fills; none of them judges the answers beyond
counting the ones that show a server bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import zmq


def zmq_attack(endpoint: str, frames: list[bytes], per_socket: int, extra_multipart: bool) -> None:
    """Send each hostile frame from DEALER sockets (a fresh identity every `per_socket`), reading
    whatever replies come so the server's queue to us never fills."""
    ctx = zmq.Context.instance()
    sock = None
    for i, payload in enumerate(frames):
        if i % per_socket == 0:
            if sock is not None:
                sock.close(0)
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(endpoint)
        parts = [b"", payload]
        if extra_multipart and i % 7 == 3:
            parts = [payload]  # no envelope delimiter
        elif extra_multipart and i % 7 == 5:
            parts = [b"", b"x", payload, b""]  # extra frames
        sock.send_multipart(parts)
        while sock.poll(0):
            sock.recv_multipart()
        if i % 200 == 199:  # let the server drain: a flood is not what this loop measures
            deadline = time.monotonic() + 0.5
            while sock.poll(20) and time.monotonic() < deadline:
                sock.recv_multipart()
    if sock is not None:
        time.sleep(0.2)
        sock.close(0)


async def ws_attack(url: str, frames: list[Any], headers: list | None, hello: str | None) -> int:
    """Send hostile frames over WebSocket connections, reading replies; reconnect when the
    server closes (oversize frames do that). Returns the count of 1011 closes (server bugs)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    bugs = 0
    i = 0
    while i < len(frames):
        try:
            async with connect(
                url, additional_headers=headers, max_size=None, compression=None, open_timeout=5
            ) as ws:
                if hello is not None:
                    await ws.send(hello)
                with contextlib.suppress(TimeoutError):
                    while True:  # metadata / welcome / status pushes
                        await asyncio.wait_for(ws.recv(), 0.05)
                sent_here = 0
                while i < len(frames) and sent_here < 150:
                    await ws.send(frames[i])
                    i += 1
                    sent_here += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ws.recv(), 1.0)
                        while True:
                            await asyncio.wait_for(ws.recv(), 0.001)
        except ConnectionClosed as e:
            if e.rcvd is not None and e.rcvd.code == 1011:
                bugs += 1
            i += 1  # the frame that closed it was tried
        except (OSError, TimeoutError):
            i += 1
    return bugs


async def _raw(port: int, data: bytes, read_s: float = 1.0) -> bytes:
    """One raw TCP connection: send `data`, read what comes back until close or `read_s`."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return b""
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            out = await asyncio.wait_for(reader.read(65536), read_s)
    except (OSError, ConnectionError):
        pass
    finally:
        writer.close()
    return out


async def raw_many(port: int, inputs: list[bytes], concurrency: int, read_s: float) -> list[bytes]:
    sem = asyncio.Semaphore(concurrency)

    async def one(data: bytes) -> bytes:
        async with sem:
            return await _raw(port, data, read_s)

    return await asyncio.gather(*(one(d) for d in inputs))


async def slowloris(port: int, k: int, duration_s: float, prefix: bytes) -> int:
    """`k` connections trickling `prefix` one byte per second for `duration_s`. Returns how
    many the server dropped before the end."""

    async def one() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        end = time.monotonic() + duration_s
        i = 0
        try:
            while time.monotonic() < end:
                writer.write(prefix[i % len(prefix) : i % len(prefix) + 1])
                await writer.drain()
                i += 1
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                        return True  # closed by the server
            return False
        except (OSError, ConnectionError):
            return True
        finally:
            writer.close()

    return sum(await asyncio.gather(*(one() for _ in range(k))))


async def flood(port: int, k: int) -> None:
    async def one() -> None:
        with contextlib.suppress(OSError, TimeoutError):
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            writer.close()

    await asyncio.gather(*(one() for _ in range(k)))
