"""A simulated operator at the pendant: the same WebSocket and messages as the page.

It connects to the bridge's `/pendant`, says `hello` with its token, and judges finished
episodes as a person watching the robots would: success when the pole stayed up long,
failure when it fell early, nothing in between. Like a person it presses at most `press_hz`
times a second, always about the latest episode it saw end, and only after a reaction time
(the episode's last chunk must have reached the replay for the verdict to land on it). Every
press carries an idempotency key and counts once the bridge acknowledges it; an unacknowledged
press is resent after a reconnect, as the page does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections import Counter, deque

import structlog
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from openpi_rl.demo.robots import Episode

log = structlog.get_logger("openpi_rl.demo")


@dataclasses.dataclass(frozen=True)
class OperatorPolicy:
    """When the simulated operator presses success or failure."""

    success_steps: int = 200  # an episode this long (or cut by the time limit) is a success
    failure_steps: int = 30  # the pole fell before this: failure
    press_hz: float = 2.0  # presses per second at most, like a person
    reaction_s: float = 0.3  # an episode gets its verdict this long after it ended, not sooner


class SimOperator(threading.Thread):
    """`SimOperator(url, token).start()`; feed it episodes with `saw(ep)`; `close()`."""

    def __init__(self, url: str, token: str, policy: OperatorPolicy = OperatorPolicy()):
        super().__init__(name="operator", daemon=True)
        self.url, self.token, self.policy = url, token, policy
        self.acks: list[dict] = []  # every acknowledgement, in arrival order
        self.errors: list[dict] = []
        self.pressed: Counter[str] = Counter()
        self.connected = threading.Event()
        self._seen: deque[Episode] = deque(maxlen=64)
        self._pending: dict[str, dict] = {}  # idempotency key -> press not yet acknowledged
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def saw(self, ep: Episode) -> None:
        """A robot's episode ended where the operator could see it."""
        with self._lock:
            self._seen.append(ep)

    def counts(self) -> dict[str, int]:
        with self._lock:
            acks = list(self.acks)
        return {
            "pressed": sum(self.pressed.values()),
            "acked": len(acks),
            "attached": sum(1 for a in acks if a.get("status") == "attached"),
            "success": sum(1 for a in acks if a["kind"] == "success"),
            "failure": sum(1 for a in acks if a["kind"] == "failure"),
        }

    def close(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(15)

    def run(self) -> None:
        asyncio.run(self._main())

    def _verdict(self, ep: Episode) -> str | None:
        p = self.policy
        if ep.length >= p.success_steps or not ep.terminated:
            return "success"
        if ep.length < p.failure_steps:
            return "failure"
        return None  # neither clearly good nor clearly bad: a person would not press

    def _next_press(self) -> dict | None:
        """The latest episode seen end at least `reaction_s` ago that deserves a verdict."""
        cutoff = time.monotonic() - self.policy.reaction_s
        with self._lock:
            ready = [e for e in self._seen if e.t_end <= cutoff]
            if not ready:
                return None
            ep = ready[-1]
            self._seen = deque((e for e in self._seen if e.t_end > cutoff), maxlen=64)
        kind = self._verdict(ep)
        if kind is None:
            return None
        return {
            "type": "feedback",
            "robot_id": ep.robot_id,
            "episode_id": ep.episode_id,
            "kind": kind,
            "client_time": time.time(),
            "idempotency_key": uuid.uuid4().hex,
        }

    async def _main(self) -> None:
        backoff = 0.5
        while not self._halt.is_set():
            try:
                async with connect(self.url, open_timeout=5) as ws:
                    await ws.send(json.dumps({"type": "hello", "token": self.token}))
                    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if welcome.get("type") != "welcome":
                        raise RuntimeError(f"pendant: expected welcome, got {welcome!r:.200}")
                    self.connected.set()
                    backoff = 0.5
                    for press in list(self._pending.values()):  # resend, same keys
                        await ws.send(json.dumps(press))
                    reader = asyncio.create_task(self._read(ws))
                    try:
                        await self._press_loop(ws, reader)
                    finally:
                        reader.cancel()
                    return
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError, RuntimeError) as e:
                self.connected.clear()
                if isinstance(e, ConnectionClosed) and e.rcvd and e.rcvd.code == 4401:
                    log.error("demo.operator_unauthorized", url=self.url)
                    return
                log.info("demo.operator_reconnect", error=repr(e)[:200], in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _press_loop(self, ws, reader: asyncio.Task) -> None:
        period = 1.0 / self.policy.press_hz
        while not self._halt.is_set():
            if reader.done():
                reader.result()  # raises ConnectionClosed: reconnect
            press = self._next_press()
            if press is not None:
                self._pending[press["idempotency_key"]] = press
                self.pressed[press["kind"]] += 1
                await ws.send(json.dumps(press))
                await asyncio.sleep(period)
            else:
                await asyncio.sleep(0.05)
        # Stopping: give the last presses their acknowledgements.
        deadline = time.monotonic() + 3.0
        while self._pending and time.monotonic() < deadline and not reader.done():
            await asyncio.sleep(0.05)

    async def _read(self, ws) -> None:
        async for frame in ws:
            msg = json.loads(frame)
            kind = msg.get("type")
            if kind == "ack":
                self._pending.pop(msg.get("idempotency_key"), None)
                with self._lock:
                    self.acks.append(msg)
            elif kind == "error":
                self.errors.append(msg)
                if msg["error"].get("code") != "not_stored":  # not_stored: resent on reconnect
                    self._pending.pop(msg.get("idempotency_key"), None)
