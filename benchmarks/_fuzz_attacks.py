"""How hostile inputs reach a listener: over ZMQ DEALER sockets, WebSocket connections or
raw TCP, plus slow-loris connections and a connection flood. Each sender reads whatever the
listener answers so its queue to us never fills; none of them judges the answers beyond
counting the ones that show a server bug. `zmq_report_attack` is the one that needs real
transitions: two hostile robots infer as they go, and its reports name their transitions, each
other's, the good robot's or made-up ids; a report acknowledged for a transition that was not
served to the robot it names is a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
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


def zmq_report_attack(
    endpoint: str,
    specs: list[dict],
    good_ids: Callable[[], list[int]],
    seed: int,
    debug: bool = False,
) -> dict[str, Any]:
    """Send the `report` specs of `_fuzz_inputs.report_specs`, resolving each transition id
    and robot when sent. Two hostile robots ("self" and "other") infer every few reports through
    `PolicyClient`s so that "own" ids are real and recent. Returns the counts: replies by
    outcome, `foreign_reports_acked` (acknowledged, though the transition was not served to the
    robot named: the bug class of issue 12), unanswered."""
    from _fuzz_inputs import _MISSING, _np

    from openpi_rl_client import PolicyClient, wire

    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:8]
    names = {"self": f"hostile-a-{tag}", "other": f"hostile-b-{tag}"}
    owned: dict[str, list[int]] = {"self": [], "other": []}
    clients = {k: PolicyClient(endpoint, v, timeout_s=2.0, retries=0) for k, v in names.items()}
    chunk: tuple[int, ...] = (1, 1)
    with contextlib.suppress(Exception):
        md = clients["self"].metadata()
        chunk = (int(md["action_horizon"]), int(md["action_dim"]))
    obs = {"state": np.zeros(4, np.float32)}
    owner: dict[int, str] = {}  # transition id -> robot it was served to (hostile robots)

    def infer(who: str) -> None:
        try:
            tid = clients[who].infer(obs).transition_id
        except Exception:  # a dead writer answers `overloaded`: counted by the good client
            return
        owned[who].append(tid)
        owner[tid] = names[who]

    def resolve_tid(plan: tuple) -> Any:
        kind, v = plan
        if kind == "val":
            return v
        own = owned["self"] or [0]
        if kind == "near":
            return own[-1] + v
        if v == "own":
            return own[-1]
        if v == "own_old":
            return own[0]
        if v == "other":
            return (owned["other"] or [0])[-1]
        good = good_ids()
        return rng.choice(good) if good else 0

    def executed(plan: Any) -> Any:
        if not (isinstance(plan, tuple) and plan and plan[0] == "array"):
            return plan
        _, dtype, shape, fill = plan
        shape = {"chunk": chunk, "chunk+1": (chunk[0] + 1, chunk[1]), "flat": (chunk[1],)}.get(
            shape, shape
        )
        return _np(dtype, shape, fill)

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    expect: dict[str, tuple[bool, str]] = {}  # request_id -> (may be acknowledged, what)
    out: dict[str, Any] = {"sent": 0, "ok": 0, "foreign_reports_acked": 0, "errors": {}}
    out["unmatched"] = 0
    foreign_examples: list[str] = []
    messages: dict[str, list[str]] = {}

    def read(timeout_ms: int) -> None:
        while sock.poll(timeout_ms):
            timeout_ms = 0
            frames = sock.recv_multipart()
            try:
                reply = wire.unpackb(frames[-1])
            except Exception:
                continue
            if "request_id" not in reply:  # refused before its id was read (bad_message)
                out["unmatched"] += 1
            may_ack, what = expect.pop(str(reply.get("request_id")), (None, "?"))
            if may_ack is None and "request_id" in reply:
                continue
            if reply.get("ok") is True:
                out["ok"] += 1
                if not may_ack:
                    out["foreign_reports_acked"] += 1
                    foreign_examples.append(what)
            else:
                err = reply.get("error")
                code = str(err.get("code") if isinstance(err, dict) else err)
                out["errors"][code] = out["errors"].get(code, 0) + 1
                if isinstance(err, dict):
                    messages.setdefault(code, []).append(str(err.get("message"))[:100])

    infer("self")
    infer("other")
    for i, spec in enumerate(specs):
        if i % 16 == 0:
            infer("self")
        if i % 64 == 32:
            infer("other")
        tid = resolve_tid(spec["tid"])
        robot = spec["robot"]
        if isinstance(robot, tuple):
            robot = robot[1]
        else:
            robot = names.get(robot, f"hostile-fresh-{tag}-{i}")
        rid = f"hr-{tag}-{i}"
        msg: dict[Any, Any] = {k: v for k, v in spec["extra"].items() if k not in GUARDED}
        msg.update(type="report", protocol_version=1, request_id=rid, robot_id=robot)
        msg["transition_id"] = tid
        for field in ("reward", "done", "truncated", "intervened", "executed_actions"):
            value = executed(spec[field]) if field == "executed_actions" else spec[field]
            if value is not _MISSING:
                msg[field] = value
        for field in spec["drop"]:
            msg.pop(field, None)
        try:
            payload = msgpack.packb(
                msg,
                default=wire._pack_default,
                use_bin_type=True,
                use_single_float=spec["single_float"],
            )
        except Exception:  # an array the wire cannot carry: the field as None instead
            payload = msgpack.packb({**msg, "executed_actions": None}, use_bin_type=True)
        # Only a report naming a transition served to the robot it names may be acknowledged.
        may_ack = type(tid) is int and owner.get(tid) == robot and not spec["drop"]
        expect[rid] = (may_ack, f"robot {robot!r:.40} transition_id {tid!r:.30}")
        sock.send_multipart([b"", payload])
        out["sent"] += 1
        read(0)
        if i % 100 == 99:  # stay under the per-peer rate limit; reports wait for their commit
            read(200)
    deadline = time.monotonic() + 5.0
    while expect and time.monotonic() < deadline:
        read(100)
    out["unanswered"] = max(0, len(expect) - out.pop("unmatched"))
    out["errors"] = dict(sorted(out["errors"].items()))
    if debug:
        out["messages"] = messages
    if foreign_examples:
        out["foreign_examples"] = foreign_examples[:3]
    sock.close(0)
    for c in clients.values():
        c.close()
    return out


GUARDED = ("type", "protocol_version", "request_id", "robot_id", "transition_id")


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
