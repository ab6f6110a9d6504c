"""Loopback ports for tests, picked by the kernel (port 0), and the ports a child process
reports in its log once it has bound port 0 itself."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import IO, Any


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the kernel's pick for port 0): for a
    process that must be told its port before it starts. Where the process can bind port 0
    (`tcp://127.0.0.1:*`) and log what it got, read it back with `JsonLog` instead: no window
    in which another process takes the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JsonLog:
    """A child's JSON log lines (structlog, one object a line), read on a thread so the pipe
    never fills and blocks the child; `wait_for` the first line of an event."""

    def __init__(self, stream: IO[str]):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                out.append(event)
        return out

    def wait_for(self, name: str, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = self.events(name)  # the condition's lock is re-entrant
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                assert not self._ended, f"the log ended without {name!r}:\n{self.text()[-3000:]}"
                assert left > 0, f"no {name!r} in {timeout_s} s:\n{self.text()[-3000:]}"
                self._cond.wait(left)

    def text(self) -> str:
        return "".join(self.lines)
